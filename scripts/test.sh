#!/usr/bin/env bash
# The test suite (tiny in-memory models, plus a few tests on the real bundled model).
# Extra arguments go to pytest (e.g. -m "not bundled" to skip the real-model tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
