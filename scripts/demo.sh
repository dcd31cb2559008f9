#!/usr/bin/env bash
# The whole ESSA pipeline on the bundled SmolLM2-135M-Instruct: SFT -> ESSA -> test accuracy.
# Extra arguments go to `essa demo` (e.g. output_dir=runs/demo2 essa.popsize=16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/essa demo "$@"
