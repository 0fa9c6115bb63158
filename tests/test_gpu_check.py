"""scripts/gpu_check.sh, the one command for a GPU machine, checked on the CPU: its --dry-run lists every step
with command lines that parse, the PyTorch GPU benchmark (scripts/bench_gpu.py) runs its whole code path at tiny
sizes (ratios against independent formulas written here), and scripts/compare_tokens.py tells equal generations
from different ones. Nothing here needs a GPU; nothing here says anything about GPU timings."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _load(name: str):
    """scripts/NAME.py as a module (registered under a private name: its dataclasses need it)."""
    key = f"_gpu_check_scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """One dry run (with --bench-args) for the tests of this module: its output and {step label: argv}."""
    return _dry_run(tmp_path_factory.mktemp("dry"), "--bench-args", "--repeats 2 --decode-tokens 8")


def _dry_run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *extra], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    steps = {}
    for line in proc.stdout.splitlines():
        if line.startswith("[") and "] " in line:
            label, _, command = line[1:].partition("] ")
            steps[label] = shlex.split(command)
    assert not out.exists(), "a dry run must write nothing"
    return proc, steps


def _after(argv: list[str], marker: list[str]) -> list[str]:
    """The arguments after ``marker`` (e.g. [python, -m, fastv_export.cli]), a trailing '> FILE' removed."""
    for i in range(len(argv) - len(marker) + 1):
        if argv[i:i + len(marker)] == marker:
            rest = argv[i + len(marker):]
            return rest[:rest.index(">")] if ">" in rest else rest
    raise AssertionError(f"{marker} not in {argv}")


# ------------------------------------------------------------------------------------------ --dry-run
def test_dry_run_lists_every_step_and_runs_nothing(dry_run):
    proc, steps = dry_run
    assert proc.returncode == 0, proc.stderr
    expected = ["configure (kernels only, sm_", "build (kernels only)", "kernel tests", "driver build",
                "driver (no sanitizer)", "compute-sanitizer memcheck", "compute-sanitizer synccheck", "timing table",
                "PyTorch benchmark (7B shapes)", "tensorrt: export tiny-llava", "tensorrt: build engines",
                "tensorrt: validate (TensorRT runner)", "tensorrt: ONNX Runtime tokens + fastv-run inputs",
                "tensorrt: build fastv-run", "tensorrt: fastv-run --executor trt",
                "tensorrt: tokens equal ONNX Runtime's"]
    for label in expected:
        assert any(s.startswith(label) for s in steps), f"step {label!r} missing from the dry run:\n{proc.stdout}"
    assert "dry run: nothing was run" in proc.stdout
    # where no TensorRT 10 imports (this machine), the dry run says so beside the steps it would run
    assert "TensorRT 10 here:" in proc.stdout
    # every file a step names exists in the checkout
    for rel in ("scripts/bench_gpu.py", "scripts/compare_tokens.py", "scripts/build_runtime.sh",
                "tests/test_plugin_kernels_gpu.py", "plugins/tests/c_api_driver.cpp"):
        assert any(rel in arg for argv in steps.values() for arg in argv), rel
        assert (ROOT / rel).is_file()


def test_dry_run_command_lines_parse(dry_run):
    """The fastv-export, bench_gpu.py and compare_tokens.py lines go through their own argument parsers; the
    fastv-run and build_runtime.sh options are ones those programs document."""
    from fastv_export.cli import build_parser

    proc, steps = dry_run
    cli = build_parser()
    parsed = {}
    for label, argv in steps.items():
        if "fastv_export.cli" in argv:
            args = cli.parse_args(_after(argv, ["-m", "fastv_export.cli"]))
            parsed[args.command] = args
    assert sorted(parsed) == ["build", "export", "run", "validate"]
    assert parsed["build"].backend == "tensorrt" and parsed["validate"].runner == "tensorrt"
    assert parsed["run"].runner == "onnxruntime" and parsed["run"].json and parsed["run"].dump_inputs
    assert parsed["export"].out == parsed["build"].bundle == parsed["validate"].bundle == parsed["run"].bundle
    bench = _load("bench_gpu").parse_args(_after(steps["PyTorch benchmark (7B shapes)"], ["scripts/bench_gpu.py"]))
    assert bench.repeats == 2 and bench.decode_tokens == 8 and bench.out.endswith("bench")
    assert bench.kernels_lib.endswith("libfastv_ts_kernels.so") and bench.device == "cuda" and not bench.tiny
    compare = steps["tensorrt: tokens equal ONNX Runtime's"]
    assert compare[-2:] == ["--labels", "onnxruntime,tensorrt"] and compare[-4].endswith("onnxruntime.json")
    usage = (ROOT / "runtime" / "tools" / "fastv_run.cpp").read_text()
    trt_run = steps["tensorrt: fastv-run --executor trt"]
    for opt in (a for a in trt_run if a.startswith("--")):
        assert f'"{opt}"' in usage, f"fastv-run has no option {opt}"
    assert trt_run[trt_run.index("--executor") + 1] == "trt"
    build_runtime = (ROOT / "scripts" / "build_runtime.sh").read_text()
    for opt in (a for a in steps["tensorrt: build fastv-run"] if a.startswith("--")):
        assert f"    {opt})" in build_runtime, f"build_runtime.sh has no option {opt}"


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-runn"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown argument '--dry-runn'" in proc.stderr


# ------------------------------------------------------------------------------------------ the benchmark, tiny
def _eq5(n: int, d: int, ff: int) -> int:
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * ff


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench = _load("bench_gpu")
    result = bench.main(["--device", "cpu", "--tiny", "--images", "1,2", "--repeats", "1", "--warmup", "0",
                         "--decode-tokens", "3", "--layer-repeats", "1", "--out", str(out)])
    return bench, result, out


def test_tiny_benchmark_rows_and_ratios(tiny_bench):
    bench, result, out = tiny_bench
    rows = result["rows"]
    prompts = sorted({(r["model"], r["prompt"]) for r in rows})
    assert prompts == [("llava-1.5-7b", "1 image"), ("llava-1.5-7b", "2 images"),
                       ("qwen2.5-vl-7b", "video 8 frames 112x112")]
    k, steps = 2, 3
    for r in rows:
        cfg = (bench.llava_config if r["model"].startswith("llava") else bench.qwen_config)(True).text_config
        d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        n, m = r["n"], r["image_tokens"]
        assert m == {"1 image": 64, "2 images": 128}.get(r["prompt"], 4 * 4 * 4)   # video: 4 x (112/28)^2
        if r["config"] == "unpruned":
            assert r["n_kept"] == n and r["prefill_ratio"] == 1.0 and r["authors_prefill_ms"] is None
            continue
        ratio = Fraction(r["config"].split("R=")[1])
        kept = n - m + (m - math.floor(m * ratio))
        assert r["n_kept"] == kept
        eq5 = Fraction(k * _eq5(n, d, ff) + (layers - k) * _eq5(kept, d, ff), layers * _eq5(n, d, ff))
        assert r["eq5_ratio"] == pytest.approx(float(eq5), rel=1e-12)
        kv = Fraction(sum(k * (n + t) + (layers - k) * (kept + t) for t in range(steps)),
                      sum(layers * (n + t) for t in range(steps)))
        assert r["kv_read_ratio"] == pytest.approx(float(kv), rel=1e-12)
        assert float(kv) < r["bytes_ratio"] < 1 and float(eq5) < r["exact_ratio"] < 1
        for key in ("prefill_ratio", "decode_ratio", "authors_prefill_ratio"):
            assert 0 < r[key] < 50 and math.isfinite(r[key]), (key, r)   # CPU timings: sane, not asserted further
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
        # fp32: the authors' ranking (eager weights, mean over heads, last row) keeps what the reference keeps
        assert r["authors_overlap"] == 1.0
    for lr in result["layer_k_minus_1"]:
        assert lr["sdpa_ms"] > 0 and lr["authors_ms"] > 0 and lr["reference_ranking_ms"] > 0
        # the authors' eager layer (explicit causal mask) computes what the SDPA layer computes
        assert lr["authors_max_abs_diff"] < 1e-4
        assert lr["tokenselect_ms"] is None and lr["tokenselect_note"] == "CUDA kernels need a GPU"
        assert (lr["vision_ms"] is not None) == lr["model"].startswith("llava")


def test_tiny_benchmark_writes_the_table(tiny_bench):
    _, result, out = tiny_bench
    md = (out / "bench_gpu.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| llava") or line.startswith("| qwen")]
    assert len(table) == len(result["rows"]) + len(result["layer_k_minus_1"])
    assert "| model | prompt | n | config | n' | prefill ms | prefill ratio | Eq.5 FLOPs ratio" in md
    assert "TokenSelect kernels not timed: CUDA kernels need a GPU" in md
    assert json.loads((out / "bench_gpu.json").read_text())["header"]["tiny"] is True
    assert (out / "bench_gpu.png").read_bytes()[:4] == b"\x89PNG"


def test_full_size_models_and_prompts_on_the_meta_device():
    """The 7B models the GPU run builds, built here on the meta device (no memory): parameter counts of the
    published checkpoints (llava-1.5-7b-hf 7.06e9, Qwen2.5-VL-7B-Instruct 8.29e9), LLaVA's decoder equal to the
    paper preset of analysis/flops.py, and the prompts' sizes (576 tokens per image, a 3,072-token video)."""
    import torch

    from fastv_export.adapters import get_adapter
    from fastv_export.analysis.flops import PAPER_PRESETS
    from fastv_export.decoder_shape import DecoderShape
    from fastv_export.prompts import make_prompt

    bench = _load("bench_gpu")
    args = bench.parse_args([])
    want = {"llava-1.5-7b": (7.063e9, {"1 image": 576, "4 images": 2304, "8 images": 4608}),
            "qwen2.5-vl-7b": (8.292e9, {"video 24 frames 448x448": 3072})}
    for name, (params, media_tokens) in want.items():
        model = bench.build_model(name, False, torch.device("meta"), torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
        shape = DecoderShape.from_config(model.config)
        if name == "llava-1.5-7b":
            assert shape == PAPER_PRESETS["llava-1.5-7b"]
        else:
            assert shape == DecoderShape(3584, 18944, 28, 28, 4, 128, 152064)
        adapter = get_adapter(model)
        got = {}
        for case in (c for c in bench.cases(args) if c.model == name):
            prompt = make_prompt(adapter, args.text_tokens, media=list(case.media), system_tokens=args.system_tokens)
            got[case.label] = adapter.find_candidates(prompt.input_ids).shape[1]
            assert prompt.input_ids.shape[1] - got[case.label] == 1 + args.system_tokens + args.text_tokens + \
                (2 if name.startswith("qwen") else 0)                                  # <vision_start/end>
        assert got == media_tokens


def test_benchmark_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        _load("bench_gpu").main(["--tiny", "--models", "llava-1.5-7b", "--images", "1"])


def test_benchmark_imports_from_a_checkout_that_is_not_installed(tmp_path):
    """A bare GPU machine has the repository, not the installed package: the script still finds fastv_export and
    its graphs/ folder (here: the editable install's finder removed before the script runs)."""
    code = ("import runpy, sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "sys.path_importer_cache.clear()\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('fastv_export') is None, 'still installed'\n"
            "sys.argv = ['bench_gpu.py', '--help']\n"
            "try:\n"
            f"    runpy.run_path({str(ROOT / 'scripts' / 'bench_gpu.py')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "import fastv_export.graphs.op as op, fastv_export.reference.selection as sel\n"
            "print(op.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(ROOT / "graphs" / "op.py")


def test_benchmark_argument_errors(capsys):
    bench = _load("bench_gpu")
    for argv, msg in ((["--models", "llava"], "unknown model"), (["--ratios", "3/2"], "--ratios"),
                      (["--decode-tokens", "0"], "--decode-tokens")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert msg in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ compare_tokens.py
def _compare(tmp_path: Path, a: dict, b: dict) -> subprocess.CompletedProcess:
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text("progress line\n" + json.dumps(a) + "\n")
    pb.write_text(json.dumps(b) + "\n")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_tokens.py"), str(pa), str(pb)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("actual, ok", [
    ({"tokens": [[5, 6, 2]], "kept_positions": [[0, 1, 3]]}, True),                   # fastv-run --inputs format
    ({"tokens": [[5, 6, 2, 0, 0]], "kept_positions": [[0, 1, 3]]}, True),             # pad after end of sequence
    ({"rows": [{"tokens": [5, 6, 2], "kept_positions": [0, 1, 3]}]}, True),           # the request format
    ({"tokens": [[5, 7, 2]], "kept_positions": [[0, 1, 3]]}, False),                  # a different token
    ({"tokens": [[5, 6, 2, 9, 4]], "kept_positions": [[0, 1, 3]]}, False),            # goes on generating
    ({"tokens": [[5, 6, 2]], "kept_positions": [[0, 2, 3]]}, False),                  # another selection
    ({"tokens": [[5, 6, 2], [5, 6, 2]], "kept_positions": [[0, 1, 3], [0, 1, 3]]}, False),   # rows differ
    ({"tokens": [[]], "kept_positions": [[0, 1, 3]]}, False),                         # nothing generated
])
def test_compare_tokens(tmp_path, actual, ok):
    expected = {"rows": [{"tokens": [5, 6, 2], "text": "x", "kept_positions": [0, 1, 3]}]}
    proc = _compare(tmp_path, expected, actual)
    assert proc.returncode == (0 if ok else 1), proc.stdout + proc.stderr
    assert ("DIFFERENT" in proc.stdout) == (not ok)


def test_compare_tokens_unreadable_input(tmp_path):
    (tmp_path / "a.json").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_tokens.py"), str(tmp_path / "a.json"),
                           str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot read a JSON record" in proc.stderr


# ------------------------------------------------------------------------------------------ a real run, no GPU
@pytest.mark.slow
def test_without_a_gpu_the_benchmark_still_runs_and_tensorrt_is_skipped(tmp_path):
    """The non-dry path of the script on the CPU: cmake replaced by one that fails (no kernel build here), the
    benchmark at tiny sizes on the CPU through --bench-args; the report says what passed, failed and was skipped,
    and the exit status is 1 (a step failed)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "cmake").write_text("#!/bin/sh\necho 'cmake stub: no build here' >&2\nexit 1\n")
    (stubs / "cmake").chmod(0o755)
    out = tmp_path / "gc"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "FASTV_CUDA_ARCHS": "90"}
    env.pop("OUT", None)
    bench_args = ("--device cpu --tiny --models qwen2.5-vl-7b --repeats 1 --warmup 0 --decode-tokens 2 "
                  "--layer-repeats 1 --no-plot")
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--bench-args", bench_args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    report = (out / "gpu_check.txt").read_text()
    assert proc.returncode == 1, report[-3000:]
    summary = report[report.index("---- summary"):]
    assert "configure (kernels only, sm_90): FAIL (exit 1)" in summary
    assert "PyTorch benchmark (7B shapes): PASS" in summary, report[-3000:]
    assert "TensorRT: SKIPPED (no TensorRT 10 Python bindings; not a pass)" in summary
    assert "kernel tests" not in summary
    assert "| qwen2.5-vl-7b | video 8 frames 112x112 |" in report           # the table lands in the report
    assert (out / "bench" / "bench_gpu.json").is_file()


def test_benchmark_names_the_pinned_transformers():
    """bench_gpu.py warns when transformers differs from pyproject.toml's pin: the two must name the same version."""
    import re

    pin = re.search(r'"transformers==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert _load("bench_gpu").TRANSFORMERS_PINNED == pin
