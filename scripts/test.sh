#!/usr/bin/env bash
# Set up (.venv with the dev, TensorRT-RTX and quantize (NVIDIA ModelOpt) extras) and run the whole test suite,
# one pytest-xdist worker per core (exported bundles, the plugin and the C++ runtime are made once per run and shared).
# Tests marked `gpu` are reported as skipped ("not run") on machines without an NVIDIA GPU.
# Arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` (the fast loop) or `-n 0` (one process).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,trt,quantize || { echo "setup failed" >&2; exit 1; }
. .venv/bin/activate
python -m pytest -q -rs -n auto "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5)" >&2
fi
exit "$rc"
