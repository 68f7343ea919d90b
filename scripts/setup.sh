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
# For tests/test_vision_placement.py only: transformers' Phi-4-multimodal image processor needs torchvision, and
# PyPI's build for torch 2.13 links the CUDA build of torch. Installed in .venv it would break optimum-intel's
# exporter, so it goes beside it (.venv/side), and scripts/test.sh puts it on the path of that test's own run.
[ -d .venv/side/torchvision ] || .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    --target .venv/side "${PHI3_TORCHVISION:-torchvision==0.28.0}"
