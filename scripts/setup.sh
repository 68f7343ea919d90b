#!/usr/bin/env bash
# Create .venv and install phi3 with every extra that installs on this platform.
# torch is installed first, pinned, so pip keeps the CPU build where one is available
# instead of resolving a multi-GB CUDA build for transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "${PHI3_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all,serve,plot,test]"
