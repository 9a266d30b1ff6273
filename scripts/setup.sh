#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the CPU build of torch and this package.
# `pip install torch==2.13.0` takes the CPU wheel that lies on disk on our machines; it must come
# before the package so pip never resolves a (multi-GB) CUDA build for the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.refine-more-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.2,<2.15" --index-url https://download.pytorch.org/whl/cpu
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
