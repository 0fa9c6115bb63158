"""`fastv-export flops`: theoretical FLOPs and KV-cache size of a FastV prefill, no model run.

Imports neither torch nor transformers (a built-in model preset reads its config through
transformers, the paper presets and config.json files do not).
"""
from __future__ import annotations

import argparse
import json

from fastv_export.analysis.flops import (DEFAULT_MODEL_CONFIG, DTYPE_BYTES, PAPER_PRESETS, estimate, format_report,
                                         resolve_shape)
from fastv_export.commands.common import add_fastv_arguments

HELP = "theoretical FLOPs (paper Eq. 5 and an exact count) and KV-cache size of a FastV prefill"
DESCRIPTION = f"""\
Estimate what FastV saves in prefill, without running a model.

Eq. 5 of the paper prices one decoder layer over n tokens at 4nd^2 + 2n^2d + 2ndm (d hidden size,
m FFN intermediate size). With n = image + text tokens and n_hat = n - floor(M*R) (M image tokens,
R the dropped fraction, an exact rational), layers < K see n tokens and layers >= K see n_hat.
The paper's Table 1 "Flops(B)" column is the per-layer average of this in units of 1e9, with
576 image + 36 text tokens (LLaVA-1.5-13B baseline: 154.6; K=2 R=50%: 84.6).

Beside it, an exact count for the whole prefill (multiply-add = 2 FLOPs): q/k/v/o projections
with grouped-query attention, causal attention (query i sees i keys), the gated MLP and the
lm_head on the last token; norms, softmax and rotary embeddings are ignored. The KV cache holds
n tokens in layers < K and n_hat in layers >= K.

--model-config takes a config.json (or checkpoint directory), a paper preset
({', '.join(PAPER_PRESETS)}) or a built-in model preset (default: {DEFAULT_MODEL_CONFIG}).

examples:
  fastv-export flops --model-config llava-1.5-13b --k 2 --r 50%
  fastv-export flops --model-config llava-1.5-7b --k 3 --r 3/4 --json
  fastv-export flops --model-config path/to/config.json --image-tokens 2304 --keep 576 --dtype bf16
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", default=DEFAULT_MODEL_CONFIG, metavar="CONFIG.json|PRESET",
                        help=f"HF config.json, checkpoint directory or preset (default {DEFAULT_MODEL_CONFIG})")
    parser.add_argument("--image-tokens", type=int, default=576, metavar="M", help="image tokens (default 576)")
    parser.add_argument("--text-tokens", type=int, default=36, metavar="T", help="text tokens (default 36)")
    add_fastv_arguments(parser, ranking=False)   # the ranking does not change the cost
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="fp16",
                        help="KV-cache element type (default fp16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    shape = resolve_shape(args.model_config)
    rep = estimate(shape, image_tokens=args.image_tokens, text_tokens=args.text_tokens, k=args.k,
                   ratio=args.r, keep=args.keep, dtype=args.dtype, model=str(args.model_config))
    print(json.dumps(rep.to_dict()) if args.json else format_report(rep))
    return 0
