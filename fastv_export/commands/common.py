"""Arguments shared by subcommands: the model and the FastV parameters.

Light on purpose: every command module imports this at module level, and `fastv-export --help`
builds all of them, so nothing here may import torch or transformers.
"""
from __future__ import annotations

import argparse

from fastv_export.config import FastVConfig
from fastv_export.graphs.op import RANKINGS
from fastv_export.presets import DEFAULT_MODEL, PRESETS
from fastv_export.runtime.runners import DEFAULT_RUNNER, RUNNERS

DEFAULT_RATIO = "1/2"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model PRESET|DIR`` (default: the built-in tiny-llava)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="PRESET|DIR",
                        help=f"built-in preset ({', '.join(PRESETS)}) or a local Hugging Face checkpoint "
                             f"directory (default: {DEFAULT_MODEL})")


def add_fastv_arguments(parser: argparse.ArgumentParser, *, ranking: bool = True) -> None:
    """The "FastV" argument group: ``--k``, ``--r`` / ``--keep`` (mutually exclusive) and, with
    ``ranking``, ``--ranking`` and ``--seed`` (commands whose result does not depend on the ranking,
    such as ``flops``, leave them out)."""
    g = parser.add_argument_group("FastV")
    g.add_argument("--k", type=int, default=2, help="pruning layer K (default 2)")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--r", default=None, metavar="R",
                      help=f"fraction of image tokens dropped: 0.5, 1/2 or 50%% (default {DEFAULT_RATIO})")
    what.add_argument("--keep", type=int, default=None, metavar="N",
                      help="absolute number of image tokens kept instead of --r")
    if ranking:
        g.add_argument("--ranking", choices=RANKINGS, default="last",
                       help="last: last prompt token's attention (authors' code); mean: attention received over "
                            "all prompt rows (paper); random: seeded ablation (default last)")
        g.add_argument("--seed", type=int, default=0, help="seed of --ranking random")


def fastv_config_from_args(args: argparse.Namespace) -> FastVConfig:
    """The :class:`FastVConfig` of the arguments added by :func:`add_fastv_arguments`."""
    ratio = None if args.keep is not None else (args.r if args.r is not None else DEFAULT_RATIO)
    return FastVConfig(k=args.k, ratio=ratio, keep=args.keep, ranking=args.ranking, seed=args.seed)


def add_runner_argument(parser: argparse.ArgumentParser) -> None:
    """``--runner NAME``: which runner executes the bundle (choices from :data:`RUNNERS`)."""
    parser.add_argument("--runner", choices=tuple(RUNNERS), default=DEFAULT_RUNNER,
                        help="; ".join(f"{k}: {v}" for k, v in RUNNERS.items()) + f" (default {DEFAULT_RUNNER})")
