#!/usr/bin/env bash
# One-command setup on a fresh machine: a venv in .venv with the pinned stack and the package.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch first, pinned, so nothing below pulls another build
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -r requirements.txt
# class names / prompt templates ship as JSON in clip_benchmark; its own dependencies are not needed
.venv/bin/python -m pip install -q --no-deps clip-benchmark==1.6.2
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import residual_fast, torch, open_clip; print('residual_fast', residual_fast.__version__, 'torch', torch.__version__, 'open_clip', open_clip.__version__)"
