#!/usr/bin/env bash
# One command for a lent GPU machine (no network, no TensorRT needed): checks the TokenSelect CUDA kernels.
#
# Usage: scripts/gpu_check.sh [--out DIR] [--archs 90] [--pytest-args "..."] [--timeout SECONDS] [--quick]
#
#   1. builds the kernels-only library (plugins/CMakeLists.txt, FASTV_KERNELS_ONLY=ON: kernels + host code +
#      C API, no TensorRT headers) for this GPU's compute capability (nvidia-smi / torch; --archs overrides);
#   2. runs tests/test_plugin_kernels_gpu.py against it (FASTV_KERNELS_LIB), the timing table included
#      (--quick: a subset: the scores, padding, malformed rows, streams, graphs and the timing table);
#   3. builds plugins/tests/c_api_driver.cpp (a small C++ driver of the C API) and, if compute-sanitizer is
#      installed, runs it under memcheck, racecheck, initcheck and synccheck;
#   4. prints the timing table again on its own (tests/test_plugin_kernels_gpu.py::test_timing_table...).
# Everything goes to ONE file, DIR/gpu_check.txt (DIR: --out, else $OUT when set, else build/gpu_check), and a
# summary line per step at its end. Exit status: 0 when every step that ran passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

out_dir="${OUT:-$root/build/gpu_check}"
archs="${FASTV_CUDA_ARCHS:-}"
pytest_args=""
step_timeout="${GPU_CHECK_TIMEOUT:-420}"
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out_dir="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --pytest-args) pytest_args="$2"; shift 2 ;;
    --timeout) step_timeout="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out_dir"
report="$out_dir/gpu_check.txt"
build="$out_dir/kernels-build"
: > "$report"
summary=()
status=0

log() { echo "$*" | tee -a "$report"; }
# run LABEL CMD...: output appended to the report, a summary line kept
run() {
  local label="$1"; shift
  log ""
  log "==== $label: $*"
  local start rc
  start=$(date +%s)
  timeout "$step_timeout" "$@" >> "$report" 2>&1
  rc=$?
  log "==== $label: exit $rc after $(( $(date +%s) - start )) s"
  summary+=("$label: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)")")
  [ $rc -eq 0 ] || status=1
  return $rc
}

py="python3"
[ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/bin/nvcc; do
    if [ -x "$c" ]; then export CUDACXX="$c"; break; fi
  done
fi
nvcc="${CUDACXX:-$(command -v nvcc || true)}"

log "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $root (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
log "---- machine"
{ nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,memory.free --format=csv 2>&1 || echo "nvidia-smi: not available"
  [ -n "$nvcc" ] && "$nvcc" --version | tail -2 || echo "nvcc: not found"
  cmake --version 2>&1 | head -1
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo "compute-sanitizer: not found"
} >> "$report" 2>&1

# ---------------------------------------------------------------------------------------- 1. the library
if [ -z "$archs" ]; then
  archs="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
fi
if [ -z "$archs" ]; then
  archs="$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")' 2>/dev/null)"
fi
if [ -z "$archs" ]; then
  log "gpu_check.sh: cannot tell the GPU's compute capability (no nvidia-smi, no torch CUDA): pass --archs"
  exit 1
fi
lib="$build/libfastv_ts_kernels.so"
if run "build (kernels only, sm_$archs)" bash -c "cmake -S plugins -B '$build' -DCMAKE_BUILD_TYPE=Release \
      -DFASTV_KERNELS_ONLY=ON -DTENSORRT_INCLUDE_DIR='$out_dir/no-tensorrt' -DFASTV_CUDA_ARCHS='$archs' \
      && cmake --build '$build' -j $(nproc 2>/dev/null || echo 4)"; then
  export FASTV_KERNELS_LIB="$lib"
else
  log "gpu_check.sh: the kernels-only build failed; nothing else can run"
  printf '%s\n' "" "---- summary" "${summary[@]}" | tee -a "$report"
  exit 1
fi

# ---------------------------------------------------------------------------------------- 2. kernel tests
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  log "WARNING: torch sees no CUDA GPU: the kernel tests and the timing table will be SKIPPED (not a pass)"
  summary+=("WARNING: no GPU visible to torch, GPU tests skipped")
  status=1
fi
tests="tests/test_plugin_kernels_gpu.py"
if [ "$quick" -eq 1 ] && [ -z "$pytest_args" ]; then
  run "kernel tests (quick)" "$py" -m pytest -q -p no:cacheprovider -rfEs "$tests" -k \
      "(scores_match_the_reference and fp32) or right_padding or malformed or nothing_kept or stream or graph or r0_keep0 or fewer_query or padded_candidates"
else
  # shellcheck disable=SC2086
  run "kernel tests" "$py" -m pytest -q -p no:cacheprovider -rfEs "$tests" -k "not timing" $pytest_args
fi

# ---------------------------------------------------------------------------------------- 3. compute-sanitizer
driver="$build/c_api_driver"
if run "driver build" "$nvcc" -std=c++17 -O1 -arch="sm_${archs%%;*}" -o "$driver" plugins/tests/c_api_driver.cpp \
      -L"$build" -lfastv_ts_kernels -Xlinker "-rpath=$build"; then
  run "driver (no sanitizer)" "$driver"
  sanitizer="$(command -v compute-sanitizer || true)"
  [ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
  if [ -n "$sanitizer" ]; then
    for tool in memcheck racecheck initcheck synccheck; do
      run "compute-sanitizer $tool" "$sanitizer" --tool "$tool" --error-exitcode 99 "$driver"
    done
  else
    log "compute-sanitizer not found: sanitizer runs skipped"
    summary+=("compute-sanitizer: SKIPPED (not installed)")
  fi
fi

# ---------------------------------------------------------------------------------------- 4. timing table
run "timing table" "$py" -m pytest -q -p no:cacheprovider -s "$tests" -k timing

printf '%s\n' "" "---- summary (sm_$archs, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))" \
  "${summary[@]}" | tee -a "$report"
echo "gpu_check.sh: report in $report"
exit $status
