"""libfastv_plugins.so builds on a CPU machine (nvcc compiles, TensorRT 10.14 headers from PyPI, no
TensorRT library linked) and exports the plugin-library entry points.

The build (scripts/build_plugin.sh) is done once per test session by the ``plugin_library`` fixture
(tests/conftest.py) and shared with the other plugin test modules. CI builds only sm_86 and sm_89 to
save time (FASTV_CUDA_ARCHS overrides that; users' builds default to the broad list, checked below by
configuring only)."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_plugin.sh"
C_API = {"fastv_ts_last_error", "fastv_ts_kept_length", "fastv_ts_workspace_size", "fastv_ts_scores_offset",
         "fastv_ts_run"}
EXPORTED = {"getCreators", "setLoggerFinder"} | C_API


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} (binutils) is needed to inspect the library"
    return path


@pytest.mark.slow
def test_build_script_builds_the_library(plugin_library):
    assert plugin_library.name == "libfastv_plugins.so" and plugin_library.stat().st_size > 100_000


@pytest.mark.slow
def test_headers_are_tensorrt_10_14_unless_the_user_points_elsewhere(plugin_library):
    cache = (plugin_library.parent / "CMakeCache.txt").read_text()
    inc = Path(re.search(r"^TENSORRT_INCLUDE_DIR:\w+=(.*)$", cache, re.M).group(1))
    assert (inc / "NvInferRuntime.h").is_file()
    if not (os.environ.get("TENSORRT_INCLUDE_DIR") or os.environ.get("TensorRT_ROOT")):
        assert inc == ROOT / ".third_party" / "tensorrt-10.14" / "include"
        version = (inc / "NvInferVersion.h").read_text()
        assert re.search(r"#define TRT_MAJOR_ENTERPRISE 10\b", version)
        assert re.search(r"#define TRT_MINOR_ENTERPRISE 14\b", version)
    # the headers are fetched at build time, never part of the project
    assert not list((ROOT / "plugins").rglob("NvInfer*.h"))


@pytest.mark.slow
def test_links_no_tensorrt_and_no_shared_cudart(plugin_library):
    out = subprocess.run([_tool("readelf"), "-d", str(plugin_library)], capture_output=True, text=True,
                         check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    assert needed, out
    for lib in needed:
        assert not re.match(r"lib(nvinfer|tensorrt|nvonnxparser|cudart|cuda\.)", lib), f"links {lib}: {needed}"


@pytest.mark.slow
def test_exports_the_entry_points_and_nothing_else(plugin_library):
    out = subprocess.run([_tool("nm"), "-D", "--defined-only", str(plugin_library)], capture_output=True, text=True,
                         check=True).stdout
    symbols = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert symbols == EXPORTED


@pytest.mark.slow
def test_entry_points_via_ctypes_without_a_gpu(plugin_library):
    """Loading needs no GPU and no TensorRT; the host-side checks of the kernel entry point work."""
    so = ctypes.CDLL(str(plugin_library))
    i64 = ctypes.c_int64
    so.fastv_ts_kept_length.restype = i64
    so.fastv_ts_kept_length.argtypes = [i64, i64, ctypes.c_int32, i64, i64, i64]
    for n, m, num, den, keep, want in [(100, 60, 1, 2, -1, 70), (612, 576, 2, 3, -1, 228), (10, 0, 8, 9, -1, 10),
                                      (50, 9, 3, 7, -1, 47), (50, 9, 1, 2, 4, 45), (50, 9, 1, 2, 99, 50)]:
        assert so.fastv_ts_kept_length(n, m, 1, num, den, keep) == want
    so.fastv_ts_last_error.restype = ctypes.c_char_p
    so.fastv_ts_run.restype = ctypes.c_int32
    so.fastv_ts_run.argtypes = [ctypes.c_int32, i64, i64, i64, ctypes.c_float, i64, ctypes.c_int32,
                                ctypes.POINTER(i64)] + [ctypes.c_void_p] * 10 + [ctypes.c_uint64, ctypes.c_void_p]
    dims = np.array([1, 10, 4, 4, 10, 8, 2, 10, 5, 1], np.int64)       # B N D H Nq d Hkv S M L
    dims_p = dims.ctypes.data_as(ctypes.POINTER(i64))
    null = [None] * 10
    assert so.fastv_ts_run(1, 2, 2, -1, 0.1, 0, 0, dims_p, *null, 0, None) == 1    # ratio 2/2
    assert b"ratio_num" in so.fastv_ts_last_error()
    bad = dims.copy()
    bad[6] = 3                                                                    # H = 4, Hkv = 3
    assert so.fastv_ts_run(1, 1, 2, -1, 0.1, 0, 0, bad.ctypes.data_as(ctypes.POINTER(i64)), *null, 0, None) == 1
    assert b"multiple of key heads" in so.fastv_ts_last_error()
    assert so.fastv_ts_run(9, 1, 2, -1, 0.1, 0, 0, dims_p, *null, 0, None) == 1
    assert b"ranking" in so.fastv_ts_last_error()
    assert so.fastv_ts_run(1, 1, 2, -1, 0.1, 0, 5, dims_p, *null, 0, None) == 1       # dtype 5
    assert b"dtype" in so.fastv_ts_last_error()
    so.fastv_ts_workspace_size.restype = ctypes.c_uint64
    so.fastv_ts_workspace_size.argtypes = [ctypes.c_int32, i64, i64, i64, ctypes.POINTER(i64)]
    assert so.fastv_ts_kept_length(10, 4, 1, 1, 0, -1) == -1 and b"ratio" in so.fastv_ts_last_error()   # den 0
    assert so.fastv_ts_workspace_size(1, 1, 0, -1, dims_p) == 0 and b"ratio" in so.fastv_ts_last_error()
    no_heads = dims.copy()
    no_heads[3] = 0                                                               # H = 0
    assert so.fastv_ts_run(1, 1, 2, -1, 0.1, 0, 0, no_heads.ctypes.data_as(ctypes.POINTER(i64)), *null, 0,
                           None) == 1
    assert b"at least one head" in so.fastv_ts_last_error()
    zero_batch = dims.copy()
    zero_batch[0] = 0                                                             # empty: nothing to launch
    assert so.fastv_ts_run(1, 1, 2, -1, 0.1, 0, 0, zero_batch.ctypes.data_as(ctypes.POINTER(i64)), *null, 0,
                           None) == 0


@pytest.mark.slow
def test_default_architectures_cover_data_center_rtx_and_jetson(tmp_path, plugin_library):
    """Configure only (no compile): the default list is every wanted target this nvcc supports."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    codes = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    supported = {int(x) for x in re.findall(r"sm_(\d+)\b", codes)}
    inc = plugin_library.parent / "CMakeCache.txt"
    inc_dir = re.search(r"^TENSORRT_INCLUDE_DIR:\w+=(.*)$", inc.read_text(), re.M).group(1)
    env = {k: v for k, v in os.environ.items() if k != "FASTV_CUDA_ARCHS"}
    env.setdefault("CUDACXX", nvcc)
    proc = subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(tmp_path), f"-DTENSORRT_INCLUDE_DIR={inc_dir}",
                           "-DFASTV_CUDA_ARCHS="], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    archs = re.search(r"fastv_plugins: CUDA architectures (\S+)", proc.stdout).group(1).split(";")
    numbers = [int(a.split("-")[0]) for a in archs]
    wanted = {75, 80, 86, 87, 89, 90, 100, 101, 103, 110, 120, 121}
    assert set(numbers) == wanted & supported
    for must in (80, 86, 87, 89, 90):                       # A100, RTX 30, Orin, RTX 40, H100
        assert must in numbers or must not in supported
    assert sum(not a.endswith("-real") for a in archs) == 1 and not archs[-1].endswith("-real")   # PTX of the newest


def test_missing_headers_fail_with_a_clear_message(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--build-dir", str(tmp_path / "b"), "--tensorrt-include",
                           str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "NvInferRuntime.h" in proc.stderr and "TENSORRT_INCLUDE_DIR" in proc.stderr


@pytest.mark.slow
def test_autoload_shim_links_nothing_and_explains_itself(plugin_library):
    """libfastv_plugins_autoload.so (for polygraphy --plugins, which only dlopens) exports nothing, links no
    TensorRT, and when no TensorRT 10 is in reach says what to do instead of crashing."""
    shim = plugin_library.with_name("libfastv_plugins_autoload.so")
    assert shim.is_file()
    out = subprocess.run([_tool("readelf"), "-d", str(shim)], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\[lib(nvinfer|tensorrt|cudart)", out)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(shim)!r}); print('loaded')"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "loaded" in proc.stdout
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout if os.path.exists(ldconfig) else ""
    if "libnvinfer.so.10" not in listing:
        assert "found no TensorRT library (libnvinfer.so.10)" in proc.stderr


@pytest.mark.slow
def test_kernels_only_target_builds_without_tensorrt_headers(kernels_build):
    """FASTV_KERNELS_ONLY=ON with TENSORRT_INCLUDE_DIR pointing nowhere (the ``kernels_build`` fixture):
    libfastv_ts_kernels.so (kernels + host code + C API) builds, no compiled file depends on a TensorRT
    header, it exports exactly the C API, links no TensorRT and no shared cudart, and its host-side checks
    answer through ctypes without a GPU. This is what scripts/gpu_check.sh builds on a lent GPU machine."""
    lib = kernels_build("86")
    build = lib.parent
    cache = (build / "CMakeCache.txt").read_text()
    assert re.search(r"^FASTV_KERNELS_ONLY:BOOL=ON$", cache, re.M)
    inc = re.search(r"^TENSORRT_INCLUDE_DIR:\w+=(.*)$", cache, re.M).group(1)
    assert not Path(inc, "NvInferRuntime.h").exists()
    assert not (build / "libfastv_plugins.so").exists()
    deps = [p for p in build.rglob("*") if p.is_file() and p.suffix in (".d", ".make", ".txt", ".json")]
    assert deps and not [p for p in deps if "NvInfer" in p.read_text(errors="replace")]
    out = subprocess.run([_tool("nm"), "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    assert {line.split()[-1] for line in out.splitlines() if line.strip()} == C_API
    out = subprocess.run([_tool("readelf"), "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    for needed in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out):
        assert not re.match(r"lib(nvinfer|tensorrt|nvonnxparser|cudart|cuda\.)", needed), needed
    proc = subprocess.run([sys.executable, "-c", (
        "import ctypes\n"
        f"so = ctypes.CDLL({str(lib)!r})\n"
        "i64 = ctypes.c_int64\n"
        "so.fastv_ts_kept_length.restype = i64\n"
        "so.fastv_ts_kept_length.argtypes = [i64, i64, ctypes.c_int32, i64, i64, i64]\n"
        "so.fastv_ts_last_error.restype = ctypes.c_char_p\n"
        "assert so.fastv_ts_kept_length(612, 576, 1, 2, 3, -1) == 228\n"
        "assert so.fastv_ts_kept_length(10, 4, 1, 1, 0, -1) == -1 and b'ratio' in so.fastv_ts_last_error()\n"
        "print('ok')\n")], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_kernels_only_option_is_declared_and_keeps_tensorrt_out():
    """Fast, no build: the kernels-only target lists exactly the kernels, the host code and the C API."""
    text = (ROOT / "plugins" / "CMakeLists.txt").read_text()
    assert 'option(FASTV_KERNELS_ONLY' in text
    target = re.search(r"add_library\(fastv_ts_kernels SHARED ([^)]*)\)", text).group(1).split()
    kernels = re.search(r"set\(FASTV_KERNEL_SOURCES ([^)]*)\)", text).group(1).split()
    assert sorted(target) == ["${FASTV_KERNEL_SOURCES}", "src/c_api.cpp", "src/token_select_host.cpp"]
    assert sorted(kernels) == ["src/token_select_kernels.cu", "src/token_select_last.cu", "src/token_select_mean.cu",
                               "src/token_select_mean_warp.cu"]
    for src in kernels + target[1:] + ["src/token_select_device.cuh"]:
        assert "NvInfer" not in (ROOT / "plugins" / src).read_text()
    for header in (ROOT / "plugins" / "include" / "fastv").glob("*.h"):
        assert "NvInfer" not in header.read_text(), header
