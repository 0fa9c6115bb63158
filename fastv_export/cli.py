"""`fastv-export <subcommand>`: the command-line interface.

Each subcommand lives in ``fastv_export/commands/<name>.py`` and exposes ``HELP`` (one line),
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``. Command modules import only
light modules at module level (torch, transformers and ONNX are imported inside ``run``), so that
``--help`` and ``flops`` start fast. Expected failures (FastVError) print one line and exit 2.
Known third-party warnings and log lines are hidden unless ``-v`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings
from typing import Iterator

from fastv_export.errors import FastVError

# subcommand name -> module
SUBCOMMANDS: dict[str, str] = {
    "generate": "fastv_export.commands.generate",
    "export": "fastv_export.commands.export",
    "validate": "fastv_export.commands.validate",
    "run": "fastv_export.commands.run",
    "build": "fastv_export.commands.build",
    "pipeline": "fastv_export.commands.pipeline",
    "flops": "fastv_export.commands.flops",
    "analyze": "fastv_export.commands.analyze",
    "calibrate": "fastv_export.commands.calibrate",
    "plugin": "fastv_export.commands.plugin",
}

DESCRIPTION = """\
FastV visual-token pruning for Hugging Face vision-language models, exported for deployment.

FastV ranks the image tokens of a prompt by the attention they receive in decoder layer K-1 and
drops a fraction R of them for layers >= K (paper: arXiv 2403.06764). Every command runs on a
built-in tiny model by default (--model tiny-llava); pass --model DIR for a local Hugging Face
checkpoint.

examples:
  fastv-export pipeline --out bundle --force     # export, validate, build engines, summary
  fastv-export generate --k 2 --r 1/2            # FastV vs unpruned on the default model
  fastv-export flops --model-config llava-1.5-13b --image-tokens 576 --text-tokens 36 --k 2 --r 50%
  fastv-export analyze --out analysis/           # attention allocation per layer (paper Fig. 3)
  fastv-export calibrate --out calib --max-flops-ratio 0.5   # choose K and R on the trained demo
"""

# --- known third-party noise, hidden unless -v ----------------------------------------------------
_THIRD_PARTY = r"(torch|transformers|onnxscript|onnx_ir)(\.|$)"
# (category, message regex, module regex) of the warnings hidden
WARNING_FILTERS: tuple[tuple[type[Warning], str, str], ...] = (
    # torch.utils._pytree's "`isinstance(treespec, LeafSpec)` is deprecated" (raised from copyreg while exporting)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", ""),
    # future API changes announced by torch / transformers / onnxscript / onnx_ir to their callers
    (FutureWarning, "", _THIRD_PARTY),
    # deprecations inside torch / transformers / onnxscript / onnx_ir (e.g. of their own dependencies)
    (DeprecationWarning, "", _THIRD_PARTY),
    # tracing and export remarks of torch / transformers / onnxscript / onnx_ir (e.g. constant-folded tensors)
    (UserWarning, "", _THIRD_PARTY),
)
# loggers set to ERROR
QUIET_LOGGERS: tuple[str, ...] = (
    # torch's ONNX exporter: W-prefixed lines such as "torchvision is not installed. Skipping torchvision::nms"
    "torch.onnx",
    # transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to `...Pil`"
    "transformers.utils.import_utils",
)
# torch resets its own loggers' levels when it is imported (by the command, after the levels above
# are set): TORCH_LOGS passes the same setting to that moment ("-onnx": torch.onnx at ERROR)
QUIET_TORCH_LOGS = "-onnx"


@contextlib.contextmanager
def third_party_noise_hidden() -> Iterator[None]:
    """Hide :data:`WARNING_FILTERS` and the :data:`QUIET_LOGGERS` below ERROR inside the block (also
    through TORCH_LOGS, unless the user set it); warning filters, logger levels and the environment
    are restored after it."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    set_env = "TORCH_LOGS" not in os.environ
    with warnings.catch_warnings():
        for category, message, module in WARNING_FILTERS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        if set_env:
            os.environ["TORCH_LOGS"] = QUIET_TORCH_LOGS
        try:
            yield
        finally:
            if set_env:
                os.environ.pop("TORCH_LOGS", None)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class VersionAction(argparse.Action):
    """``--version``: the package version and the TokenSelect plugin library `build` uses (path, sha256,
    CUDA architectures), computed only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from fastv_export import __version__
        from fastv_export.commands.plugin import info_lines

        print("\n".join([f"fastv-export {__version__}", *info_lines()]))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (imports the command modules, which are light)."""
    parser = argparse.ArgumentParser(prog="fastv-export", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress and timings, and show third-party warnings")
    parser.add_argument("--version", action=VersionAction,
                        help="print the version and the TokenSelect plugin library (sha256, CUDA architectures)")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # -v: this package's INFO lines (progress, timings); third-party loggers stay at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastv_export").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    quiet = contextlib.nullcontext() if args.verbose else third_party_noise_hidden()
    try:
        with quiet:
            return int(args._run(args) or 0)
    except FastVError as exc:
        print(f"fastv-export {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
