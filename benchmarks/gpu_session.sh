#!/usr/bin/env bash
# GPU host runs (the device tool, kind nvidia-h200-x2). One call runs the stages named on the
# command line, in order; each stage's full log lands in $OUT/<stage>.log and a summary
# table is printed last.
#
#   probe    GPUs, topology, cuda-bindings; the transport benchmark (needs no vLLM):
#            bash .gpu-bundle/install-bundle.sh stash is expected to have run first
#   install  assemble the vLLM bundle (second transfer) and install this project
#   tests    tests/gpu (two engines on GPU0/GPU1, equivalence, negative control, kill)
#   tests-shm  tests/gpu over transport host_shm (page-locked shared host memory)
#   transport  benchmarks/transport_bench.py --sweep (kernel launch shapes, host_shm rows)
#   demo     the two-engine demo with a 16k-token shared prefix, Llama-3-8B shape
#   ttft     benchmarks/ttft_bench.py (TTFT arms, overhead, plot); TTFT_ARGS="--reps 10" for more calls;
#            KVMKT_TRACE=hooks: our hooks' time per import; KVMKT_PROFILE=1: cProfile in B's hooks
#   soak     benchmarks/soak.py: >= 10k import cycles A -> B checked against R, resources at
#            start and end (timeout 420 s, so "install soak" fits one 580 s call)
#   serve    benchmarks/serve_bench.py: `vllm serve` exporter/importer/no-connector and an
#            ExampleConnector pair, driven by vLLM's own `vllm bench serve` client (<= 540 s,
#            one GPU; $OUT/serve_bench.json, serve_bench.png when matplotlib imports)
#
# Example (second transfer): bash benchmarks/gpu_session.sh install tests demo
#                            bash benchmarks/gpu_session.sh install soak
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvmkt-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SITE=/tmp/kvsite
export PYTHONPATH=$SITE:/tmp/kvmsg:$PWD
summary=()

run() {  # run <stage> <command...>: log to $OUT/<stage>.log, remember the exit code
  local stage=$1; shift
  local t0=$SECONDS
  echo "=== $stage: $*"
  "$@" 2>&1 | tee "$OUT/$stage.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-9s rc=%-3s %4ss  %s' "$stage" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$stage.log" | cut -c1-90)")")
}

for stage in "$@"; do
  case $stage in
    probe)
      if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/kvmsg .whl/*.whl
      fi
      run gpuinfo bash -c 'nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv;
        nvidia-smi topo -m; python3 -c "import torch, cuda.bindings as cb;
print(torch.__version__, torch.cuda.device_count(), cb.__version__)"'
      run transport python3 benchmarks/transport_bench.py
      ;;
    install)
      run install bash -c "bash .gpu-bundle/install-bundle.sh install &&
        python3 -m pip install -q --no-deps --no-build-isolation --target $SITE . &&
        python3 -c 'import vllm, kvmkt_connector; print(vllm.__version__)'"
      ;;
    tests)
      # per-test timeout (the first test also waits for four engines to start one after the
      # other: 200 s on a slow host): a hang shows its stacks and the run still ends
      run tests python3 -m pytest -s -q -rfE -p no:cacheprovider --timeout 300 \
        tests/gpu tests/unit/test_native.py
      ;;
    tests-shm)
      # the same engines over page-locked shared host memory (GPUs without peer access)
      df -h /dev/shm
      run tests-shm env KVMKT_GPU_TRANSPORT=host_shm python3 -m pytest -s -q -rfE -p no:cacheprovider \
        --timeout 300 tests/gpu
      ;;
    transport)
      run transport python3 benchmarks/transport_bench.py --sweep
      ;;
    demo)
      run demo python3 -m kvmkt_connector.demo --device cuda --llama8b-dummy \
        --prefix-tokens 16384 --questions 2 --workdir /tmp/kvmkt-demo
      mkdir -p "$OUT/logs"
      for f in /tmp/kvmkt-demo/engine-*.log; do cp "$f" "$OUT/logs/demo-$(basename "$f")"; done
      ;;
    ttft)
      run ttft python3 benchmarks/ttft_bench.py --out "$OUT" ${TTFT_ARGS:-}
      if [ -n "${KVMKT_TRACE:-}${KVMKT_PROFILE:-}" ] && [ "${KVMKT_TRACE:-}" != 0 ]; then
        floor_log="$OUT/logs/ttft-engine-F.log"; [ -f "$floor_log" ] || floor_log=""
        run breakdown python3 benchmarks/trace_breakdown.py "$OUT/ttft.log" "$OUT/logs/ttft-engine-B.log" $floor_log
      fi
      if [ -n "${KVMKT_PROFILE:-}" ]; then  # cProfile inside B's hooks (logs.HookTimes)
        run profile python3 -c "import glob, pstats
for f in sorted(glob.glob('$OUT/profile-B/*.pstats')):
    print('==', f); pstats.Stats(f).sort_stats('tottime').print_stats(35)"
      fi
      ;;
    soak)
      run soak timeout -k 10 ${SOAK_TIMEOUT_S:-420} python3 benchmarks/soak.py \
        --cycles ${SOAK_CYCLES:-10000} --deadline-s $(( ${SOAK_TIMEOUT_S:-420} - 40 )) \
        --workdir /tmp/kvmkt-soak
      mkdir -p "$OUT/logs"
      for f in /tmp/kvmkt-soak/engine-*.log; do cp "$f" "$OUT/logs/soak-$(basename "$f")"; done
      ;;
    serve)
      run serve python3 benchmarks/serve_bench.py --out "$OUT"
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done

# At most 8 files come back: engine logs and reports travel as one tarball.
if [ -d "$OUT/logs" ]; then tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"; fi
echo
echo "== gpu_session summary =="
printf '%s\n' "${summary[@]}"
