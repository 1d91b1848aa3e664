#!/usr/bin/env bash
# Set up a fresh CPU machine (idempotent) and run the two-engine demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_cpu_env.sh
exec .venv/bin/python -m kvmkt_connector.demo "$@"
