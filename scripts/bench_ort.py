#!/usr/bin/env python
"""ONNX Runtime latency of FastV bundles against the unpruned (R = 0) bundle, measured side by side in
one run. By default on the LLaVA-shaped `bench-llava` preset (576 image tokens, hidden 1024, 16 layers,
random weights; a 612-token prompt); `--preset` and `--media` pick another bench-sized model and prompt,
e.g. a long video prompt on `bench-qwen2.5-vl` (12 layers of hidden 768):

    python scripts/bench_ort.py --preset bench-qwen2.5-vl --media video:178 --repeats 3 --decode-tokens 16
    (178 frames of the exported 168 px size = 89 temporal patches x 36 = 3,204 visual tokens)

Reported per configuration:
- prefill: the decoder part of the prefill (embed -> pre_k with TokenSelect -> post_k), measured
  speedup beside the Eq. 5 and exact-count speedups (the vision tower is the same for every bundle
  and is reported apart);
- decode: time per generated token, measured speedup beside the KV-read ratio (KV bytes read per
  step, unpruned / FastV) and the memory-traffic ratio (weights + KV bytes read per step);
  `--decode-batch B` decodes B rows at once from one prefill's caches repeated B times: the weights are
  read once per step for all rows while the KV reads grow with B, which is where the KV-read ratio
  becomes reachable (a serving batch); the traffic ratio follows B;
- the deep-layer (layers >= K) KV-cache bytes after the prompt and the generated tokens.

Configurations are interleaved (one repeat of each in turn) so that machine noise hits them alike;
medians are reported. Bundles are exported once into --bundles and reused (delete the directory to
re-export). --profile adds ONNX Runtime's per-operator profile of one prefill for every configuration,
to show where the time goes.

usage: python scripts/bench_ort.py [--preset bench-llava] [--media image] [--repeats 5] [--decode-tokens 32]
                                   [--decode-batch 1] [--k 2] [--ratios 1/2,3/4,9/10] [--bundles .bench-bundles]
                                   [--threads N] [--profile] [--plot PNG] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from fastv_export import FastVConfig
from fastv_export.adapters import get_adapter
from fastv_export.bundle import load_bundle
from fastv_export.errors import FastVError
from fastv_export.media import parse_media
from fastv_export.export.onnx_export import ExportOptions, export_bundle
from fastv_export.analysis.flops import DTYPE_BYTES, decode_read_bytes, eq5_speedup, exact_speedup, kv_cache_layer_elems
from fastv_export.decoder_shape import DecoderShape
from fastv_export.prompts import make_prompt
from fastv_export.presets import load_model
from fastv_export.runtime.generate import decode, generate
from fastv_export.runtime.ort import OrtRunner, default_session_options

FP32_BYTES = DTYPE_BYTES["fp32"]


def ensure_bundle(root: Path, preset: str, k: int, ratio: str) -> Path:
    """The preset's bundle for (K, R), exported unless a valid one is already there."""
    path = root / f"{preset}-k{k}-r{ratio.replace('/', '_')}"
    if (path / "manifest.json").exists():
        try:
            f = load_bundle(path).fastv
            if f.k == k and f.r == Fraction(ratio) and f.keep is None:
                return path
        except FastVError as exc:
            logging.warning("re-exporting %s: %s", path, exc)
    root.mkdir(parents=True, exist_ok=True)
    return export_bundle(path, FastVConfig(k=k, ratio=ratio), ExportOptions(model=preset, force=True)).path


def session_options(threads: int | None, profile_prefix: str | None = None) -> ort.SessionOptions:
    so = default_session_options(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def profile_run(path: Path, prompt_args: tuple, seconds, media, threads: int | None, tmp: Path, tag: str,
                decode: bool = False) -> dict:
    """Per-operator time (ms) by graph and op type, from ORT's profiler: of the last of two prefills, or
    (``decode``) of the last of three decode steps after the prompt."""
    rt = OrtRunner(load_bundle(path), providers=["CPUExecutionProvider"],
                   session_options=session_options(threads, str(tmp / tag)))
    for _ in range(1 if decode else 2):
        generate(rt, *prompt_args, max_new_tokens=4 if decode else 1, video_seconds=seconds, media=media)
    times: dict[tuple[str, str], float] = defaultdict(float)
    for graph in ("embed", "pre_k", "post_k"):
        events = json.loads(Path(rt.sessions[graph].end_profiling()).read_text())
        run = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-1]
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                    run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                op = e["args"].get("op_name", "?")
                if "TokenSelect" in e["name"]:   # the inlined function body's nodes are named TokenSelect/...
                    op = f"TokenSelect body: {op}"
                times[(graph, op)] += e["dur"] / 1000
    return dict(times)


def print_profile(profiles: dict[str, dict], what: str) -> None:
    """Kernel time per (graph, op type) for every configuration, with its speedup over R = 0."""
    base = profiles["0"]
    keys = sorted(set().union(*profiles.values()), key=lambda key: -base.get(key, 0))
    total = {r: sum(p.values()) for r, p in profiles.items()}
    print(f"\nONNX Runtime profile of {what}: kernel time in ms (speedup over R=0)")
    print(f"{'graph':>7} {'op type':>22} " + " ".join(f"{'R=' + r:>15}" for r in profiles))

    def line(graph: str, op: str, get) -> str:
        cells = []
        for r in profiles:
            t, t0 = get(r), get("0")
            cells.append(f"{t:>8.1f} ({t0 / t if t else float('inf'):>4.2f})")
        return f"{graph:>7} {op[:22]:>22} " + " ".join(cells)

    for key in keys:
        if base.get(key, 0.0) >= 0.01 * total["0"]:
            print(line(key[0], key[1], lambda r: profiles[r].get(key, 0.0)))
    print(line("pre_k", "TokenSelect (all ops)", lambda r: sum(v for (_, op), v in profiles[r].items()
                                                            if op.startswith("TokenSelect body"))))
    for graph in ("embed", "pre_k", "post_k"):
        print(line(graph, "(all kernels)", lambda r: sum(v for (g, _), v in profiles[r].items() if g == graph)))
    print(line("total", "", lambda r: total[r]))


def plot(rows: list[dict], path: str, batch: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["config"] for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(x - 0.2, [r["prefill_speedup"] for r in rows], 0.4, label="measured (ORT CPU)")
    a.bar(x + 0.2, [r["eq5_speedup"] for r in rows], 0.4, label="Eq. 5")
    a.set_title("prefill speedup vs R = 0")
    b.bar(x - 0.27, [r["decode_speedup"] for r in rows], 0.27, label="measured (ORT CPU)")
    b.bar(x, [r["traffic_ratio"] for r in rows], 0.27, label="weights+KV bytes ratio")
    b.bar(x + 0.27, [r["kv_read_ratio"] for r in rows], 0.27, label="KV-read ratio")
    b.set_title("decode speedup per token vs R = 0" + (f" ({batch} rows per step)" if batch > 1 else ""))
    for ax in (a, b):
        ax.set_xticks(x, labels)
        ax.legend()
        ax.axhline(1.0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-llava", help="a bench-sized preset (bench-llava, bench-qwen2.5-vl)")
    ap.add_argument("--media", default="image", help="the prompt's images and videos, e.g. image,image or video:178")
    ap.add_argument("--text-tokens", type=int, default=30, help="instruction tokens after the media")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-batch", type=int, default=1,
                    help="rows decoded at once, from the prompt's caches repeated (weights read once for all rows)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--ratios", default="1/2,3/4,9/10")
    ap.add_argument("--bundles", default=".bench-bundles", help="where the bundles are exported and reused")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    ap.add_argument("--profile", action="store_true", help="per-operator profile of one prefill per configuration")
    ap.add_argument("--plot", default=None, help="write a PNG of measured vs theoretical speedups")
    ap.add_argument("--json", default=None, help="write the rows as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ratios = ["0"] + args.ratios.split(",")
    root = Path(args.bundles)
    media = parse_media(args.media)
    paths = {r: ensure_bundle(root, args.preset, args.k, r) for r in tqdm(ratios, desc="bundles", unit="bundle")}

    model = load_model(args.preset)
    adapter = get_adapter(model)
    shape = DecoderShape.from_config(model.config)
    prompt = make_prompt(adapter, args.text_tokens, media=media, system_tokens=5, seed=0)
    del model
    ids, mask = prompt.input_ids.numpy(), prompt.attention_mask.numpy()
    images = [u.numpy() for u in prompt.vision_units(adapter)]
    seconds = prompt.vision["second_per_grid_ts"].tolist() if "second_per_grid_ts" in prompt.vision else None
    n, m = ids.shape[1], int(np.isin(ids, adapter.image_token_ids()).sum())
    runners = {r: OrtRunner(load_bundle(p), providers=["CPUExecutionProvider"],
                            session_options=session_options(args.threads)) for r, p in paths.items()}
    print(f"{args.preset}: {shape.num_layers} layers, hidden {shape.hidden_size}, MLP {shape.intermediate_size}, "
          f"prompt {n} tokens ({m} visual: {args.media}), fp32, onnxruntime {ort.__version__} CPUExecutionProvider, "
          f"{args.threads or 'default'} intra-op threads, {args.repeats} repeats (median), "
          f"{args.decode_tokens} decode tokens" + (f" x {args.decode_batch} rows" if args.decode_batch > 1 else ""))

    samples: dict[str, dict[str, list[float]]] = {r: defaultdict(list) for r in ratios}
    kept: dict[str, int] = {}
    for r, rt in runners.items():   # warm-up
        generate(rt, ids, mask, images, max_new_tokens=2, video_seconds=seconds, media=prompt.media)
    batch = args.decode_batch
    for _ in tqdm(range(args.repeats), desc="repeats", unit="round"):
        for r, rt in runners.items():
            gen = generate(rt, ids, mask, images, max_new_tokens=args.decode_tokens if batch == 1 else 1,
                           video_seconds=seconds, media=prompt.media)
            kept[r] = int(gen.kept.shape[1])
            samples[r]["prefill"].append(gen.timings["pre_k"] + gen.timings["post_k"])
            samples[r]["vision"].append(gen.timings["vision"])
            if batch == 1:
                samples[r]["decode"].append(gen.timings["decode_per_token"])
                continue
            state = gen.state.repeat(batch)
            t0 = time.perf_counter()
            decode(rt, state, args.decode_tokens)
            samples[r]["decode"].append((time.perf_counter() - t0) / max(1, args.decode_tokens - 1))
    med = {r: {key: statistics.median(v) for key, v in s.items()} for r, s in samples.items()}

    text = n - m
    steps = args.decode_tokens - 1
    base = med["0"]
    rows = []
    for r in ratios:
        kv_b, kv_f, w = decode_read_bytes(shape, args.k, n, kept[r], steps, "fp32")
        kv_b, kv_f = batch * kv_b, batch * kv_f      # B rows of caches; the weights are read once a step
        deep = (shape.num_layers - args.k) * kv_cache_layer_elems(shape, kept[r] + args.decode_tokens) * FP32_BYTES
        rows.append({
            "config": "R=0" if r == "0" else f"K={args.k} R={r}", "ratio": r, "kept_tokens": kept[r],
            "prefill_speedup": base["prefill"] / med[r]["prefill"],
            "eq5_speedup": eq5_speedup(shape, m, text, args.k, r),
            "exact_speedup": exact_speedup(shape, m, text, args.k, r),
            "decode_speedup": base["decode"] / med[r]["decode"],
            "kv_read_ratio": kv_b / kv_f, "traffic_ratio": (kv_b + w) / (kv_f + w),
            "deep_kv_mib": deep / 2 ** 20, "vision_vs_r0": base["vision"] / med[r]["vision"],
        })
        rows[-1]["prefill_vs_eq5"] = rows[-1]["prefill_speedup"] / rows[-1]["eq5_speedup"]
    print(f"\n{'config':>10} {'kept n':>6} | {'prefill':>7} {'Eq.5':>5} {'exact':>5} {'meas/Eq5':>8} | "
          f"{'decode':>6} {'KV-read':>7} {'W+KV':>5} | {'deep-layer KV MiB':>17}")
    for row in rows:
        print(f"{row['config']:>10} {row['kept_tokens']:>6} | {row['prefill_speedup']:>7.2f} "
              f"{row['eq5_speedup']:>5.2f} {row['exact_speedup']:>5.2f} {row['prefill_vs_eq5']:>8.2f} | "
              f"{row['decode_speedup']:>6.2f} {row['kv_read_ratio']:>7.2f} {row['traffic_ratio']:>5.2f} | "
              f"{row['deep_kv_mib']:>17.1f}")
    print("speedups are unpruned (R=0 bundle) / FastV, medians; prefill = embed + pre_k + post_k; decode = per "
          f"step of {batch} row(s); KV-read = KV bytes read per decode step, unpruned / FastV; W+KV = weights + "
          "KV bytes read; "
          f"deep-layer KV = layers >= {args.k} after {n} prompt + {args.decode_tokens} tokens (fp32); "
          f"vision tower (same in all bundles) took {base['vision'] / base['prefill']:.1%} of the decoder prefill")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "decode_batch": batch, "rows": rows},
                                              indent=1))
    if args.plot:
        plot(rows, args.plot, batch)
    if args.profile:
        del runners
        with tempfile.TemporaryDirectory() as tmp:
            for step, what in ((False, "one prefill (the last of two)"),
                               (True, "one decode step (the last of three, batch 1)")):
                profiles = {r: profile_run(paths[r], (ids, mask, images), seconds, prompt.media, args.threads,
                                           Path(tmp), f"{'d' if step else 'p'}{i}", step)
                            for i, r in enumerate(ratios)}
                print_profile(profiles, what)


if __name__ == "__main__":
    main()
