#!/usr/bin/env bash
# Build libfastv_plugins.so (plugins/: the fastv::TokenSelect TensorRT plugin) with CMake + nvcc.
#
# Usage: scripts/build_plugin.sh [--build-dir DIR] [--archs "86;89"] [--tensorrt-include DIR] [--jobs N] [--clean]
#
# TensorRT headers, first match wins:
#   --tensorrt-include DIR | $TENSORRT_INCLUDE_DIR   a folder holding NvInfer.h / NvInferRuntime.h
#   $TensorRT_ROOT                                   a TensorRT install (its include/ holds the headers)
#   otherwise                                        the TensorRT 10.14 public headers of the PyPI wheel
#                                                    kernel-lens==2.0.1, fetched once into .third_party/
#                                                    (sha256-checked, never committed)
# CUDA targets: --archs or $FASTV_CUDA_ARCHS (e.g. "87" for Jetson Orin, "86;89" for a quick CI build);
# default: the broad list of plugins/CMakeLists.txt (data center, RTX, Jetson) that this nvcc supports.
# The last line printed is the path of the library.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

build_dir="build/plugins"
archs="${FASTV_CUDA_ARCHS:-}"
trt_include="${TENSORRT_INCLUDE_DIR:-}"
jobs="${FASTV_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
clean=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --tensorrt-include) trt_include="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --clean) clean=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build_plugin.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# --------------------------------------------------------------------------------- the TensorRT headers
# (scripts/fetch_trt_headers.sh: --tensorrt-include, $TensorRT_ROOT, else the fetched 10.14 headers)
trt_include="$(FASTV_TRT_HEADERS_CALLER=build_plugin.sh bash scripts/fetch_trt_headers.sh \
               ${trt_include:+--tensorrt-include "$trt_include"})"

# --------------------------------------------------------------------------------------------- nvcc
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/bin/nvcc; do
    if [ -x "$c" ]; then export CUDACXX="$c"; break; fi
  done
fi

# --------------------------------------------------------------------------------------------- build
[ "$clean" -eq 1 ] && rm -rf "$build_dir"
cmake_args=(-S plugins -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "-DTENSORRT_INCLUDE_DIR=$trt_include"
            "-DFASTV_CUDA_ARCHS=$archs")
start=$(date +%s)
cmake "${cmake_args[@]}" >&2
cmake --build "$build_dir" -j "$jobs" >&2
echo "build_plugin.sh: built in $(( $(date +%s) - start )) s (archs: ${archs:-default})" >&2
lib="$root/$build_dir/libfastv_plugins.so"
case "$build_dir" in /*) lib="$build_dir/libfastv_plugins.so" ;; esac
[ -f "$lib" ] || { echo "build_plugin.sh: $lib was not produced" >&2; exit 1; }
echo "$lib"
