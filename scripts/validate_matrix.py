#!/usr/bin/env python
"""Export and validate the full acceptance matrix of issue 4: every preset x ranking x K x R,
fp32, greedy generation of --max-new-tokens tokens at batch sizes 1 and 3, each bundle exported
with `export_bundle` and checked with `validate_bundle` (the same code as `fastv-export export`
and `fastv-export validate`). CI runs a pairwise cover of this matrix (tests/test_validate.py);
this script runs all of it (48 exports, about 10-20 s each on 2 CPU cores).

With --runtime PATH (fastv-run, built by scripts/build_runtime.sh), each bundle also runs in the C++
runtime (cpu executor) on a batch-1 prompt, whose tokens and kept positions must equal the Python loop's
on the same inputs (CI runs that on the same cover: tests/test_cpp_runtime.py).

Prints one row per combination and writes a JSON summary; exit status 0 only if every row passes.

usage: python scripts/validate_matrix.py [--presets tiny-llava,tiny-qwen2-vl] [--rankings last,mean]
                                         [--ks 1,2,last] [--ratios 0,1/2,3/4,9/10] [--out DIR]
                                         [--runtime build/runtime/fastv-run]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from fastv_export import FastVConfig
from fastv_export.adapters import get_adapter
from fastv_export.bundle import Bundle
from fastv_export.export.onnx_export import ExportOptions, export_bundle
from fastv_export.presets import build_preset_config, load_model
from fastv_export.prompts import make_prompt
from fastv_export.runtime.dump import dump_inputs
from fastv_export.runtime.generate import find_candidates, generate
from fastv_export.runtime.runners import open_runner
from fastv_export.validate import validate_bundle


def layer_counts(presets: list[str]) -> dict[str, int]:
    return {p: build_preset_config(p).get_text_config().num_hidden_layers for p in presets}


def runtime_check(exe: Path, bundle: Bundle, adapter, steps: int, work: Path) -> str:
    """fastv-run's cpu executor on a batch-1 prompt against the Python loop on the same inputs: "same", or
    what differs."""
    prompt = make_prompt(adapter, 12, num_images=1)
    ids, mask = prompt.input_ids.numpy(), prompt.attention_mask.numpy()
    images = [u.numpy() for u in prompt.vision_units(adapter)]
    dump_inputs(work, ids, mask, images, find_candidates(ids, bundle.image_token_ids))
    proc = subprocess.run([str(exe), "--bundle", str(bundle.path), "--inputs", str(work), "--executor", "cpu",
                           "--max-new-tokens", str(steps), "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        return "fastv-run failed: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
    out = json.loads(proc.stdout)
    gen = generate(open_runner(bundle), ids, mask, images, steps, eos_token_id=bundle.eos_token_id)
    if out["tokens"] != gen.tokens.tolist():
        return f"tokens differ: C++ {out['tokens']}, Python {gen.tokens.tolist()}"
    if out["kept_positions"] != gen.kept.tolist():
        return "kept positions differ"
    return "same"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-llava,tiny-qwen2-vl")
    ap.add_argument("--rankings", default="last,mean")
    ap.add_argument("--ks", default="1,2,last", help="comma-separated K values; 'last' = the last decoder layer")
    ap.add_argument("--ratios", default="0,1/2,3/4,9/10")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,3")
    ap.add_argument("--out", default=None, help="keep the bundles here (default: a temporary directory, removed)")
    ap.add_argument("--summary", default="validate_matrix.json", help="JSON summary path")
    ap.add_argument("--runtime", default=None, metavar="FASTV_RUN",
                    help="also run each bundle in the C++ runtime (this fastv-run, cpu executor) and compare")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    presets = args.presets.split(",")
    layers = layer_counts(presets)
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    combos = [(p, r, layers[p] - 1 if k == "last" else int(k), ratio)
              for p in presets for r in args.rankings.split(",") for k in args.ks.split(",")
              for ratio in args.ratios.split(",")]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastv-matrix-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    exe = Path(args.runtime).resolve() if args.runtime else None
    if exe is not None and not exe.is_file():
        ap.error(f"--runtime {args.runtime} does not exist: build it with scripts/build_runtime.sh")
    adapters = {p: get_adapter(load_model(p)) for p in presets} if exe else {}
    print(f"{'preset':>14} {'ranking':>7} {'K':>2} {'R':>5} {'batch':>5} {'n_kept':>6} {'logits err':>11} "
          f"{'tokens':>6} {'selection':>9} {'seconds':>7}  result" + ("  C++ runtime" if exe else ""))
    try:
        for preset, ranking, k, ratio in tqdm(combos, desc="matrix", unit="bundle"):
            path = root / f"{preset}-{ranking}-k{k}-r{ratio.replace('/', '_')}"
            t = time.perf_counter()
            bundle = export_bundle(path, FastVConfig(k=k, ratio=ratio, ranking=ranking),
                                   ExportOptions(model=preset, dtype="fp32", force=True))
            report = validate_bundle(bundle, args.max_new_tokens, sizes)
            cpp = runtime_check(exe, bundle, adapters[preset], args.max_new_tokens, path / "cpp-inputs") if exe else None
            seconds = time.perf_counter() - t
            for c in report["cases"]:
                sel = "same" if c["selection_identical"] else f"{len(c['borderline_swaps'])} swaps"
                if cpp not in (None, "same"):
                    c = dict(c, passed=False, failure=c["failure"] or "the C++ runtime differs")
                tqdm.write(f"{preset:>14} {ranking:>7} {k:>2} {ratio:>5} {c['batch']:>5} {c['kept_tokens']:>6} "
                           f"{c['max_logits_error']:>11.2e} {'same' if c['tokens_identical'] else 'DIFF':>6} "
                           f"{sel:>9} {seconds:>7.1f}  {'PASS' if c['passed'] else 'FAIL: ' + c['failure']}"
                           + (f"  {cpp}" if cpp is not None else ""))
                rows.append({"preset": preset, "ranking": ranking, "k": k, "ratio": ratio, **c,
                             **({"cpp_runtime": cpp} if cpp is not None else {})})
            if not args.out:
                shutil.rmtree(path)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    failed = [r for r in rows if not r["passed"]]
    worst = max(r["max_logits_error"] for r in rows)
    print(f"{len(combos)} bundles, {len(rows)} cases: {len(rows) - len(failed)} passed, {len(failed)} failed; "
          f"worst logits error {worst:.2e}; tokens identical in "
          f"{sum(r['tokens_identical'] for r in rows)}/{len(rows)} cases")
    Path(args.summary).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
