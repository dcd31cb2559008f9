#!/usr/bin/env bash
# Create .venv (once) and install essa with its test tools. Safe to re-run: it only installs
# what is missing. CPU PyTorch is pinned first so no multi-GB CUDA build is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import essa, torch, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.essa-installed ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[test]"
    touch .venv/.essa-installed
fi
