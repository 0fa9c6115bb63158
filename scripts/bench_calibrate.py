#!/usr/bin/env python
"""How much the calibration sweep's prefix reuse saves: the same configurations measured side by
side in one run, (a) with the shared prefix (one unpruned prefill per prompt, layers >= K re-run per
configuration) and (b) from scratch (the reference apply_fastv on the whole model per configuration,
plus the unpruned forward the quality metrics compare with). Prints both times, their ratio, and
the largest first-token logit difference between the two (they compute the same thing).

    python scripts/bench_calibrate.py                       # bench-llava, K 2,4,8 x R 1/4,1/2,3/4,9/10
    python scripts/bench_calibrate.py --model tiny-llava --prompts 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench-llava")
    p.add_argument("--k", default="2,4,8")
    p.add_argument("--r", default="1/4,1/2,3/4,9/10")
    p.add_argument("--ranking", default="last")
    p.add_argument("--prompts", type=int, default=1, help="synthetic prompts (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating rounds of both (default 3); the median of each is reported")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from fastv_export.adapters import get_adapter
    from fastv_export.calibrate import dataset, sweep
    from fastv_export.presets import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    adapter = get_adapter(model)
    items = dataset.synthetic_items(adapter, args.prompts)
    spec = sweep.SweepSpec(ks=tuple(int(k) for k in args.k.split(",")), ratios=tuple(args.r.split(",")),
                           rankings=tuple(args.ranking.split(",")), tokens=1)
    configs = spec.configs()
    session = sweep.Session(model, spec)
    with torch.no_grad():
        model(**items[0].model_inputs())          # warm-up (allocations, lazy initialisation)

    reused: dict = {}
    diff = 0.0

    def with_reuse() -> None:
        for item in items:
            prefix = session.prefix(item)
            scores: dict = {}
            for cfg in configs:
                key = (cfg.k, cfg.ranking)
                scores[key] = scores[key] if key in scores else session.scores(prefix, cfg)
                reused[(item.name, sweep.config_key(cfg))] = session.run_config(prefix, cfg, scores[key])[0]

    def from_scratch() -> None:
        nonlocal diff
        for item in items:
            with torch.no_grad():
                model(**item.model_inputs())            # the unpruned logits the metrics compare with
            for cfg in configs:
                logits, _ = sweep.evaluate_from_scratch(model, item, cfg, tokens=1)
                diff = max(diff, float((logits - reused[(item.name, sweep.config_key(cfg))]).abs().max()))

    times: dict[str, list[float]] = {"reuse": [], "scratch": []}
    for _ in range(args.repeats):               # alternate, so that a busy machine slows both alike
        for name, fn in (("reuse", with_reuse), ("scratch", from_scratch)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    t_reuse, t_scratch = statistics.median(times["reuse"]), statistics.median(times["scratch"])

    result = {"model": args.model, "prompts": len(items), "prompt_tokens": int(items[0].input_ids.shape[1]),
              "configurations": len(configs), "threads": args.threads, "repeats": args.repeats,
              "rounds_reuse_s": [round(t, 2) for t in times["reuse"]],
              "rounds_scratch_s": [round(t, 2) for t in times["scratch"]], "prefix_reuse_s": round(t_reuse, 2),
              "from_scratch_s": round(t_scratch, 2), "speedup": round(t_scratch / t_reuse, 2),
              "max_abs_logit_diff": diff}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: {len(items)} prompt(s) of {result['prompt_tokens']} tokens, "
              f"{len(configs)} configurations (K {args.k} x R {args.r} x {args.ranking}), {args.threads} threads")
        print(f"prefix reuse : {t_reuse:8.2f} s  (median of {result['rounds_reuse_s']})")
        print(f"from scratch : {t_scratch:8.2f} s  (median of {result['rounds_scratch_s']})")
        print(f"speedup      : {t_scratch / t_reuse:8.2f}x   (max |logit difference| {diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
