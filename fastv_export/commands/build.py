"""`fastv-export build`: TensorRT engines for a bundle (post-K built for the pruned length)."""
from __future__ import annotations

import argparse

from fastv_export.engines.profiles import DEFAULT_TEXT_TOKENS, BuildLimits
from fastv_export.errors import FastVError
from fastv_export.memory import add_memory_argument

HELP = "build the bundle's TensorRT engines (TensorRT 10 on this GPU, or TensorRT-RTX ahead of time)"
_D = BuildLimits()
DESCRIPTION = """\
Build vision, embed, pre_k and post_k engines into the bundle and record them in manifest.json
(file, sha256, backend version, targets, precision, profiles, plugin checksum). Every LLM engine
gets a prefill and a decode profile; post_k's are built for the PRUNED length
n' = n - M + keep(M) (n: --max-prompt, M: image tokens of --images images), which is where FastV's
saving shows in the engine. The bundle is replaced atomically: a failed build leaves it as it was.

Backends: tensorrt (TensorRT 10 installed here: a build for this machine's GPU, Jetson included)
and tensorrt-rtx (TensorRT for RTX, ahead of time for --compute-capability, no GPU needed; it
offers 7.5, 8.0, 8.6, 8.9, 12.0, 12.1). Default: tensorrt when it imports, else tensorrt-rtx.
The plugin library (TokenSelect): --plugin-lib, else the one installed with the package (`fastv-export
plugin` describes it), else one built from the checkout's plugins/; --no-plugin builds TokenSelect's ONNX
function body instead (slower: it materialises the attention map).

For a device with its own TensorRT (Jetson Orin/Thor, H100: targets TensorRT-RTX cannot build
for), --print-trtexec prints the equivalent trtexec command lines without building; every build
also writes them into the bundle as build_engines.sh.

examples:
  fastv-export build bundle --backend tensorrt-rtx --compute-capability 8.6,8.9
  fastv-export build bundle --no-plugin --max-prompt 1024 --max-new-tokens 128
  fastv-export build bundle --print-trtexec > build.sh      # run it on the Jetson
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `fastv-export export`")
    add_build_arguments(parser)
    parser.add_argument("--print-trtexec", action="store_true",
                        help="print the trtexec command lines for these engines and exit (builds nothing)")
    add_memory_argument(parser)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Backend, targets, plugin and limits (shared with `fastv-export pipeline`)."""
    parser.add_argument("--backend", choices=("tensorrt", "tensorrt-rtx"), default=None,
                        help="TensorRT 10 (GPU build here) or TensorRT-RTX (ahead of time); default: tensorrt if "
                             "installed, else tensorrt-rtx")
    parser.add_argument("--compute-capability", default="8.6,8.9", metavar="CC[,CC...]",
                        help="TensorRT-RTX targets, e.g. 8.6,8.9 (default 8.6,8.9)")
    plugin = parser.add_mutually_exclusive_group()
    plugin.add_argument("--plugin-lib", default=None, metavar="PATH",
                        help="libfastv_plugins.so to use (default: the one installed with the package, else "
                             "built from the checkout's plugins/)")
    plugin.add_argument("--no-plugin", action="store_true",
                        help="build TokenSelect's ONNX function body instead of the plugin")
    limits = parser.add_argument_group("limits (the engines' profiles)")
    limits.add_argument("--max-batch", type=int, default=_D.max_batch, metavar="B",
                        help=f"prompts per batch (default {_D.max_batch})")
    limits.add_argument("--max-prompt", type=int, default=None, metavar="N",
                        help=f"prompt tokens, image tokens included (default: the images' tokens + "
                             f"{DEFAULT_TEXT_TOKENS} text tokens)")
    limits.add_argument("--images", type=int, default=_D.images, metavar="I",
                        help=f"images per prompt: M = I x image tokens per image (default {_D.images})")
    limits.add_argument("--max-new-tokens", type=int, default=_D.max_new_tokens, metavar="T",
                        help=f"generated tokens (default {_D.max_new_tokens})")


def build_options_from_args(args: argparse.Namespace):
    """The :class:`BuildOptions` of the arguments added by :func:`add_build_arguments`."""
    from fastv_export.engines.build import BuildOptions

    ccs = tuple(c.strip() for c in args.compute_capability.split(",") if c.strip())
    if not ccs:
        raise FastVError("--compute-capability names no target; give e.g. 8.6,8.9")
    limits = BuildLimits(max_batch=args.max_batch, max_prompt=args.max_prompt, images=args.images,
                         max_new_tokens=args.max_new_tokens)
    return BuildOptions(backend=args.backend, compute_capabilities=ccs, plugin_library=args.plugin_lib,
                        use_plugin=not args.no_plugin, limits=limits)


def with_plugin_resolved(options):
    """``options`` with the plugin library chosen (packaged, or built from the checkout) before any work, so
    that `build` and `pipeline` stop at once, in one line that offers --no-plugin, when there is none."""
    import dataclasses
    from pathlib import Path

    from fastv_export.engines.build import default_plugin_library, resolve_backend, target_names

    if not options.use_plugin:
        return options
    if options.plugin_library:
        if not Path(options.plugin_library).is_file():
            raise FastVError(f"--plugin-lib {options.plugin_library} does not exist; pass a libfastv_plugins.so "
                             "(`fastv-export plugin build` makes one) or --no-plugin")
        return options
    backend = resolve_backend(options.backend)
    targets = target_names(options.compute_capabilities) if backend == "tensorrt-rtx" else ["CURRENT"]
    return dataclasses.replace(options, plugin_library=str(default_plugin_library(targets)))


def build_with_progress(bundle, options):
    """build_engines (``bundle``: a verified Bundle or a directory) with one progress bar (it starts once
    the inputs are checked); returns the rebuilt Bundle."""
    from tqdm import tqdm

    from fastv_export.bundle import Bundle, load_bundle
    from fastv_export.engines.build import build_engines
    from fastv_export.graphs import spec
    from fastv_export.quantize import check_target

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if options.backend != "tensorrt":           # TensorRT-RTX ahead of time: quantized weights need SM80+
        check_target(bundle.quantization_scheme, options.compute_capabilities)
    bar = None

    def progress(graph: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=len(spec.GRAPHS), desc="build", unit="engine", leave=False)
        else:
            bar.update(1)
        bar.set_postfix_str(graph)

    try:
        return build_engines(bundle, options, progress)
    finally:
        if bar is not None:
            bar.close()


def measured_build(bundle, options, ignore_memory_check: bool):
    """build_with_progress after the memory check (stops if the estimate does not fit), its peak RSS recorded in
    BUNDLE/logs/stages.json (the log of the earlier stages kept: the build replaces the bundle directory)."""
    from fastv_export import memory

    est, available = memory.preflight(lambda: memory.build_estimate(bundle), memory.BUILD_ADVICE[bundle.precision],
                                      ignore_memory_check)
    previous = memory.read_stage_log(bundle.path)
    with memory.measure("build", est, available) as record:
        rebuilt = build_with_progress(bundle, options)
    record.extra = {"backend": rebuilt.engines.backend}
    memory.record_stages(rebuilt.path, record, previous=previous)
    return rebuilt


def run(args: argparse.Namespace) -> int:
    from fastv_export.bundle import load_bundle
    from fastv_export.engines.build import format_summary, trtexec_script

    options = build_options_from_args(args)
    if args.print_trtexec:
        print(trtexec_script(load_bundle(args.bundle), options.limits, use_plugin=options.use_plugin), end="")
        return 0
    bundle = load_bundle(args.bundle)                      # a wrong bundle first, then a missing plugin
    section = measured_build(bundle, with_plugin_resolved(options), args.ignore_memory_check).engines
    print(format_summary(section))
    print(f"wrote the engines into {args.bundle} (manifest.json 'engines'; trtexec lines: "
          f"{args.bundle}/{section.trtexec_script})")
    return 0
