#!/usr/bin/env bash
# Two vLLM instances on one node, one per GPU, sharing prefix KV over CUDA IPC + NVLink.
#   MODEL=meta-llama/Llama-3.1-8B-Instruct configs/two-gpu-serve.sh
# Instance A: GPU0, port 8000. Instance B: GPU1, port 8001. The registry runs in the
# background with Prometheus metrics on :9400 (without it, the first instance starts one
# on demand; running it yourself gives you its /metrics).
set -euo pipefail
MODEL=${MODEL:?set MODEL to a model name or path}
CFG=$(dirname "$0")/kv-transfer-config.json
export KVMKT_REGISTRY_SOCKET=${KVMKT_REGISTRY_SOCKET:-/tmp/kvmkt-$(id -u)/registry.sock}
kvmkt registry --socket "$KVMKT_REGISTRY_SOCKET" --metrics-port 9400 &
REG=$!
trap 'kill $REG $A $B 2>/dev/null' EXIT
CUDA_VISIBLE_DEVICES=0 vllm serve "$MODEL" --port 8000 --kv-transfer-config "$(cat "$CFG")" "$@" &
A=$!
CUDA_VISIBLE_DEVICES=1 vllm serve "$MODEL" --port 8001 --kv-transfer-config "$(cat "$CFG")" "$@" &
B=$!
echo "A: http://localhost:8000  B: http://localhost:8001  registry metrics: http://localhost:9400/metrics"
echo "kvmkt status   # holders, published blocks, leases, hit rate"
wait
