"""`fastv-export generate`: FastV against the unpruned model on the same prompts, side by side."""
from __future__ import annotations

import argparse
import json
import time

from fastv_export.commands.common import add_fastv_arguments, add_model_argument, fastv_config_from_args
from fastv_export.errors import FastVError

HELP = "greedy generation with FastV beside the unpruned model (tokens, kept tokens, prefill time)"
DESCRIPTION = """\
Run the PyTorch reference FastV on synthetic prompts (system tokens, image(s), instruction) and
compare it with the unmodified model on the same inputs: greedy tokens, how many image tokens
were kept, and the prefill time of both, measured side by side.

examples:
  fastv-export generate                                   # tiny-llava, K=2, R=1/2
  fastv-export generate --model tiny-qwen2-vl --k 1 --r 75% --ranking mean --batch 3
  fastv-export generate --model /path/to/llava-1.5-7b-hf --k 2 --r 1/2 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_fastv_arguments(parser)
    parser.add_argument("--images", type=int, default=1, help="images per prompt (one candidate pool)")
    parser.add_argument("--text-tokens", type=int, default=12, help="instruction tokens of the first prompt")
    parser.add_argument("--batch", type=int, default=1, help="prompts per batch (different lengths, left padding)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="prefill timing repeats")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _prefill_seconds(model, inputs, repeats: int) -> float:
    """Best of ``repeats`` wall times of one prefill (a forward over the whole prompt)."""
    import torch

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(**inputs, use_cache=True)
            best = min(best, time.perf_counter() - t)
    return best


def run(args: argparse.Namespace) -> int:
    import torch

    from fastv_export.adapters import get_adapter
    from fastv_export.presets import load_model
    from fastv_export.prompts import make_prompt
    from fastv_export.reference.fastv import apply_fastv

    if args.batch < 1 or args.images < 0 or args.max_new_tokens < 1 or args.text_tokens < 1 or args.repeats < 1:
        raise FastVError("--batch, --text-tokens, --max-new-tokens and --repeats must be >= 1, --images >= 0")
    cfg = fastv_config_from_args(args)
    model = load_model(args.model)
    adapter = get_adapter(model)
    cfg.check_layers(adapter.decoder_shape().num_layers)
    lengths = [args.text_tokens + 3 * i for i in range(args.batch)]
    prompt = make_prompt(adapter, lengths, num_images=args.images, seed=args.seed)
    inputs = prompt.model_inputs()
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    with torch.no_grad():
        base = model.generate(**inputs, **gen)
    base_time = _prefill_seconds(model, inputs, args.repeats)
    with apply_fastv(model, cfg) as handle:
        with torch.no_grad():
            fast = model.generate(**inputs, **gen)
        kept = handle.kept_positions
        m = 0 if handle.candidates is None else handle.candidates.shape[1]
        fast_time = _prefill_seconds(model, inputs, args.repeats)
    n = prompt.input_ids.shape[1]
    new = slice(n, None)
    match = (base[:, new] == fast[:, new]).float().mean().item()
    result = {
        "model": args.model, "fastv": cfg.describe(), "prompt_tokens": n, "image_tokens": m,
        "kept_tokens": n if kept is None else kept.shape[1],
        "kept_image_tokens": m if kept is None else kept.shape[1] - (n - m),
        "greedy_token_agreement": match,
        "baseline_tokens": base[:, new].tolist(), "fastv_tokens": fast[:, new].tolist(),
        "prefill_speedup_measured": base_time / fast_time,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {args.model}: {n} prompt tokens ({m} image tokens), FastV {cfg.describe()}")
    print(f"kept {result['kept_tokens']} of {n} tokens ({result['kept_image_tokens']} of {m} image tokens)")
    for r in range(base.shape[0]):
        print(f"row {r} unpruned: {base[r, new].tolist()}")
        print(f"row {r} FastV   : {fast[r, new].tolist()}")
    print(f"greedy token agreement: {match:.1%}")
    print(f"prefill time FastV/unpruned, measured side by side (best of {args.repeats}): "
          f"{fast_time / base_time:.2f} (speedup {result['prefill_speedup_measured']:.2f}x)")
    return 0
