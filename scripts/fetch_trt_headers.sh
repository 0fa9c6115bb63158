#!/usr/bin/env bash
# Print the folder of the TensorRT headers (NvInfer.h, NvInferRuntime.h) to build against; fetch them
# when none is given. Used by build_plugin.sh and build_runtime.sh.
#
# Usage: scripts/fetch_trt_headers.sh [--tensorrt-include DIR]
#
# First match wins:
#   --tensorrt-include DIR | $TENSORRT_INCLUDE_DIR   a folder holding NvInfer.h / NvInferRuntime.h
#   $TensorRT_ROOT                                   a TensorRT install (its include/ holds the headers)
#   otherwise                                        the TensorRT 10.14 public headers of the PyPI wheel
#                                                    kernel-lens==2.0.1, fetched once into .third_party/
#                                                    (sha256-checked, never committed)
# The last line printed (stdout) is the folder; messages go to stderr (prefixed with
# $FASTV_TRT_HEADERS_CALLER, default fetch_trt_headers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
me="${FASTV_TRT_HEADERS_CALLER:-fetch_trt_headers.sh}"

trt_include="${TENSORRT_INCLUDE_DIR:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --tensorrt-include) trt_include="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "fetch_trt_headers.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

KL_VERSION="2.0.1"
KL_SHA256="07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
if [ -z "$trt_include" ] && [ -n "${TensorRT_ROOT:-}" ]; then
  trt_include="$TensorRT_ROOT/include"
fi
if [ -z "$trt_include" ]; then
  trt_include="$root/.third_party/tensorrt-10.14/include"
  if [ ! -f "$trt_include/NvInferRuntime.h" ]; then
    py="python3"
    [ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
    py="${FASTV_PIP_PYTHON:-$py}"     # a Python with pip (set by the wheel's build step, whose own has none)
    wheels="$root/.third_party/wheels"
    mkdir -p "$wheels"
    echo "$me: fetching the TensorRT 10.14 headers (PyPI wheel kernel-lens==$KL_VERSION)" >&2
    "$py" -m pip download -q --no-deps --only-binary=:all: "kernel-lens==$KL_VERSION" -d "$wheels" >&2
    "$py" - "$wheels/kernel_lens-$KL_VERSION-py3-none-any.whl" "$KL_SHA256" "$trt_include" "$me" <<'PY'
import hashlib, pathlib, sys, zipfile
wheel, want, dest, me = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4]
got = hashlib.sha256(wheel.read_bytes()).hexdigest()
if got != want:
    sys.exit(f"{me}: {wheel.name} has sha256 {got}, expected {want}; delete it and retry")
prefix = "kernel_lens/include/tensorrt/"
tmp = dest.with_name(dest.name + ".tmp")
tmp.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".h")]
    for n in names:
        (tmp / n[len(prefix):]).write_bytes(z.read(n))
if not (tmp / "NvInferRuntime.h").is_file():
    sys.exit(f"{me}: {wheel.name} holds no {prefix}NvInferRuntime.h")
tmp.replace(dest)
PY
  fi
fi
if [ ! -f "$trt_include/NvInferRuntime.h" ]; then
  echo "$me: no NvInferRuntime.h in '$trt_include': point TENSORRT_INCLUDE_DIR or TensorRT_ROOT at your TensorRT" >&2
  exit 2
fi
echo "$trt_include"
