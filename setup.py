"""The wheel's build step: the TokenSelect plugin library and its sources go into the package.

pyproject.toml holds the metadata. For a wheel (``pip wheel .``, ``python -m build``, ``pip install <sdist>``),
not for an editable install (scripts/setup.sh, where `fastv-export build` compiles plugins/ on demand), this
adds to the package (fastv_export/packaged_plugin.py describes the layout):

- ``plugin_src/``: plugins/ and scripts/build_plugin.sh, fetch_trt_headers.sh (`fastv-export plugin build`);
- ``plugin_lib/``: libfastv_plugins.so (+ the autoload shim) compiled by scripts/build_plugin.sh for
  $FASTV_CUDA_ARCHS or, on x86_64, the wheel's list (packaged_plugin.WHEEL_CUDA_ARCHS), and
  libfastv_plugins.json (architectures, sha256, nvcc). The wheel is then tagged for this platform.
  Without nvcc the package builds without the library (the JSON records why; pure-Python wheel) and
  `fastv-export build` says how to get engines.

Environment: FASTV_BUILD_PLUGIN=0 skips the compile; FASTV_REQUIRE_PLUGIN=1 turns a missing nvcc or a failed
compile into a failed build (CI); FASTV_PLUGIN_BUILD_DIR is the CMake build folder (default build/plugins-wheel
here, incremental across builds); TENSORRT_INCLUDE_DIR / TensorRT_ROOT as for scripts/build_plugin.sh.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py
from setuptools.command.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent


def _packaged_plugin():
    """fastv_export/packaged_plugin.py, loaded by path (the package's dependencies are not installed here)."""
    path = ROOT / "fastv_export" / "packaged_plugin.py"
    spec = importlib.util.spec_from_file_location("_fastv_packaged_plugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pp = _packaged_plugin()


def _say(message: str) -> None:
    print(f"fastv-export build: {message}", file=sys.stderr, flush=True)


def _plugin_wanted() -> bool:
    return os.environ.get("FASTV_BUILD_PLUGIN", "1") != "0"


def _will_compile() -> bool:
    return _plugin_wanted() and pp.find_nvcc() is not None


class BuildPyWithPlugin(build_py):
    """build_py, then (wheels only) the plugin's sources and, where nvcc exists, the compiled library."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        package = Path(self.build_lib) / "fastv_export"
        src_dst, lib_dst = package / pp.SRC_DIR, package / pp.LIB_DIR
        for stale in (src_dst, lib_dst):       # build/lib persists between builds of a checkout
            shutil.rmtree(stale, ignore_errors=True)
        pp.copy_sources(ROOT, src_dst)
        lib_dst.mkdir(parents=True)
        (lib_dst / pp.INFO_FILE).write_text(json.dumps(self._build_plugin(lib_dst), indent=2) + "\n")

    def _build_plugin(self, lib_dst: Path) -> dict:
        """Compile the library into ``lib_dst``; the JSON record of what happened."""
        require = os.environ.get("FASTV_REQUIRE_PLUGIN") == "1"
        nvcc = pp.find_nvcc()
        if not _plugin_wanted():
            reason = "FASTV_BUILD_PLUGIN=0 at build time"
        elif nvcc is None:
            reason = "no nvcc found at build time: $CUDACXX, PATH, /usr/local/cuda/bin"
        else:
            archs = pp.default_archs()
            build_dir = Path(os.environ.get("FASTV_PLUGIN_BUILD_DIR") or ROOT / "build" / "plugins-wheel")
            cmake_archs = pp.wheel_cmake_archs(archs) if archs else None
            _say(f"compiling the TokenSelect plugin with {nvcc} for {cmake_archs or 'the default list'} "
                 f"in {build_dir}")
            try:
                lib = pp.build_library(ROOT, build_dir, cmake_archs, nvcc=nvcc)
            except RuntimeError as exc:
                if require:
                    raise
                reason = f"compiling it failed: {str(exc).splitlines()[-1]}"
            else:
                for name in (pp.LIBRARY, pp.AUTOLOAD_LIBRARY):
                    if (lib.parent / name).is_file():
                        shutil.copy2(lib.parent / name, lib_dst / name)
                record = pp.make_record(lib_dst / pp.LIBRARY, cmake_archs, nvcc, "setup.py")
                _say(f"packaged {pp.LIBRARY}: {pp.CudaArchs(tuple(record['sass']), tuple(record['ptx'])).describe()}")
                return record
        if require:
            raise SystemExit(f"fastv-export build: FASTV_REQUIRE_PLUGIN=1 but the plugin was not built: {reason}")
        _say(f"the TokenSelect plugin library is NOT packaged ({reason}). `fastv-export build` and `pipeline` "
             "will then need --no-plugin (TokenSelect's ONNX function body) or --plugin-lib PATH; "
             "`fastv-export plugin build` compiles the library later from the installed sources where nvcc exists")
        return {"built": False, "reason": reason}


class PluginDistribution(Distribution):
    """Platform-specific (files installed into platlib) when the plugin library will be compiled into it."""

    def has_ext_modules(self) -> bool:
        return _will_compile()


class PlatformWheel(bdist_wheel):
    """A wheel holding the compiled plugin is tagged for this platform; the library is no Python extension, so
    any CPython 3 can use it: py3-none-<platform>."""

    def get_tag(self) -> tuple[str, str, str]:
        python, abi, plat = super().get_tag()
        return (python, abi, plat) if self.root_is_pure else ("py3", "none", plat)


setup(distclass=PluginDistribution, cmdclass={"build_py": BuildPyWithPlugin, "bdist_wheel": PlatformWheel})
