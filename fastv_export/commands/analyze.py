"""`fastv-export analyze`: where decoding attention goes, per layer (paper §3, Figs. 3-4)."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from fastv_export.analysis.attention import SHALLOW_LAYERS
from fastv_export.commands.common import add_model_argument
from fastv_export.errors import FastVError

HELP = "attention allocation and efficiency per token type and layer while decoding (paper §3, Figs. 3-4)"
DESCRIPTION = """\
Generate greedily on synthetic prompts (system tokens, image(s), instruction) with eager attention
and measure, in every decoder layer, how the attention of each output token is shared between the
system prompt (sys), image tokens (img), user instruction (ins) and output tokens (out):
allocation lambda (Eq. 3: summed over the output tokens, also shown as a share per output token)
and efficiency epsilon = lambda / |type| (Eq. 4), averaged over heads and prompts. Every output
token is counted, the first one through the prefill's last row (it has no output tokens to attend
to yet); --exclude-first-token counts only the KV-cached decode steps.

writes to --out:
  attention_stats.json        per-layer lambda, lambda share, epsilon, per-token alphas, the tokens
  attention_allocation.png    Figure 3 style: lambda shares and epsilon per layer, shallow vs deep
  attention_maps.png          Figure 4 style: per-layer attention maps of the first response

examples:
  fastv-export analyze --out analysis/
  fastv-export analyze --model tiny-qwen2-vl --prompts 8 --max-new-tokens 32 --out analysis-qwen/
  fastv-export analyze --model /path/to/llava-1.5-7b-hf --images 1 --out analysis-7b/
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--prompts", type=int, default=4, metavar="N",
                        help="synthetic prompts (different seeds and instruction lengths; default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=16, metavar="T",
                        help="greedy output tokens per response (fewer at EOS; default 16)")
    parser.add_argument("--images", type=int, default=1, metavar="I", help="images per prompt (default 1)")
    parser.add_argument("--system-tokens", type=int, default=6, help="system prompt tokens after BOS (default 6)")
    parser.add_argument("--text-tokens", type=int, default=12,
                        help="instruction tokens of the first prompt; the others vary around it (default 12)")
    parser.add_argument("--shallow-layers", type=int, default=SHALLOW_LAYERS,
                        help=f"layers counted as shallow (default {SHALLOW_LAYERS}, as in the paper)")
    parser.add_argument("--exclude-first-token", action="store_true",
                        help="count only the KV-cached decode steps, not the first output token (prefill's last row)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first synthetic prompt (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")


def _check_args(args: argparse.Namespace) -> None:
    if args.prompts < 1:
        raise FastVError(f"--prompts must be >= 1, got {args.prompts}")
    if args.max_new_tokens < 1:
        raise FastVError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.exclude_first_token and args.max_new_tokens < 2:
        raise FastVError("--exclude-first-token needs --max-new-tokens >= 2")
    if args.images < 1:
        raise FastVError(f"--images must be >= 1 (the analysis measures attention to image tokens), got {args.images}")
    if args.system_tokens < 0 or args.text_tokens < 1:
        raise FastVError("--system-tokens must be >= 0 and --text-tokens >= 1")
    if args.shallow_layers < 1:
        raise FastVError(f"--shallow-layers must be >= 1, got {args.shallow_layers}")


def _prepare_out_dir(out: str) -> Path:
    """Create ``--out`` if missing and check that files can be written there."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FastVError(f"--out {out}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FastVError(f"--out {out}: cannot write there ({exc.strerror or exc}); pass a writable directory") \
            from None
    return path


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from fastv_export.adapters import get_adapter
    from fastv_export.analysis.attention import analyze_attention, format_table, plot_allocation, plot_attention_maps
    from fastv_export.files import atomic_write_json
    from fastv_export.presets import load_model
    from fastv_export.prompts import make_prompt

    _check_args(args)
    out = _prepare_out_dir(args.out)

    model = load_model(args.model, attn_implementation="eager")
    adapter = get_adapter(model)
    if not adapter.image_token_ids() or adapter.image_tokens_per_image() < 1:
        raise FastVError(f"model {args.model!r} has no image tokens; the analysis needs a vision-language model")
    num_layers = adapter.decoder_shape().num_layers
    if args.shallow_layers > num_layers:
        raise FastVError(f"--shallow-layers {args.shallow_layers} exceeds the model's {num_layers} layers")
    prompts = [make_prompt(adapter, args.text_tokens + (5 * i) % 13, num_images=args.images,
                           system_tokens=args.system_tokens, seed=args.seed + i) for i in range(args.prompts)]
    stats = analyze_attention(model, prompts, args.max_new_tokens, include_first_token=not args.exclude_first_token,
                              shallow_layers=args.shallow_layers, model_name=args.model)

    data = stats.to_dict()
    data["settings"] = {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "images": args.images,
                        "system_tokens": args.system_tokens, "text_tokens": args.text_tokens, "seed": args.seed}
    atomic_write_json(out / "attention_stats.json", data, indent=1)
    plot_allocation(stats, out / "attention_allocation.png")
    plot_attention_maps(stats.example_maps, stats.example_segments, out / "attention_maps.png",
                        title=f"{args.model}: attention maps of response 0 ({stats.prompts[0].prompt_tokens} prompt "
                              f"+ {len(stats.prompts[0].output_tokens)} output tokens; dashed: sys | img | ins | out)")

    p0 = stats.prompts[0].type_sizes
    n_out = np.mean([p.type_sizes["out"] for p in stats.prompts])
    print(f"model {args.model}: {len(stats.prompts)} responses, {stats.num_layers} layers; tokens of prompt 0: "
          f"sys {p0['sys']}, img {p0['img']}, ins {p0['ins']}; avg output tokens counted {n_out:.1f} "
          f"({'first output token included' if stats.include_first_token else 'first output token excluded'})")
    print(format_table(stats))
    tok = stats.token_share()[1]
    sh = stats.share(stats.shallow)["img"]
    line = (f"image tokens: {tok:.1%} of the tokens; attention share in shallow layers "
            f"(0-{stats.shallow_layers - 1}) {sh:.1%}")
    if stats.shallow_layers < stats.num_layers:
        dp = stats.share(stats.deep)["img"]
        line += f", in deep layers ({stats.shallow_layers}-{stats.num_layers - 1}) {dp:.1%}"
    print(line)
    print(f"wrote {out / 'attention_stats.json'}, {out / 'attention_allocation.png'}, {out / 'attention_maps.png'}")
    return 0
