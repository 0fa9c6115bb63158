#!/usr/bin/env bash
# Build the C++ runtime (runtime/: libfastv_runtime, fastv-run, unit tests) with CMake and run its ctest.
#
# Usage: scripts/build_runtime.sh [--build-dir DIR] [--tensorrt-include DIR] [--with-tensorrt ON|OFF|AUTO]
#                                 [--jobs N] [--no-deps] [--clean] [--sanitize]
#
# --sanitize: AddressSanitizer + UndefinedBehaviorSanitizer build (FASTV_SANITIZE=ON; use its own --build-dir)
# of the library, fastv-run and the unit tests, without the cpu executor (its embedded Python interpreter is not
# built for the sanitizers) and, unless --with-tensorrt says otherwise, without the TensorRT executor.
#
# Prerequisites (installed here unless --no-deps): cmake, a C++17 compiler, nlohmann-json3-dev, libssl-dev,
# libicu-dev, libpng-dev, libjpeg-dev (libjpeg-turbo) and libvalijson-dev (apt-get, when available: run as root),
# pybind11 (pip, into .venv or the python3 found) for the cpu executor, which runs the graphs in the onnxruntime
# Python package embedded in fastv-run.
# TensorRT: the executor is always compiled against the TensorRT headers (scripts/fetch_trt_headers.sh:
# --tensorrt-include, $TENSORRT_INCLUDE_DIR, $TensorRT_ROOT, else the fetched 10.14 headers) and linked
# when libnvinfer is found ($TensorRT_ROOT/lib, $TENSORRT_LIB_DIR or the system paths; Jetson: JetPack's).
# The last line printed is the path of fastv-run.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

build_dir="build/runtime"
trt_include="${TENSORRT_INCLUDE_DIR:-}"
with_trt="${FASTV_WITH_TENSORRT:-}"
jobs="${FASTV_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
deps=1
clean=0
sanitize=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir="$2"; shift 2 ;;
    --tensorrt-include) trt_include="$2"; shift 2 ;;
    --with-tensorrt) with_trt="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --no-deps) deps=0; shift ;;
    --clean) clean=1; shift ;;
    --sanitize) sanitize=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "build_runtime.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

[ -z "$with_trt" ] && { [ "$sanitize" -eq 1 ] && with_trt=OFF || with_trt=AUTO; }

py="python3"
[ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"

# ------------------------------------------------------------------------------------- prerequisites
if [ "$deps" -eq 1 ]; then
  missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v c++ >/dev/null 2>&1 || missing+=(g++)
  [ -f /usr/include/nlohmann/json.hpp ] || [ -f /usr/local/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
  [ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
  [ -f /usr/include/unicode/regex.h ] || missing+=(libicu-dev)
  [ -f /usr/include/png.h ] || missing+=(libpng-dev)
  # libjpeg-dev: libjpeg-turbo's headers (Debian: libjpeg62-turbo-dev; Ubuntu / JetPack: libjpeg-turbo8-dev)
  [ -f /usr/include/jpeglib.h ] || ls /usr/include/*/jpeglib.h >/dev/null 2>&1 || missing+=(libjpeg-dev)
  [ -f /usr/include/valijson/validator.hpp ] || [ -f /usr/local/include/valijson/validator.hpp ] ||
    missing+=(libvalijson-dev)
  if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
      echo "build_runtime.sh: apt-get install ${missing[*]}" >&2
      (apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") >&2
    else
      echo "build_runtime.sh: missing ${missing[*]}: install them (Debian/Ubuntu: apt-get install ${missing[*]})" >&2
      exit 2
    fi
  fi
  if ! "$py" -c "import pybind11" >/dev/null 2>&1; then
    echo "build_runtime.sh: pip install pybind11 (cpu executor)" >&2
    "$py" -m pip install -q pybind11 >&2 ||
      echo "build_runtime.sh: pybind11 not installed: the cpu executor is left out" >&2
  fi
fi

# ----------------------------------------------------------------------------------- TensorRT headers
if [ "$with_trt" != "OFF" ]; then
  trt_include="$(FASTV_TRT_HEADERS_CALLER=build_runtime.sh bash scripts/fetch_trt_headers.sh \
                 ${trt_include:+--tensorrt-include "$trt_include"})"
fi

# --------------------------------------------------------------------------------------------- build
[ "$clean" -eq 1 ] && rm -rf "$build_dir"
cmake_args=(-S runtime -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "-DFASTV_WITH_TENSORRT=$with_trt"
            "-DPython3_EXECUTABLE=$(command -v "$py")")
if [ "$with_trt" != "OFF" ]; then
  cmake_args+=("-DTENSORRT_INCLUDE_DIR=$trt_include")
  # the compile check also needs the CUDA runtime headers: required wherever a CUDA toolkit is installed
  if command -v nvcc >/dev/null 2>&1 || [ -f /usr/local/cuda/include/cuda_runtime_api.h ]; then
    cmake_args+=(-DFASTV_REQUIRE_TRT_HEADERS=ON)
  else
    echo "build_runtime.sh: no CUDA toolkit found: the TensorRT executor is not compiled" >&2
  fi
fi
[ "$sanitize" -eq 1 ] && cmake_args+=(-DFASTV_SANITIZE=ON -DFASTV_WITH_ORT_PYTHON=OFF)
[ -n "${TENSORRT_LIB_DIR:-}" ] && cmake_args+=("-DTENSORRT_LIB_DIR=$TENSORRT_LIB_DIR")
start=$(date +%s)
cmake "${cmake_args[@]}" >&2
cmake --build "$build_dir" -j "$jobs" >&2
(cd "$build_dir" && ctest --output-on-failure >&2)
echo "build_runtime.sh: built in $(( $(date +%s) - start )) s" >&2
exe="$root/$build_dir/fastv-run"
case "$build_dir" in /*) exe="$build_dir/fastv-run" ;; esac
[ -x "$exe" ] || { echo "build_runtime.sh: $exe was not produced" >&2; exit 1; }
echo "$exe"
