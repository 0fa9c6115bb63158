"""`fastv-export <subcommand>`: the command-line interface.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Expected failures (FastVError) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fastv_export.errors import FastVError

# subcommand name -> module (imported lazily so `--help` stays fast)
SUBCOMMANDS: dict[str, str] = {
    "generate": "fastv_export.commands.generate",
    "export": "fastv_export.commands.export",
    "validate": "fastv_export.commands.validate",
    "run": "fastv_export.commands.run",
    "flops": "fastv_export.analysis.flops",
    "analyze": "fastv_export.analysis.attention",
}

DESCRIPTION = """\
FastV visual-token pruning for Hugging Face vision-language models, exported for deployment.

FastV ranks the image tokens of a prompt by the attention they receive in decoder layer K-1 and
drops a fraction R of them for layers >= K (paper: arXiv 2403.06764). Every command runs on a
built-in tiny model by default (--model tiny-llava); pass --model DIR for a local Hugging Face
checkpoint.

examples:
  fastv-export generate --k 2 --r 1/2            # FastV vs unpruned on the default model
  fastv-export flops --model-config llava-1.5-13b --image-tokens 576 --text-tokens 36 --k 2 --r 50%
  fastv-export analyze --out analysis/           # attention allocation per layer (paper Fig. 3)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastv-export", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except FastVError as exc:
        print(f"fastv-export {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
