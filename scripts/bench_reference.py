#!/usr/bin/env python
"""Prefill time of the unmodified model against the PyTorch reference FastV (K=2; R = 50/75/90%),
measured side by side in one run on the LLaVA-shaped `bench-llava` preset (576 image tokens,
hidden 1024, 16 layers, random weights), beside the Eq. 5 and exact-count speedups.

usage: python scripts/bench_reference.py [--repeats 5] [--k 2] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastv_export import FastVConfig, apply_fastv
from fastv_export.adapters import get_adapter
from fastv_export.analysis.flops import DecoderShape, eq5_speedup, exact_speedup
from fastv_export.prompts import make_prompt
from fastv_export.presets import load_model


def prefill_times(model, inputs, repeats: int) -> list[float]:
    times = []
    with torch.no_grad():
        model(**inputs, use_cache=True)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model(**inputs, use_cache=True)
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--ratios", default="1/2,3/4,9/10")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("bench-llava")
    adapter = get_adapter(model)
    prompt = make_prompt(adapter, 30, num_images=1, system_tokens=5, seed=0)   # 1 + 5 + 576 + 30 = 612 tokens
    inputs = prompt.model_inputs()
    n = prompt.input_ids.shape[1]
    m = adapter.image_tokens_per_image()
    shape = DecoderShape.from_config(model.config)
    print(f"bench-llava: {shape.num_layers} layers, hidden {shape.hidden_size}, prompt {n} tokens ({m} image), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (median)")
    ratios = args.ratios.split(",")
    # interleave configurations so that machine noise hits them alike
    samples: dict[str, list[float]] = {"unpruned": [], **{r: [] for r in ratios}}
    handles = {}
    for _ in range(args.repeats):
        samples["unpruned"] += prefill_times(model, inputs, 1)
        for r in ratios:
            with apply_fastv(model, FastVConfig(k=args.k, ratio=r)) as h:
                samples[r] += prefill_times(model, inputs, 1)
                handles[r] = h.kept_positions.shape[1]
    base = statistics.median(samples["unpruned"])
    print(f"{'config':>14} {'kept n':>7} {'measured speedup':>17} {'Eq.5 speedup':>13} {'exact speedup':>14} "
          f"{'measured/Eq.5':>14}")
    print(f"{'unpruned':>14} {n:>7} {1.0:>17.2f} {1.0:>13.2f} {1.0:>14.2f} {1.0:>14.2f}")
    text = n - m
    for r in ratios:
        measured = base / statistics.median(samples[r])
        e5 = eq5_speedup(shape, m, text, args.k, r)
        ex = exact_speedup(shape, m, text, args.k, r)
        print(f"{'K=%d R=%s' % (args.k, r):>14} {handles[r]:>7} {measured:>17.2f} {e5:>13.2f} {ex:>14.2f} "
              f"{measured / e5:>14.2f}")


if __name__ == "__main__":
    main()
