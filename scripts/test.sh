#!/usr/bin/env bash
# Set everything up and run the linter and the whole test suite on the real demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check phi3cli tests scripts benchmarks
.venv/bin/ruff format --check phi3cli tests scripts benchmarks
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
