#!/usr/bin/env python
"""What weight-only quantization costs on the trained demo (issue 24's acceptance table): accuracy of
none / int8 / int4 decoder weights (each bundle's integer weights dequantized in PyTorch: the quantized model's
reference, which `validate` checks the bundle against) x FastV (K, R) on held-out questions of the shapes task,
with standard errors, and the decoder graphs' measured file sizes against the fp32 bundle's. The bundles are
exported into --work (reused when there). Prints Markdown tables (--json: the rows as JSON too).

The questions are the shapes task's test split (fastv_export/presets/shapes.py): samples generated from seeds
TEST_SEED_OFFSET + start + i, disjoint from every seed training used (TrainSettings.seed * 1e6 + step * batch + i);
any number of them can be generated.

    python scripts/bench_quantize.py                                 # 300 questions, K=2, R 0, 1/2, 3/4
    python scripts/bench_quantize.py --questions 100 --r 0,1/2 --work /tmp/bq
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from fractions import Fraction
from pathlib import Path

DECODER_GRAPHS = ("pre_k.onnx", "post_k.onnx")
INT4_LIMIT = 0.3          # the acceptance: int4 decoder weight bytes <= 0.3 x fp32


def stderr(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent questions (binomial)."""
    return math.sqrt(acc * (1 - acc) / n) if n else float("nan")


def _ratio_name(r: str) -> str:
    f = Fraction(r)
    return "0" if f == 0 else f"{f.numerator}/{f.denominator}"


def markdown(rows: list[dict], sizes: dict[str, dict], k: int, questions: int) -> str:
    """The accuracy table (scheme x R at K) and the decoder weight bytes table."""
    ratios = list(dict.fromkeys(r["r"] for r in rows))
    lines = [f"Accuracy (%) on {questions} held-out questions, K={k}, +- one standard error:", "",
             "| weights | " + " | ".join(f"R={_ratio_name(r)}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        cells = {r["r"]: r for r in rows if r["scheme"] == scheme}
        lines.append(f"| {scheme} | " + " | ".join(
            f"{100 * cells[r]['accuracy']:.1f} +- {100 * cells[r]['stderr']:.1f}" for r in ratios) + " |")
    base = sizes.get("none")
    lines += ["", "Decoder weights, measured: pre_k.onnx + post_k.onnx file bytes, and the decoder layers' weights "
              "(integers + scales) as the manifest counts them:", "",
              "| weights | pre_k + post_k bytes | x fp32 | decoder-layer weight bytes | x fp32 |",
              "|---|---|---|---|---|"]
    for scheme, s in sizes.items():
        ratio = f"{s['file_bytes'] / base['file_bytes']:.3f}" if base else "-"
        lw = s["layer_weight_bytes"]
        lratio = f"{lw / s['layer_float_bytes']:.3f}" if lw is not None else "1.000"
        shown = lw if lw is not None else s["layer_float_bytes"]
        lines.append(f"| {scheme} | {s['file_bytes']:,} | {ratio} | {shown:,} | {lratio} |")
    if base and "int4" in sizes:
        r4 = sizes["int4"]["file_bytes"] / base["file_bytes"]
        lines += ["", f"int4 / fp32 decoder graph bytes: {r4:.3f} ({'meets' if r4 <= INT4_LIMIT else 'MISSES'} "
                  f"the <= {INT4_LIMIT} acceptance)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llava-shapes")
    p.add_argument("--schemes", default="none,int8,int4")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--r", default="0,1/2,3/4", help="comma-separated ratios (0: no pruning)")
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--start", type=int, default=0, help="first test-split sample")
    p.add_argument("--work", default="bench-quantize", help="folder for the exported bundles")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from fastv_export.bundle import load_bundle
    from fastv_export.calibrate.dataset import demo_items
    from fastv_export.calibrate.sweep import evaluate_from_scratch
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle
    from fastv_export.presets import load_model
    from fastv_export.quantize.reference import apply_quantized_weights

    torch.manual_seed(0)
    start = time.perf_counter()
    items = demo_items(args.questions, args.start)
    ratios = [_ratio_name(r.strip()) for r in args.r.split(",") if r.strip()]
    rows, sizes = [], {}
    for scheme in [s.strip() for s in args.schemes.split(",") if s.strip()]:
        bundle = Path(args.work) / f"{args.model}-{scheme}"
        bundle.parent.mkdir(parents=True, exist_ok=True)
        if not (bundle / "manifest.json").is_file():
            export_bundle(bundle, FastVConfig(k=args.k, ratio="1/2"),
                          ExportOptions(model=args.model, quantize=None if scheme == "none" else scheme, force=True))
        model = load_model(args.model, attn_implementation="eager")
        if scheme != "none":
            apply_quantized_weights(model, bundle)
        section = load_bundle(bundle, check_onnx=False).quantization or {}
        float_layers = sum(m.weight.numel() * m.weight.element_size() for layer in _layers(model)
                           for m in layer.modules() if isinstance(m, torch.nn.Linear))
        sizes[scheme] = {"file_bytes": sum((bundle / f).stat().st_size for f in DECODER_GRAPHS),
                         "layer_weight_bytes": section.get("weight_bytes", {}).get("quantized"),
                         "layer_float_bytes": float_layers}
        for ratio in ratios:
            cfg = FastVConfig(k=args.k, ratio=ratio)
            correct = 0
            for item in items:
                _, tokens = evaluate_from_scratch(model, item, cfg, len(item.answer))
                correct += tokens[:len(item.answer)] == item.answer
            acc = correct / len(items)
            rows.append({"scheme": scheme, "k": cfg.k, "r": ratio, "questions": len(items), "accuracy": acc,
                         "stderr": stderr(acc, len(items)), "decoder_graph_bytes": sizes[scheme]["file_bytes"]})
            print(f"{scheme:5s} K={cfg.k} R={ratio:4s} accuracy {acc:.3f} +- {rows[-1]['stderr']:.3f} "
                  f"({len(items)} questions)  pre_k+post_k {sizes[scheme]['file_bytes'] / 1e6:.3f} MB", flush=True)
    print()
    print(markdown(rows, sizes, args.k, len(items)))
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps({"rows": rows, "sizes": sizes}, indent=1))
    return 0


def _layers(model):
    from fastv_export.adapters import get_adapter

    return get_adapter(model).layers()


if __name__ == "__main__":
    sys.exit(main())
