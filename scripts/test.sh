#!/usr/bin/env bash
# Set everything up and run the linter and the whole test suite on the real demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite converts the demo model many times over and peaks at several GB on disk: say what is free up front,
# so a run that fills the disk is read as that, not as a failing test.
df -h . "${TMPDIR:-/tmp}" | awk 'NR == 1 || !seen[$0]++' | sed 's/^/disk: /'
bash scripts/setup.sh
.venv/bin/ruff check phi3cli tests scripts benchmarks
.venv/bin/ruff format --check phi3cli tests scripts benchmarks
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
    # The image-placement check against transformers' processor, in a process of its own with torchvision on the
    # path (it skips in the run above, where torchvision is absent; see scripts/setup.sh).
    PYTHONPATH=.venv/side exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_vision_placement.py
fi
