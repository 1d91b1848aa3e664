#!/usr/bin/env bash
# Set up a fresh CPU machine (idempotent) and run lint + the whole test suite on real vLLM engines.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_cpu_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
