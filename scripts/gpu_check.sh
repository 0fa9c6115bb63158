#!/usr/bin/env bash
# The one command for any GPU machine (no network needed): the TokenSelect CUDA kernels, the PyTorch reference
# FastV at 7B sizes, and -- where TensorRT 10's Python bindings import -- engines run against ONNX Runtime.
#
# Usage: scripts/gpu_check.sh [--out DIR] [--archs 90] [--pytest-args "..."] [--timeout SECONDS] [--quick]
#                             [--bench-args "..."] [--no-bench] [--no-tensorrt] [--dry-run]
#
#   1. builds the kernels-only library (plugins/CMakeLists.txt, FASTV_KERNELS_ONLY=ON: kernels + host code +
#      C API, no TensorRT headers) for this GPU's compute capability (nvidia-smi / torch; --archs overrides);
#   2. runs tests/test_plugin_kernels_gpu.py against it (FASTV_KERNELS_LIB), the timing table included
#      (--quick: a subset: the scores, padding, malformed rows, streams, graphs and the timing table);
#   3. builds plugins/tests/c_api_driver.cpp (a small C++ driver of the C API) and, if compute-sanitizer is
#      installed, runs it under memcheck, racecheck, initcheck and synccheck;
#   4. prints the timing table again on its own (tests/test_plugin_kernels_gpu.py::test_timing_table...);
#   5. scripts/bench_gpu.py: the PyTorch reference FastV at LLaVA-1.5-7B / Qwen2.5-VL-7B sizes, random bf16
#      weights made on the GPU, the TokenSelect kernels of step 1 timed on layer K-1 (<= 6 minutes on an H100;
#      its table: DIR/bench/bench_gpu.md, .json, .png; --bench-args adds arguments, --no-bench skips it);
#   6. where `import tensorrt` gives TensorRT 10 (else skipped, said so): a tiny-llava bundle exported, its
#      engines built (`fastv-export build --backend tensorrt`), `fastv-export validate --runner tensorrt`, then
#      fastv-run built with the TensorRT executor and `fastv-run --executor trt` on the inputs of
#      `fastv-export run` (ONNX Runtime): tokens and kept positions compared (scripts/compare_tokens.py).
#      TensorRT's headers and libnvinfer: $TensorRT_ROOT, or $TENSORRT_INCLUDE_DIR / $TENSORRT_LIB_DIR.
# --dry-run prints the steps it would run (on any machine, GPU or not) and runs nothing, writes nothing.
# Everything goes to ONE file, DIR/gpu_check.txt (DIR: --out, else $OUT when set, else build/gpu_check), and a
# summary line per step at its end. Exit status: 0 when every step that ran passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

out_dir="${OUT:-$root/build/gpu_check}"
archs="${FASTV_CUDA_ARCHS:-}"
pytest_args=""
bench_args=""
step_timeout="${GPU_CHECK_TIMEOUT:-420}"
quick=0
bench=1
tensorrt=1
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out_dir="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --pytest-args) pytest_args="$2"; shift 2 ;;
    --bench-args) bench_args="$2"; shift 2 ;;
    --timeout) step_timeout="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --no-bench) bench=0; shift ;;
    --no-tensorrt) tensorrt=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
report="$out_dir/gpu_check.txt"
build="$out_dir/kernels-build"
if [ "$dry_run" -eq 1 ]; then
  report=/dev/null
else
  mkdir -p "$out_dir"
  : > "$report"
fi
summary=()
status=0

log() { echo "$*" | tee -a "$report"; }
# a command line as a shell would read it back (quotes only where needed)
quote() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then out+=("$a")
    elif [[ "$a" != *"'"* ]]; then out+=("'$a'")
    else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}
# run [--stdout FILE] LABEL CMD...: output appended to the report (stdout to FILE if given), a summary line kept;
# with --dry-run: the command printed, nothing run
run() {
  local to=""
  if [ "$1" = "--stdout" ]; then to="$2"; shift 2; fi
  local label="$1"; shift
  if [ "$dry_run" -eq 1 ]; then
    echo "[$label] $(quote "$@")${to:+ > $(quote "$to")}"
    summary+=("$label: would run")
    return 0
  fi
  log ""
  log "==== $label: $*${to:+ > $to}"
  local start rc
  start=$(date +%s)
  if [ -n "$to" ]; then
    timeout "$step_timeout" "$@" > "$to" 2>> "$report"
  else
    timeout "$step_timeout" "$@" >> "$report" 2>&1
  fi
  rc=$?
  log "==== $label: exit $rc after $(( $(date +%s) - start )) s"
  summary+=("$label: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)")")
  [ $rc -eq 0 ] || status=1
  return $rc
}
finish() {
  local gpu
  gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  printf '%s\n' "" "---- summary (sm_$archs${gpu:+, $gpu})" \
    "${summary[@]}" | tee -a "$report"
  [ "$dry_run" -eq 1 ] && echo "gpu_check.sh: dry run: nothing was run" || echo "gpu_check.sh: report in $report"
  exit $status
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
[ "$dry_run" -eq 1 ] && log "dry run: the steps below are printed, not run"
log "---- machine"
{ { command -v nvidia-smi >/dev/null \
      && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,memory.free --format=csv; } \
    || echo "nvidia-smi: not available"
  [ -n "$nvcc" ] && "$nvcc" --version | tail -2 || echo "nvcc: not found"
  cmake --version 2>&1 | head -1
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
  "$py" -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo "compute-sanitizer: not found"
} 2>&1 | if [ "$dry_run" -eq 1 ]; then cat; else cat >> "$report"; fi

# the kernel tests and the TensorRT steps import the project: a bare machine gets the checkout installed (editable,
# no dependencies, nothing downloaded); scripts/bench_gpu.py runs from the checkout either way
if ! "$py" -c 'import fastv_export.graphs' >/dev/null 2>&1; then
  run "install the checkout (pip -e, no dependencies, offline)" "$py" -m pip install --no-deps --no-build-isolation \
      --no-index -q -e "$root"
fi

# ---------------------------------------------------------------------------------------- 1. the library
if [ -z "$archs" ]; then
  archs="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
fi
if [ -z "$archs" ] && [ "$dry_run" -eq 0 ]; then
  archs="$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")' 2>/dev/null)"
fi
if [ -z "$archs" ] && [ "$dry_run" -eq 1 ]; then
  archs=90
  log "no GPU visible: the dry run shows sm_$archs (an H100; a real run asks nvidia-smi / torch, or takes --archs)"
fi
if [ -z "$archs" ]; then
  log "gpu_check.sh: cannot tell the GPU's compute capability (no nvidia-smi, no torch CUDA): pass --archs"
  exit 1
fi
lib="$build/libfastv_ts_kernels.so"
kernels=0
if run "configure (kernels only, sm_$archs)" cmake -S plugins -B "$build" -DCMAKE_BUILD_TYPE=Release \
      -DFASTV_KERNELS_ONLY=ON -DTENSORRT_INCLUDE_DIR="$out_dir/no-tensorrt" "-DFASTV_CUDA_ARCHS=$archs" \
   && run "build (kernels only)" cmake --build "$build" -j "$(nproc 2>/dev/null || echo 4)"; then
  export FASTV_KERNELS_LIB="$lib"
  kernels=1
else
  log "gpu_check.sh: the kernels-only build failed: the kernel steps are skipped, the benchmark runs without them"
fi

if [ "$kernels" -eq 1 ]; then
  # -------------------------------------------------------------------------------------- 2. kernel tests
  if [ "$dry_run" -eq 0 ] && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
      >/dev/null 2>&1; then
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

  # -------------------------------------------------------------------------------------- 3. compute-sanitizer
  driver="$build/c_api_driver"
  if run "driver build" "$nvcc" -std=c++17 -O1 -arch="sm_${archs%%;*}" -o "$driver" plugins/tests/c_api_driver.cpp \
        -L"$build" -lfastv_ts_kernels -Xlinker "-rpath=$build"; then
    run "driver (no sanitizer)" "$driver"
    sanitizer="$(command -v compute-sanitizer || true)"
    [ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
    [ -z "$sanitizer" ] && [ "$dry_run" -eq 1 ] && sanitizer=compute-sanitizer      # shown where it is installed
    if [ -n "$sanitizer" ]; then
      for tool in memcheck racecheck initcheck synccheck; do
        run "compute-sanitizer $tool" "$sanitizer" --tool "$tool" --error-exitcode 99 "$driver"
      done
    else
      log "compute-sanitizer not found: sanitizer runs skipped"
      summary+=("compute-sanitizer: SKIPPED (not installed)")
    fi
  fi

  # -------------------------------------------------------------------------------------- 4. timing table
  run "timing table" "$py" -m pytest -q -p no:cacheprovider -s "$tests" -k timing
fi

# ---------------------------------------------------------------------------------------- 5. PyTorch benchmark
if [ "$bench" -eq 1 ]; then
  bench_cmd=("$py" scripts/bench_gpu.py --out "$out_dir/bench")
  [ "$kernels" -eq 1 ] && bench_cmd+=(--kernels-lib "$lib")
  # shellcheck disable=SC2206
  [ -n "$bench_args" ] && bench_cmd+=($bench_args)
  run "PyTorch benchmark (7B shapes)" "${bench_cmd[@]}"      # its table lands in the report too
else
  summary+=("PyTorch benchmark: SKIPPED (--no-bench)")
fi

# ---------------------------------------------------------------------------------------- 6. TensorRT 10
trt_version="$("$py" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null)"
fx=("$py" -m fastv_export.cli)
trt="$out_dir/tensorrt"
bundle="$trt/bundle"
steps=16
if [ "$tensorrt" -eq 0 ]; then
  summary+=("TensorRT: SKIPPED (--no-tensorrt)")
elif [[ "$trt_version" != 10.* ]] && [ "$dry_run" -eq 0 ]; then
  log ""
  log "TensorRT 10 Python bindings not found (import tensorrt: ${trt_version:-failed}): TensorRT steps SKIPPED"
  summary+=("TensorRT: SKIPPED (no TensorRT 10 Python bindings; not a pass)")
else
  [ "$dry_run" -eq 1 ] && log "TensorRT 10 here: ${trt_version:-no (import tensorrt fails)}; where it imports:"
  if [ -z "${TENSORRT_LIB_DIR:-}" ] && [ -z "${TensorRT_ROOT:-}" ]; then   # the pip wheel's libraries, if any
    libs="$("$py" -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))' 2>/dev/null)"
    [ -n "$libs" ] && export TENSORRT_LIB_DIR="$libs"
  fi
  [ "$dry_run" -eq 0 ] && mkdir -p "$trt"
  if run "tensorrt: export tiny-llava" "${fx[@]}" export --model tiny-llava --out "$bundle" --force \
     && run "tensorrt: build engines" "${fx[@]}" build "$bundle" --backend tensorrt --max-batch 3 --max-prompt 192 \
          --max-new-tokens 32; then
    run "tensorrt: validate (TensorRT runner)" "${fx[@]}" validate "$bundle" --runner tensorrt --batch-sizes 1,3 \
        --max-new-tokens "$steps" --report-dir "$trt/validation"
    run "tensorrt: an image" "$py" -c "import sys, numpy as np; from PIL import Image; Image.fromarray((np.random.\
default_rng(0).random((56, 56, 3)) * 255).astype(np.uint8)).save(sys.argv[1])" "$trt/image.png"
    run --stdout "$trt/onnxruntime.json" "tensorrt: ONNX Runtime tokens + fastv-run inputs" "${fx[@]}" run "$bundle" \
        --image "$trt/image.png" --prompt "what is in the image ?" --max-new-tokens "$steps" --json \
        --dump-inputs "$trt/inputs"
    if run "tensorrt: build fastv-run" bash scripts/build_runtime.sh --build-dir "$trt/runtime" --with-tensorrt ON \
          --no-deps --jobs "$(nproc 2>/dev/null || echo 4)"; then
      run --stdout "$trt/tensorrt.json" "tensorrt: fastv-run --executor trt" "$trt/runtime/fastv-run" \
          --bundle "$bundle" --inputs "$trt/inputs" --executor trt --max-new-tokens "$steps" --json
      run "tensorrt: tokens equal ONNX Runtime's" "$py" scripts/compare_tokens.py "$trt/onnxruntime.json" \
          "$trt/tensorrt.json" --labels onnxruntime,tensorrt
    fi
  fi
fi

finish
