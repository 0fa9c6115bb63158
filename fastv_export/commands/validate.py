"""`fastv-export validate`: the bundle's graphs against the PyTorch reference, same inputs."""
from __future__ import annotations

import argparse

from fastv_export.commands.common import add_runner_argument
from fastv_export.errors import FastVError
from fastv_export.memory import add_memory_argument

HELP = "compare a bundle's ONNX graphs with the PyTorch reference FastV (exit 0 only if all pass)"
DESCRIPTION = """\
Load the bundle (checksums verified), rebuild the source model it names, and run both the PyTorch
reference FastV and the ONNX graphs (ONNX Runtime) on the same synthetic prompts, for each batch
size: every graph's outputs (Polygraphy comparator, RunResults files saved), the selection
(tie-aware: borderline swaps are reported and the generation is repeated with the reference's
selection forced), logits at every step and the greedy tokens. Float tensors (logits, graph outputs)
pass when every element is close: |a - b| <= atol + rtol x |b|, b the reference (defaults by
precision: fp32 atol 1e-4, rtol 1e-4; fp16 logits atol 1e-1, graph outputs atol 1e-2 x max(1,
max|b|), rtol 1e-2; --atol/--rtol replace them); tokens and selection are exact. Writes
validation.json (and the Polygraphy files) into BUNDLE/validation/ or --report-dir and prints a
table with the worst absolute and relative errors.

The prompts hold one image of the exported size, or the images and videos of --media (every row the
same): images of other sizes and videos for the families whose bundles take them (Qwen2.5-VL,
LLaVA-OneVision, InternVL; videos of the exported frame size for Qwen2-VL and Qwen3-VL).

examples:
  fastv-export validate bundle
  fastv-export validate bundle --max-new-tokens 8 --batch-sizes 1
  fastv-export validate qwen25_bundle --media image@112x224,image@224x168
  fastv-export validate onevision_bundle --media video:4,image@40x30
  fastv-export validate qwen25_bundle --atol 1e-4 --rtol 1e-4
  fastv-export validate bundle --request req.json     # your own images and text (the `run --request` format)
  fastv-export validate bundle --image photo.jpg --prompt "What is in the image?"

--request / --image / --video / --prompt validate on real inputs instead: each request is one case, made
by the bundle's own tokenizer, processor and chat template exactly as `fastv-export run` makes it.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `fastv-export export`")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,3", help="comma-separated batch sizes (default 1,3)")
    parser.add_argument("--report-dir", default=None, help="where validation.json goes (default BUNDLE/validation)")
    parser.add_argument("--media", default=None,
                        help="the prompts' images and videos in order: image, image@HxW, video:FRAMES, "
                             "video:FRAMES@HxW, comma-separated (default: one image of the exported size)")
    parser.add_argument("--atol", type=float, default=None,
                        help="absolute term of the logits and graph-output comparisons (default by precision: "
                             "fp32 1e-4; fp16 1e-1 logits, 1e-2 x max(1, max|reference|) graph outputs)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="relative term: |a - b| <= atol + rtol x |reference| (default fp32 1e-4, fp16 1e-2)")
    real = parser.add_argument_group("real inputs instead of synthetic prompts (as `fastv-export run` takes them)")
    real.add_argument("--request", default=None, metavar="JSON",
                      help="requests in the OpenAI chat format (one or a list): one case each")
    real.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    real.add_argument("--video", action="append", default=[], metavar="PATH",
                      help="a video file, or a folder of frames (repeatable)")
    real.add_argument("--prompt", default=None, help="the user's text (with --image / --video)")
    add_runner_argument(parser)
    parser.add_argument("--fail-on-gap", action="store_true",
                        help="quantized bundles: fail when the gap to the unquantized model is over its own "
                             "tolerance (first-step top-1 and kept-token agreement >= 90%% in every case; "
                             "docs/design.md §10); without it the gap's verdict is reported only")
    parser.add_argument("--model", default=None, metavar="PRESET|DIR",
                        help="the source model to compare with (default: the bundle's preset, or the checkpoint "
                             "directory it was exported from, found relative to the bundle)")
    add_memory_argument(parser)


def run(args: argparse.Namespace) -> int:
    from fastv_export.validate import format_report

    try:
        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    except ValueError:
        raise FastVError(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}") from None
    if args.max_new_tokens < 1 or any(s < 1 for s in sizes):
        raise FastVError("--max-new-tokens and every batch size must be >= 1")
    from fastv_export.bundle import load_bundle
    from fastv_export.media import parse_media
    from fastv_export.runtime.runners import open_runner

    media = parse_media(args.media) if args.media else None
    requests = _requests(args)
    if requests and media:
        raise FastVError("--media describes synthetic prompts; with --request / --image / --prompt leave it out")
    bundle = load_bundle(args.bundle)
    report = measured_validation(bundle, args.model, args.ignore_memory_check, max_new_tokens=args.max_new_tokens,
                                 batch_sizes=sizes, report_dir=args.report_dir, media=media, atol=args.atol,
                                 rtol=args.rtol, requests=requests, fail_on_gap=args.fail_on_gap,
                                 open_runner=lambda b: open_runner(b, args.runner))
    print(format_report(report))
    return 0 if report["passed"] else 1


def measured_validation(bundle, model: str | None, ignore_memory_check: bool, **kwargs) -> dict:
    """validate_bundle (``kwargs``) after the memory check (stops if the estimate does not fit), its peak RSS
    recorded in BUNDLE/logs/stages.json (shared with `fastv-export pipeline`). The runner is opened inside, once the
    PyTorch reference is freed (``open_runner``)."""
    from fastv_export import memory
    from fastv_export.validate import validate_bundle

    source = model or bundle.source
    est, available = memory.preflight(lambda: memory.validate_estimate(source), memory.VALIDATE_ADVICE,
                                      ignore_memory_check)
    with memory.measure("validate", est, available) as record:
        report = validate_bundle(bundle, model=model, **kwargs)
    record.extra = {"passed": report["passed"], "runner": report["runner"]}
    memory.record_stages(bundle.path, record)
    return report


def _requests(args: argparse.Namespace) -> list | None:
    """The real requests of --request, or the one of --image / --video / --prompt (None: synthetic prompts)."""
    from fastv_export.frontend.request import from_cli, load_requests

    if args.request:
        if args.prompt is not None or args.image or args.video:
            raise FastVError("give either --request or --image / --video / --prompt, not both")
        return load_requests(args.request)
    if args.prompt is None:
        if args.image or args.video:
            raise FastVError("--image / --video need --prompt (the user's text)")
        return None
    return [from_cli(args.prompt, args.image, args.video)]
