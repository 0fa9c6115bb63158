"""`fastv-export calibrate`: sweep K, R and ranking on a calibration set; table, Pareto plot,
recommendation under a budget, and optionally the export of the recommended configuration."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fastv_export.commands.common import add_model_argument
from fastv_export.errors import FastVError
from fastv_export.graphs import spec as graph_spec
from fastv_export.quantize.schemes import NONE, SCHEMES

log = logging.getLogger(__name__)

DEMO_MODEL = "tiny-llava-shapes"
HELP = "choose K and R under a budget: sweep K x R x ranking, quality vs FLOPs, Pareto plot, recommendation"
DESCRIPTION = f"""\
Measure what each FastV configuration costs in quality and saves in compute, on a calibration set,
and pick one under a constraint.

Quality, against the unpruned model on the same prompts: first-token KL divergence, first-token
(top-1) agreement, greedy-sequence agreement over --tokens tokens, and task accuracy when the
calibration set gives reference answers. Cost: the paper's Eq. 5 FLOPs ratio, the exact prefill
FLOPs and the deep-layer KV-cache ratio (as `fastv-export flops`). Also the share of layer K-1's
attention on image tokens that the kept tokens held.

Decode semantics: "prefill" prunes once, in prefill (this project, the exported graphs, the authors'
KV-cache variant); "rerank" is the authors' main evaluation code, which re-runs the whole sequence
for every generated token and re-ranks the image tokens with the newest token's attention row
(PyTorch reference only; slow: --tokens full forwards per configuration and prompt).

The sweep reuses shared work: layers < K run once per prompt, each R re-runs only layers >= K.
Results are appended per prompt to --results (JSONL), so an interrupted sweep resumes.
K = 0 prunes before the first layer, where only the random ranking applies: K = 0 rows are random.

Calibration data (--data): "demo" (the shapes task's test split, with answers; the default for
{DEMO_MODEL}, a tiny LLaVA trained on it), "synthetic" (synthetic prompts, no answers; the default
for the other presets) or a folder with images and prompts.jsonl, one object per line:
{{"image": "a.png", "prompt": "USER: <image>\\nQuestion? ASSISTANT:", "answer": "yes"}} (text needs the
checkpoint's processor) or {{"image": "a.png", "prompt_ids": [...], "answer_ids": [...]}}.

Quantized weights (--quantize none,int8,int4; the weight-only schemes of `fastv-export export --quantize`): each
scheme's bundle is exported once into OUT/quantized/SCHEME (reused when there; the export's own quantizer) and its
integer weights, dequantized in PyTorch (the quantized model's reference, as `validate` uses), run the same
points; KL and agreement stay against the unquantized unpruned model. Bytes of weights: the decoder layers'
weights under each scheme (integers + scales). --max-weight-bytes 300MB recommends the most accurate point whose
weights fit (--tolerance: a quality that close to the best counts as equal; the cheapest of those wins).

Writes OUT/calibration.csv, OUT/calibration.json (table, frontiers, recommendation), OUT/calibration.md,
OUT/pareto.png and OUT/pareto_weights.png (bytes of weights x FLOPs, the Pareto front with the quality as the
constraint).

examples:
  fastv-export calibrate --out calib                                  # the trained demo, K 0-3 x R x last/mean
  fastv-export calibrate --out calib --metric accuracy --max-flops-ratio 0.5
  fastv-export calibrate --out calib --min-agreement 0.99 --export bundle --force
  fastv-export calibrate --model bench-llava --k 2,4,8 --r 1/4,1/2,3/4,9/10 --tokens 1 --size 8 --out calib-bench
  fastv-export calibrate --model path/to/llava-1.5-7b-hf --data path/to/calib-folder --out calib-7b
  fastv-export calibrate --out calib-q --k 2 --r 0,1/2,3/4 --quantize none,int8,int4 --max-weight-bytes 1MB
"""


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2,3, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.set_defaults(model=DEMO_MODEL)
    parser.add_argument("--data", default=None, metavar="demo|synthetic|DIR",
                        help=f"calibration set (default: demo for {DEMO_MODEL}, synthetic otherwise)")
    parser.add_argument("--size", type=int, default=200, help="prompts in the calibration set (default 200)")
    g = parser.add_argument_group("sweep")
    g.add_argument("--k", type=_ints, default=[0, 1, 2, 3], metavar="K,K,...", help="pruning layers (default 0,1,2,3)")
    g.add_argument("--r", default="1/2,3/4,9/10", metavar="R,R,...",
                   help="drop ratios, exact: 1/2, 0.75, 90%% (default 1/2,3/4,9/10)")
    g.add_argument("--ranking", default="last,mean", metavar="NAME,...",
                   help="rankings for K >= 1: last, mean, random (default last,mean)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random ranking (default 0)")
    g.add_argument("--tokens", type=int, default=6,
                   help="greedy tokens compared per prompt, at least the longest answer (default 6)")
    g.add_argument("--semantics", default="prefill,rerank", metavar="prefill[,rerank]",
                   help="decode semantics measured side by side (default prefill,rerank)")
    g.add_argument("--quantize", default=NONE, metavar="SCHEME,...",
                   help=f"decoder weight schemes swept: {', '.join([NONE, *SCHEMES])} (default {NONE})")
    c = parser.add_argument_group("recommendation")
    c.add_argument("--metric", default=None,
                   help="quality metric: top1, sequence, accuracy, rerank_sequence, rerank_accuracy "
                        "(default: accuracy when answers are given, else top1)")
    c.add_argument("--max-flops-ratio", type=float, default=None, metavar="X",
                   help="best quality among configurations with Eq. 5 FLOPs ratio <= X")
    c.add_argument("--min-agreement", type=float, default=None, metavar="Q",
                   help="cheapest configuration whose metric is >= Q (e.g. 0.99)")
    c.add_argument("--max-weight-bytes", default=None, metavar="N",
                   help="best quality among points whose decoder weights fit in N bytes (300MB, 1.5GiB, 2000000)")
    c.add_argument("--tolerance", type=float, default=0.0, metavar="T",
                   help="under a budget, a metric within T of the best counts as equal and the cheapest such point "
                        "is recommended (default 0: the best, ties to the cheaper)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR", help="directory for calibration.csv/.json and pareto.png")
    o.add_argument("--results", default=None, metavar="FILE.jsonl",
                   help="resumable per-prompt results (default OUT/results.jsonl)")
    o.add_argument("--export", default=None, metavar="BUNDLE",
                   help="export the recommended configuration to this bundle and time its ONNX Runtime prefill")
    o.add_argument("--dtype", choices=list(graph_spec.PRECISIONS), default="fp32",
                   help="precision of --export (default fp32)")
    o.add_argument("--force", action="store_true", help="replace an existing --export bundle")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--json", action="store_true", help="print the recommendation (or table) as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fastv_export.adapters import get_adapter
    from fastv_export.calibrate import dataset, report, sweep
    from fastv_export.presets import load_model

    if args.size < 1:
        raise FastVError(f"the calibration set is empty (--size {args.size}): pass --size 1 or more")
    constrained = any(v is not None for v in (args.max_flops_ratio, args.min_agreement, args.max_weight_bytes))
    if args.export and not constrained:
        raise FastVError("--export exports the recommended configuration: give --max-flops-ratio, --max-weight-bytes "
                         "or --min-agreement")
    budget = report.parse_bytes(args.max_weight_bytes) if args.max_weight_bytes is not None else None
    spec = sweep.SweepSpec(ks=tuple(args.k), ratios=tuple(_split(args.r)), rankings=tuple(_split(args.ranking)),
                           tokens=args.tokens, semantics=tuple(_split(args.semantics)), seed=args.seed,
                           quantize=tuple(_split(args.quantize)))
    if spec.quantize != (NONE,) and args.dtype != "fp32":
        raise FastVError(f"--quantize is measured on fp32 bundles only (--dtype {args.dtype}); drop --dtype")
    data = args.data or ("demo" if args.model == DEMO_MODEL else "synthetic")
    if data == "demo" and args.model != DEMO_MODEL:
        raise FastVError(f"--data demo is the task {DEMO_MODEL} was trained on; use --data synthetic or a folder "
                         f"for {args.model}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    adapter = get_adapter(model)
    items = dataset.load_items(data, adapter, args.size, model=args.model)
    header = {"model": str(args.model), "data": str(data), "size": args.size}
    result = sweep.run_sweep(model, items, spec, results=args.results or out / "results.jsonl", header=header,
                             progress=not args.no_progress,
                             quantized_model=lambda scheme: quantized_model(args.model, scheme, out, spec))
    table = report.summarize(result, str(args.model), str(data), adapter.decoder_shape(),
                             sweep.decoder_linear_shapes(model), args.dtype)
    metric = args.metric or ("accuracy" if table.has("accuracy") else "top1")
    report.checked_metric(table, metric)
    rec = None
    if constrained:
        rec = report.recommend(table, metric, args.max_flops_ratio, args.min_agreement, budget, args.tolerance)
    paths = report.write_outputs(table, out, metric, rec)
    latency = None
    if args.export and rec is not None:
        from fastv_export.export.onnx_export import ExportOptions, export_bundle

        cfg = rec.row.config(seed=args.seed)
        quantize = None if rec.row.quantize == NONE else rec.row.quantize
        bundle = export_bundle(args.export, cfg, ExportOptions(model=args.model, dtype=args.dtype, force=args.force,
                                                               quantize=quantize))
        latency = _ort_prefill_ms(bundle, items[0])
        rec_doc = rec.to_dict() | {"bundle": str(bundle.path), "ort_prefill_ms": latency}
        doc = json.loads(paths["json"].read_text())
        doc["recommendation"] = rec_doc
        from fastv_export.files import atomic_write_json
        atomic_write_json(paths["json"], doc)
    if args.json:
        print(json.dumps(rec.to_dict() | {"ort_prefill_ms": latency} if rec else table.to_dict()))
        return 0
    print(report.format_table(table, metric))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({table.prompts} prompts, {result.seconds:.1f} s)")
    if rec is not None:
        r = rec.row
        weights = f", decoder weights {report.human_bytes(r.weight_bytes)}" if r.weight_bytes is not None else ""
        print(f"recommended under {rec.constraint}: {r.key} ({metric} {r.quality(metric):.4f}, Eq. 5 FLOPs ratio "
              f"{r.eq5_ratio:.3f}, KV cache ratio {r.kv_ratio:.3f}{weights})")
        if args.export:
            print(f"exported to {args.export}; ONNX Runtime prefill of the first prompt: {latency:.2f} ms; "
                  f"next: fastv-export validate {args.export}")
    return 0


def quantized_bundle(model: str, scheme: str, out: Path, spec) -> Path:
    """OUT/quantized/SCHEME: a bundle of ``model`` exported with ``scheme``'s weights (the export's quantizer and
    calibration), reused when one of the same model and scheme is there."""
    from fastv_export.bundle import load_bundle
    from fastv_export.config import FastVConfig
    from fastv_export.export.onnx_export import ExportOptions, export_bundle

    path = Path(out) / "quantized" / scheme
    if (path / "manifest.json").is_file():
        try:
            bundle = load_bundle(path, check_onnx=False)
            if bundle.quantization_scheme == scheme and bundle.source_name == Path(str(model)).name:
                return path
        except FastVError:
            pass
        log.info("%s holds another bundle: exporting it again", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = max(spec.ks) if max(spec.ks) >= 1 else 1            # the weights are the same for every K
    log.info("exporting %s with %s weights to %s", model, scheme, path)
    export_bundle(path, FastVConfig(k=k, ratio="1/2"), ExportOptions(model=model, quantize=scheme, force=True))
    return path


def quantized_model(model: str, scheme: str, out: Path, spec):
    """The quantized model's PyTorch reference for ``scheme``: ``model`` loaded afresh with the integer weights of
    :func:`quantized_bundle` dequantized (fastv_export.quantize.reference)."""
    from fastv_export.presets import load_model
    from fastv_export.quantize.reference import apply_quantized_weights

    bundle = quantized_bundle(model, scheme, out, spec)
    m = load_model(model)
    apply_quantized_weights(m, bundle)
    return m


def _ort_prefill_ms(b, item, repeats: int = 3) -> float:
    """Best-of-``repeats`` ONNX Runtime prefill time (vision, pre-K, post-K) of one prompt on the freshly
    exported bundle ``b``, in ms."""
    import numpy as np

    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.runners import open_runner

    runner = open_runner(b, "onnxruntime")
    ids = item.input_ids.numpy().astype(np.int64)
    pixels = item.vision["pixel_values"]
    images = [pixels[i:i + 1].numpy() for i in range(pixels.shape[0])]
    best = float("inf")
    for _ in range(repeats):
        gen = generate(runner, ids, np.ones_like(ids), images, 1, eos_token_id=b.eos_token_id)
        best = min(best, gen.timings["prefill"])
    return 1e3 * best
