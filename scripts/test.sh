#!/usr/bin/env bash
# Set up (.venv with the dev and TensorRT-RTX extras) and run the whole test suite.
# Tests marked `gpu` are reported as skipped ("not run") on machines without an NVIDIA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,trt || { echo "setup failed" >&2; exit 1; }
. .venv/bin/activate
python -m pytest -q -rs "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5)" >&2
fi
exit "$rc"
