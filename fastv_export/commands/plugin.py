"""`fastv-export plugin`: the TokenSelect plugin library of this installation, and rebuilding it."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

HELP = "describe the TokenSelect plugin library of this installation, or build one for another GPU"
DESCRIPTION = """\
`fastv-export plugin` (or `plugin info`) prints the TokenSelect plugin library that `fastv-export build`
uses when --plugin-lib is not given: its path, sha256 and the CUDA architectures it holds (read from the
library), or, when this installation has none, why and how engines will be built.

`fastv-export plugin build` compiles the library from the plugin sources the installed package carries
(plugins/ and scripts/build_plugin.sh; needs CUDA's nvcc and CMake, TensorRT headers from TensorRT_ROOT /
--tensorrt-include or fetched from PyPI), for another target than the packaged one, e.g. on a Jetson.
Pass the result to `fastv-export build BUNDLE --plugin-lib OUT/libfastv_plugins.so`, or copy it next to
a bundle's build_engines.sh.

examples:
  fastv-export plugin
  fastv-export plugin build --archs 87 --out orin-plugin \\
      --tensorrt-include /usr/include/aarch64-linux-gnu               # Jetson Orin, JetPack's TensorRT
  fastv-export plugin build --archs 110 --out thor-plugin             # Jetson Thor (CUDA 13)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{info,build}")
    sub.add_parser("info", help="describe the plugin library `fastv-export build` uses (the default action)")
    b = sub.add_parser("build", help="compile the plugin library from the installed sources")
    b.add_argument("--archs", default=None, metavar="CC[,CC...]",
                   help="CUDA architectures, e.g. 87 (Jetson Orin), 110 (Thor), 86,89 (default: $FASTV_CUDA_ARCHS, "
                        "else on x86_64 the wheel's list, else every target nvcc supports)")
    b.add_argument("--out", default="fastv-plugin", metavar="DIR",
                   help="folder receiving libfastv_plugins.so, the autoload shim and their JSON (default fastv-plugin)")
    b.add_argument("--tensorrt-include", default=None, metavar="DIR",
                   help="folder holding NvInfer.h (default: $TENSORRT_INCLUDE_DIR, $TensorRT_ROOT/include, else the "
                        "TensorRT 10.14 headers fetched from PyPI)")
    b.add_argument("--build-dir", default=None, metavar="DIR",
                   help="where the sources are copied and compiled, reused by later builds (default "
                        "$XDG_CACHE_HOME/fastv-export/plugin-build, i.e. ~/.cache/...)")
    b.add_argument("--jobs", type=int, default=None, metavar="N", help="parallel compile jobs (default: every core)")


def info_lines() -> list[str]:
    """What `fastv-export build` uses when --plugin-lib is not given (also printed by --version)."""
    from fastv_export import packaged_plugin as pp

    lib = pp.packaged_library()
    if lib is not None:
        info = pp.describe_library(lib, pp.build_record())
        lines = [f"TokenSelect plugin: {info.describe()}"]
        rec = info.record
        if rec.get("built"):
            lines.append(f"  built with nvcc {rec.get('nvcc', '?')} for {rec.get('cuda_archs_requested', '?')} "
                         f"on {rec.get('platform', '?')}")
        return lines
    root = pp.checkout_root()
    if root is not None:
        return [f"TokenSelect plugin: none packaged (source checkout {root}): `fastv-export build` compiles "
                "plugins/ for its targets with scripts/build_plugin.sh (needs nvcc)"]
    nvcc = pp.find_nvcc()
    return [f"TokenSelect plugin: none ({pp.no_plugin_reason()})",
            "  engines: `fastv-export build|pipeline --no-plugin` builds TokenSelect's ONNX function body; "
            "`fastv-export plugin build` compiles the plugin from the installed sources "
            + (f"(nvcc found: {nvcc})" if nvcc else "where CUDA's nvcc exists (none found here)")]


def _default_build_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fastv-export" / "plugin-build"


def build(args: argparse.Namespace) -> Path:
    """Compile the library into ``args.out``; returns its path."""
    import json

    from fastv_export import packaged_plugin as pp
    from fastv_export.files import atomic_write, atomic_write_json

    src = pp.source_root()
    if src is None:
        raise FastVError("this installation carries no plugin sources (plugin_src/); reinstall fastv-export from "
                         "its wheel or sdist, or build from a checkout with scripts/build_plugin.sh")
    nvcc = pp.find_nvcc()
    if nvcc is None:
        raise FastVError("no CUDA compiler: nvcc is not on PATH nor in /usr/local/cuda/bin (set CUDACXX to it); "
                         "without one, build engines with --no-plugin")
    if args.archs:
        archs = [a.strip().lower().replace("sm_", "").replace("sm", "").replace(".", "")
                 for a in args.archs.replace(";", ",").split(",") if a.strip()]
        if not archs or not all(a.split("-")[0].isdigit() for a in archs):
            raise FastVError(f"--archs {args.archs!r}: give compute capabilities such as 87 or 86,89")
        cmake_archs: str | None = ";".join(archs)
    else:
        default = pp.default_archs()
        cmake_archs = pp.wheel_cmake_archs(default) if default else None
    work = Path(args.build_dir) if args.build_dir else _default_build_dir()
    tree = work / "src"
    pp.copy_sources(src, tree)
    build_dir = work / ("build-" + (cmake_archs or "default").replace(";", "_"))
    print(f"compiling the TokenSelect plugin for {cmake_archs or 'every target nvcc supports'} with {nvcc} "
          f"in {build_dir}", flush=True)
    try:
        lib = pp.build_library(tree, build_dir, cmake_archs, tensorrt_include=args.tensorrt_include,
                               jobs=args.jobs, nvcc=nvcc)
    except RuntimeError as exc:
        log.info("%s", exc)
        raise FastVError(f"building the plugin failed ({str(exc).splitlines()[-1].strip()}); rerun with -v for "
                         "the build's output") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (pp.LIBRARY, pp.AUTOLOAD_LIBRARY):
        if (lib.parent / name).is_file():
            data = (lib.parent / name).read_bytes()
            atomic_write(out / name, lambda f, data=data: f.write(data))
            os.chmod(out / name, 0o755)
    record = pp.make_record(out / pp.LIBRARY, cmake_archs, nvcc, "fastv-export plugin build")
    atomic_write_json(out / pp.INFO_FILE, record)
    log.info("record: %s", json.dumps(record))
    return out / pp.LIBRARY


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        from fastv_export import packaged_plugin as pp

        lib = build(args)
        print(f"built {pp.describe_library(lib).describe()}")
        print(f"use it: fastv-export build BUNDLE --plugin-lib {lib}")
        return 0
    print("\n".join(info_lines()))
    return 0
