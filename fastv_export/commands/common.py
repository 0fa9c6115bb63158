"""Arguments shared by subcommands: the model and the FastV parameters."""
from __future__ import annotations

import argparse

from fastv_export.config import RANKINGS, FastVConfig
from fastv_export.presets import DEFAULT_MODEL, PRESETS


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="PRESET|DIR",
                        help=f"built-in preset ({', '.join(PRESETS)}) or a local Hugging Face checkpoint "
                             f"directory (default: {DEFAULT_MODEL})")


def add_fastv_arguments(parser: argparse.ArgumentParser, default_k: int = 2) -> None:
    g = parser.add_argument_group("FastV")
    g.add_argument("--k", type=int, default=default_k, help=f"pruning layer K (default {default_k})")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--r", default=None, metavar="R",
                      help="fraction of image tokens dropped: 0.5, 1/2 or 50%% (default 1/2)")
    what.add_argument("--keep", type=int, default=None, help="absolute number of image tokens kept instead of --r")
    g.add_argument("--ranking", choices=RANKINGS, default="last",
                   help="last: last prompt token's attention (authors' code); mean: attention received over "
                        "all prompt rows (paper); random: seeded ablation (default last)")
    g.add_argument("--seed", type=int, default=0, help="seed of --ranking random")


def fastv_config_from_args(args: argparse.Namespace) -> FastVConfig:
    ratio = None if args.keep is not None else (args.r if args.r is not None else "1/2")
    return FastVConfig(k=args.k, ratio=ratio, keep=args.keep, ranking=args.ranking, seed=args.seed)
