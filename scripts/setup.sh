#!/usr/bin/env bash
# Create .venv and install fastv-export with the extras named in $1 (default: none).
# torch 2.13.0 first: on the project's CPU machines it installs from local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
if [ -n "$extras" ]; then python -m pip install -q -e ".[$extras]"; else python -m pip install -q -e .; fi
