"""`fastv-export pipeline`: model -> bundle -> validation -> engines, in one command."""
from __future__ import annotations

import argparse

from fastv_export.commands.build import (add_build_arguments, build_options_from_args, measured_build,
                                         with_plugin_resolved)
from fastv_export.commands.common import fastv_config_from_args
from fastv_export.commands.export import add_arguments as add_export_arguments
from fastv_export.commands.export import measured_export
from fastv_export.commands.validate import measured_validation

HELP = "export, validate with ONNX Runtime and build TensorRT engines in one go, then summarise"
DESCRIPTION = """\
The whole deployment path on one model: `export` (ONNX graphs + manifest), `validate` (the graphs in
ONNX Runtime against the PyTorch reference), `build` (TensorRT engines, post-K for the pruned
length), then a summary: the FLOPs saving (paper Eq. 5 and an exact count) and the deep-layer KV
saving at the engines' limits, the validation result, the engines and their sizes, and what was
verified on this machine and what was not (engines built ahead of time are not run without a GPU).
Stops at the first failing step (validation failing: exit 1, no engines built). Before each step, the memory
it needs is estimated and checked against the memory available (one line and exit 2 when it does not fit:
--ignore-memory-check tries anyway); each step's peak memory (RSS) is printed in the summary (and as the step
ends with -v) and recorded in BUNDLE/logs/stages.json.

examples:
  fastv-export pipeline --out bundle --force                      # tiny-llava, K=2, R=1/2, TensorRT-RTX
  fastv-export pipeline --model tiny-qwen2-vl --r 3/4 --no-plugin --out qwen-bundle
  fastv-export pipeline --model /ckpt/llava-1.5-7b-hf --dtype fp16 --max-prompt 1024 --out llava7b
  fastv-export pipeline --model /ckpt/llava-1.5-7b-hf --dtype fp16 --skip-validation --out llava7b   # less memory
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_export_arguments(parser)
    parser.add_argument("--validate-tokens", type=int, default=16, metavar="T",
                        help="greedy tokens compared by the validation (default 16)")
    parser.add_argument("--skip-validation", action="store_true",
                        help="export and build without validating (validation holds the fp32 PyTorch model: it "
                             "needs the most memory; validate later where there is more)")
    add_build_arguments(parser)


def _flops_lines(model: str, bundle, section) -> list[str]:
    """Eq. 5 / exact FLOPs and KV of the engines' longest prompt (``section``: the bundle's engines)."""
    from fastv_export.analysis.flops import estimate, resolve_shape

    n = section.lengths
    f = bundle.fastv
    rep = estimate(resolve_shape(model), image_tokens=n.image_tokens, text_tokens=n.prompt - n.image_tokens,
                   k=f.k, ratio=None if f.keep is not None else f.r, keep=f.keep, dtype=bundle.precision).to_dict()
    return [f"FLOPs of a {n.prompt}-token prefill ({n.image_tokens} image tokens): Eq. 5 ratio "
            f"{rep['eq5_ratio']:.3f} ({rep['eq5_speedup']:.2f}x), exact ratio {rep['exact_ratio']:.3f} "
            f"({rep['exact_speedup']:.2f}x)",
            f"KV cache of that prompt: {rep['kv_cache_baseline_bytes'] / 2**20:.2f} MiB unpruned -> "
            f"{rep['kv_cache_bytes'] / 2**20:.2f} MiB with FastV (layers >= K hold n'={n.kept} of "
            f"{n.prompt} tokens)"]


def run(args: argparse.Namespace) -> int:
    from fastv_export import memory
    from fastv_export.engines.build import gpu_target, format_summary
    from fastv_export.quantize import check_target, get_scheme, parse_parts
    from fastv_export.validate import format_report

    cfg = fastv_config_from_args(args)
    scheme = get_scheme(args.quantize)
    parse_parts(args.quantize_parts, args.quantize)          # a bad --quantize-parts stops before anything runs
    options = with_plugin_resolved(build_options_from_args(args))   # no plugin: stop here, before exporting
    if options.backend != "tensorrt":
        check_target(scheme and scheme.name, options.compute_capabilities)
    if not args.skip_validation:     # validation needs the most: stop before exporting if it cannot run here
        memory.preflight(lambda: memory.validate_estimate(args.model), memory.VALIDATE_ADVICE,
                         args.ignore_memory_check)
    bundle = measured_export(args, cfg, scheme)
    out = bundle.path
    print(f"1/3 exported {out} ({cfg.describe()}, {args.dtype})")
    report = None
    if args.skip_validation:
        print("2/3 validation skipped (--skip-validation)")
    else:
        report = measured_validation(bundle, None, args.ignore_memory_check, max_new_tokens=args.validate_tokens,
                                     batch_sizes=(1, 3))           # the bundle as written: verified once
        print(f"2/3 validation (ONNX Runtime vs the PyTorch reference): {'PASSED' if report['passed'] else 'FAILED'}")
        if not report["passed"]:
            print(format_report(report))
            return 1
    section = measured_build(bundle, options, args.ignore_memory_check).engines
    print("3/3 engines built")
    gpu = gpu_target()
    stages = memory.read_stage_log(out)
    peaks = ", ".join(f"{name} {memory.gib(stages[name]['peak_rss_bytes'])}" for name in ("export", "validate", "build")
                      if name in stages)
    if report is None:
        checked = "validation: skipped (--skip-validation); run `fastv-export validate " f"{out}` where memory allows"
    else:
        worst = max(c["max_logits_error"] for c in report["cases"])
        checked = (f"validation: {len(report['cases'])} cases (batch 1 and 3, {args.validate_tokens} tokens), greedy "
                   f"tokens identical, worst logits error {worst:.2e} (tolerance {report['tolerances']['logits']} + "
                   f"{report['tolerances']['rtol']} x |reference|)")
    lines = ["", f"summary of {out}", *(_flops_lines(args.model, bundle, section)), checked,
             format_summary(section),
             f"peak memory (RSS) per step: {peaks} (recorded in {out / memory.STAGE_LOG})",
             ("verified on this machine: " + ("the graphs in ONNX Runtime against the PyTorch reference; " if report
                                              else "") + f"the engines were built ({section.backend} "
              f"{section.backend_version})"),
             "not verified here: " + ("running the engines (run `fastv-export validate " f"{out} --runner tensorrt`)"
                                      if gpu else "running the engines (no GPU on this machine); on the target run "
                                      f"`fastv-export validate {out} --runner tensorrt`")]
    print("\n".join(lines))
    return 0
