"""Shared fixtures: the built-in tiny models (once per process), exported bundles, the plugin library and the
C++ runtime (once per test run, shared by the pytest-xdist workers under file locks); every file a test
writes goes under pytest's temporary directories, never into the checkout.

Plain helpers shared by several modules live in tests/helpers.py and tests/independent.py (imported
as ``tests.<module>``); test modules never import each other."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from tests import cpp_requests
from tests.helpers import PRESET_NAMES, once_per_run, shared_dir

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_CI_ARCHS = "86;89"   # CI builds only these two (FASTV_CUDA_ARCHS overrides)


@pytest.fixture(params=PRESET_NAMES)
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_and_adapter() -> Callable:
    """``model_and_adapter(name, attn="sdpa")`` -> (model, adapter), built once per (name, attn).
    A test must leave the model as it found it (FastV removed, weights untouched)."""
    from fastv_export.adapters import get_adapter
    from fastv_export.presets import load_model

    cache: dict = {}

    def get(name: str, attn: str = "sdpa"):
        if (name, attn) not in cache:
            cache[(name, attn)] = load_model(name, attn_implementation=attn)
        model = cache[(name, attn)]
        assert getattr(model, "_fastv_handle", None) is None, "a test left FastV applied"
        return model, get_adapter(model)
    return get


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory) -> Callable[..., Path]:
    """``exported_bundle(model, k, ratio, ranking="last", dtype="fp32")`` -> a bundle directory,
    exported once per test run, shared by every worker (treat it as read-only: copy it before changing
    anything)."""
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle

    root = shared_dir(tmp_path_factory) / "bundles"

    def get(model: str = "tiny-llava", k: int = 2, ratio: str = "1/2", ranking: str = "last",
            dtype: str = "fp32") -> Path:
        name = f"{model}-k{k}-r{ratio.replace('/', '_')}-{ranking}-{dtype}"
        return once_per_run(root / name, lambda tmp: export_bundle(
            tmp, FastVConfig(k=k, ratio=ratio, ranking=ranking), ExportOptions(model=model, dtype=dtype)))
    return get


def _build_once(build_dir: Path, make: Callable[[Path], Path]) -> Path:
    """``make(build_dir)`` -> the built file, once per test run per build folder, under a file lock beside
    the folder (shared by pytest-xdist workers and by concurrent sessions that share the folder): the
    built file's path is recorded beside the folder and reused while the file exists."""
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    done = build_dir.parent / f".{build_dir.name}.built"
    with open(build_dir.parent / f".{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file() and Path(done.read_text()).is_file() and done.stat().st_mtime >= _session_start:
            return Path(done.read_text())
        out = make(build_dir)
        done.write_text(str(out))
        return out


#: when this test process started: a build recorded before it belongs to an earlier run (sources may differ)
_session_start = time.time()


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory) -> Callable[..., Path]:
    """``plugin_build(archs=None, build_dir=None)`` -> libfastv_plugins.so built by scripts/build_plugin.sh,
    once per test run per (archs, build_dir).

    ``archs`` defaults to $FASTV_CUDA_ARCHS or the CI pair 86;89. ``build_dir`` defaults to
    $FASTV_PLUGIN_BUILD_DIR (for the default ``archs`` only: set it to reuse an incremental build across
    sessions) or else a folder of the run's shared temporary directory, one per arch list. Serialised with
    a file lock, so workers and concurrent sessions sharing a build folder do not race in it.
    (build_plugin.sh itself caches the TensorRT headers it fetches in the checkout's .third_party/.)"""
    def make(build_dir: Path, archs: str) -> Path:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_plugin.sh"), "--build-dir", str(build_dir),
                               "--archs", archs], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, f"build_plugin.sh failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
        lib = Path(proc.stdout.strip().splitlines()[-1])
        assert lib.is_file(), proc.stdout
        return lib

    def build(archs: str | None = None, build_dir: str | os.PathLike | None = None) -> Path:
        if build_dir is None and archs is None:
            build_dir = os.environ.get("FASTV_PLUGIN_BUILD_DIR") or None
        archs = archs or os.environ.get("FASTV_CUDA_ARCHS") or PLUGIN_CI_ARCHS
        build_dir = build_dir or shared_dir(tmp_path_factory) / f"plugins-{archs.replace(';', '-')}"
        return _build_once(Path(build_dir), lambda d: make(d, archs))

    return build


@pytest.fixture(scope="session")
def kernels_build(tmp_path_factory) -> Callable[..., Path]:
    """``kernels_build(archs=None, build_dir=None)`` -> libfastv_ts_kernels.so: the kernels-only CMake build
    (plugins/CMakeLists.txt, FASTV_KERNELS_ONLY=ON: kernels + host code + C API) with the TensorRT include
    folder pointing nowhere, so it needs no TensorRT headers. Once per test run per (archs, build_dir);
    ``archs`` defaults to $FASTV_CUDA_ARCHS or 86; ``build_dir`` to a folder of the run's shared temporary
    directory. Serialised with a file lock like ``plugin_build``."""
    def make(build_dir: Path, archs: str) -> Path:
        env = dict(os.environ)
        if not env.get("CUDACXX") and not shutil.which("nvcc"):
            for c in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
                if os.access(c, os.X_OK):
                    env["CUDACXX"] = c
                    break
        nowhere = build_dir.parent / "no-tensorrt-headers-here"
        for cmd in (["cmake", "-S", str(ROOT / "plugins"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     "-DFASTV_KERNELS_ONLY=ON", f"-DTENSORRT_INCLUDE_DIR={nowhere}", f"-DFASTV_CUDA_ARCHS={archs}"],
                    ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        lib = build_dir / "libfastv_ts_kernels.so"
        assert lib.is_file(), proc.stdout
        return lib

    def build(archs: str | None = None, build_dir: str | os.PathLike | None = None) -> Path:
        archs = archs or os.environ.get("FASTV_CUDA_ARCHS") or "86"
        build_dir = build_dir or shared_dir(tmp_path_factory) / f"kernels-{archs.replace(';', '-')}"
        return _build_once(Path(build_dir), lambda d: make(d, archs))

    return build


@pytest.fixture(scope="session")
def plugin_library(plugin_build) -> Path:
    """libfastv_plugins.so for the default arch list and build folder (see ``plugin_build``)."""
    return plugin_build()


@pytest.fixture(scope="session")
def runtime_build(tmp_path_factory) -> Path:
    """fastv-run (the C++ runtime, runtime/) built once per test run by scripts/build_runtime.sh (which also
    runs its ctest), in $FASTV_RUNTIME_BUILD_DIR (to reuse an incremental build across sessions) or in the
    run's shared temporary directory; serialised with a file lock like ``plugin_build``."""
    def make(build_dir: Path) -> Path:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_runtime.sh"), "--build-dir", str(build_dir)],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, f"build_runtime.sh failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
        exe = Path(proc.stdout.strip().splitlines()[-1])
        assert exe.is_file(), proc.stdout
        return exe

    return _build_once(Path(os.environ.get("FASTV_RUNTIME_BUILD_DIR") or shared_dir(tmp_path_factory) / "runtime"),
                       make)


@pytest.fixture(scope="session")
def runtime_sanitize_build(tmp_path_factory) -> Path:
    """fastv-run built with AddressSanitizer + UndefinedBehaviorSanitizer (scripts/build_runtime.sh --sanitize:
    no cpu executor, no TensorRT executor; its ctest runs the C++ unit tests under the sanitizers), once per test
    run, in $FASTV_SANITIZE_BUILD_DIR or the run's shared temporary directory."""
    def make(build_dir: Path) -> Path:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_runtime.sh"), "--sanitize", "--build-dir",
                               str(build_dir)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, f"build_runtime.sh --sanitize failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
        exe = Path(proc.stdout.strip().splitlines()[-1])
        assert exe.is_file(), proc.stdout
        return exe

    build_dir = os.environ.get("FASTV_SANITIZE_BUILD_DIR") or shared_dir(tmp_path_factory) / "runtime-asan"
    return _build_once(Path(build_dir), make)


@pytest.fixture(scope="session")
def host_math(tmp_path_factory):
    """The plugin's host-side math (plugins/tests/math_host.cpp + token_select_host.cpp) built with g++
    as a shared library, every entry point's ctypes signature declared (no CUDA, no TensorRT)."""
    import ctypes
    import shutil
    import subprocess

    i64, f32, u32 = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32
    P = ctypes.POINTER
    plugins = Path(__file__).resolve().parents[1] / "plugins"
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler (g++) is needed to build the host-side test library"
    out = tmp_path_factory.mktemp("plugin-math") / "libfastv_math_host.so"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{plugins / 'include'}",
           str(plugins / "tests" / "math_host.cpp"), str(plugins / "src" / "token_select_host.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    so = ctypes.CDLL(str(out))
    so.fastv_host_keep_count.restype = i64
    so.fastv_host_keep_count.argtypes = [i64, i64, i64, i64]
    so.fastv_host_kept_length.restype = i64
    so.fastv_host_kept_length.argtypes = [i64, i64, i64, i64, i64]
    so.fastv_host_random_hash.restype = i64
    so.fastv_host_random_hash.argtypes = [i64, i64]
    so.fastv_host_random_scores.restype = None
    so.fastv_host_random_scores.argtypes = [P(i64), i64, i64, P(f32)]
    so.fastv_host_order_key.restype = u32
    so.fastv_host_order_key.argtypes = [f32]
    so.fastv_host_ranks_before.restype = ctypes.c_int32
    so.fastv_host_ranks_before.argtypes = [f32, i64, f32, i64]
    so.fastv_host_lse.restype = f32
    so.fastv_host_lse.argtypes = [P(f32), i64, i64]
    so.fastv_host_scores.restype = None
    so.fastv_host_scores.argtypes = [ctypes.c_int32, P(f32), P(f32), P(i64), P(i64), P(i64), f32, i64, P(f32)]
    so.fastv_host_select.restype = i64
    so.fastv_host_select.argtypes = [P(f32), P(i64), i64, i64, i64, i64, P(i64)]
    so.fastv_host_validate.restype = ctypes.c_int32
    so.fastv_host_validate.argtypes = [ctypes.c_int32, i64, i64, i64, f32, i64, P(ctypes.c_int32), P(i64),
                                       ctypes.c_char_p, ctypes.c_int32]
    so.fastv_host_ranking_from_name.restype = ctypes.c_int32
    so.fastv_host_ranking_from_name.argtypes = [ctypes.c_char_p]
    so.fastv_host_workspace_size.restype = ctypes.c_uint64
    so.fastv_host_workspace_size.argtypes = [ctypes.c_int32, P(i64)]
    return so


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker computes on one thread: the workers already fill the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# ------------------------------------------------------------------- fastv-run request tests (test_cpp_request*.py)
@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """The trained demo as a user's checkpoint (scripts/demo_checkpoint.py) exported to a bundle, and its
    held-out images with questions.txt (image, question, answer)."""
    root = shared_dir(tmp_path_factory) / "cpp-request-demo"

    def make(tmp: Path) -> None:
        subprocess.run([sys.executable, str(cpp_requests.ROOT / "scripts" / "demo_checkpoint.py"), str(tmp / "checkpoint"),
                        "--images", str(tmp / "images"), "--count", str(cpp_requests.HELD_OUT)], check=True, capture_output=True)
        from fastv_export.config import FastVConfig
        from fastv_export.export import ExportOptions, export_bundle

        export_bundle(tmp / "bundle", FastVConfig(k=2, ratio="1/2"), ExportOptions(model=str(tmp / "checkpoint")))

    once_per_run(root, make)
    return root / "bundle", root / "images"


@pytest.fixture(scope="session")
def user_bundle(tmp_path_factory):
    """``user_bundle(family)`` -> a bundle exported from tests/user_checkpoints.py's checkpoint (llava,
    qwen2_5_vl), once per run."""
    from tests import user_checkpoints as uc

    root = shared_dir(tmp_path_factory) / "cpp-request-user"

    def get(family: str) -> Path:
        def make(tmp: Path) -> None:
            from fastv_export.config import FastVConfig
            from fastv_export.export import ExportOptions, export_bundle

            tmp.mkdir(parents=True)
            checkpoint = uc.user_checkpoint(tmp / "checkpoints", family)
            export_bundle(tmp / "bundle", FastVConfig(k=2, ratio="1/2"), ExportOptions(model=str(checkpoint)))

        return once_per_run(root / family, make) / "bundle"
    return get


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """PNG and JPEG test pictures: square ones (every preset's exported grid) and user-style sizes."""
    from tests import user_checkpoints as uc

    out = shared_dir(tmp_path_factory) / "cpp-request-pictures"

    def make(tmp: Path) -> None:
        from PIL import Image

        tmp.mkdir(parents=True)
        rng = np.random.RandomState(0)
        for name, (w, h) in {"square.png": (64, 64), "square2.png": (80, 80), "wide.png": (96, 40)}.items():
            Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(tmp / name)
        (tmp / "user").mkdir()
        uc.test_images(tmp / "user")

    once_per_run(out, make)
    found = {p.name: p for p in out.iterdir() if p.is_file()}
    found.update({f"user/{p.name}": p for p in (out / "user").iterdir()})
    return found
