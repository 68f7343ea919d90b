#!/usr/bin/env bash
# Set everything up, build the offline demo model (once) and stream an answer from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/phi3 chat --model demo "${@:-What is the capital of France?}"
