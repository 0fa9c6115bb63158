#!/usr/bin/env python
"""What weight-only quantization costs on the trained demo: accuracy of none / int8 / int4 decoder weights
(each bundle's integer weights dequantized in PyTorch: the quantized model's reference, which `validate` checks
the bundle against) x FastV (K, R) on held-out questions of the shapes task, with standard errors, and the
decoder graphs' file sizes. The bundles are exported into --work (reused when there).

    python scripts/bench_quantize.py --questions 100 --r 0,1/2           # tiny-llava-shapes, K=2
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llava-shapes")
    p.add_argument("--schemes", default="none,int8,int4")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--r", default="0,1/2", help="comma-separated ratios (0: no pruning)")
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--start", type=int, default=0, help="first test-split sample")
    p.add_argument("--work", default="bench-quantize", help="folder for the exported bundles")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from fastv_export.calibrate.dataset import demo_items
    from fastv_export.calibrate.sweep import _from_scratch
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle
    from fastv_export.presets import load_model
    from fastv_export.quantize.reference import apply_quantized_weights

    torch.manual_seed(0)
    items = demo_items(args.questions, args.start)
    ratios = [r.strip() for r in args.r.split(",") if r.strip()]
    rows = []
    for scheme in [s.strip() for s in args.schemes.split(",") if s.strip()]:
        bundle = Path(args.work) / f"{args.model}-{scheme}"
        bundle.parent.mkdir(parents=True, exist_ok=True)
        if not (bundle / "manifest.json").is_file():
            export_bundle(bundle, FastVConfig(k=args.k, ratio="1/2"),
                          ExportOptions(model=args.model, quantize=None if scheme == "none" else scheme, force=True))
        model = load_model(args.model, attn_implementation="eager")
        if scheme != "none":
            apply_quantized_weights(model, bundle)
        size = sum((bundle / f).stat().st_size for f in ("pre_k.onnx", "post_k.onnx"))
        for ratio in ratios:
            cfg = FastVConfig(k=args.k, ratio=ratio)
            correct = 0
            for item in items:
                _, tokens, _ = _from_scratch(model, item, cfg, len(item.answer) + 1)
                correct += tokens[:len(item.answer)] == item.answer
            acc = correct / len(items)
            rows.append({"scheme": scheme, "k": cfg.k, "r": ratio, "questions": len(items), "accuracy": acc,
                         "stderr": math.sqrt(acc * (1 - acc) / len(items)), "decoder_graph_bytes": size})
            print(f"{scheme:5s} K={cfg.k} R={ratio:4s} accuracy {acc:.3f} +- {rows[-1]['stderr']:.3f} "
                  f"({len(items)} questions)  pre_k+post_k {size / 1e6:.2f} MB", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
