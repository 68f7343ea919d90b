#!/usr/bin/env bash
# Set everything up and run the linter and the whole test suite on the real demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check phi3cli tests scripts benchmarks
.venv/bin/ruff format --check phi3cli tests scripts benchmarks
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
    # The image-placement check against transformers' processor, in a process of its own with torchvision on the
    # path (it skips in the run above, where torchvision is absent; see scripts/setup.sh).
    PYTHONPATH=.venv/side exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_vision_placement.py
fi
