"""The plugin's workspace guard. TensorRT hands enqueue the workspace it reserved for the layer (what
getWorkspaceSize answered at build time for the profile's maximum shapes) without saying its size, so the
plugin serializes that size (field "workspace_bytes") and compares, at run time, what the shapes need with it.

The plugin class is compiled with g++ against the TensorRT and CUDA headers into a host-only library
(plugins/tests/plugin_host.cpp: the CUDA launcher replaced by a stand-in that records the workspace size it
is handed); the needed sizes come from the host math library (tests/conftest.py host_math). Through
TensorRT-RTX, an engine built ahead of time carries the field with the size for the profile's maxima."""
from __future__ import annotations

import ctypes
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import c_pointer as ptr

ROOT = Path(__file__).resolve().parents[1]
RANKS = np.array([3, 4, 4, 2, 2, 2], np.int32)
MEAN = 1
i64, u64, i32 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32


def _dims(b=2, n=30, d=8, h=4, nq=30, hd=16, hkv=2, s=30, m=12) -> np.ndarray:
    out = np.full((6, 8), -1, np.int64)
    for i, shape in enumerate([[b, n, d], [b, h, nq, hd], [b, hkv, s, hd], [b, s], [b, n], [b, m]]):
        out[i, :len(shape)] = shape
    return out


def _needed(host_math, b=2, n=30, d=8, h=4, nq=30, hd=16, hkv=2, s=30, m=12) -> int:
    """Bytes these shapes need, from the host math library (the layout the kernels use)."""
    return int(host_math.fastv_host_workspace_size(MEAN, ptr(np.array([b, n, h, nq, hkv, s, m], np.int64), i64)))


@pytest.fixture(scope="module")
def plugin_host(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda = next((p for p in (Path("/usr/local/cuda/include"),) if (p / "cuda_runtime_api.h").is_file()), None)
    nvcc = shutil.which("nvcc")
    if cuda is None and nvcc:
        cuda = Path(nvcc).resolve().parents[1] / "include"
    if cxx is None or cuda is None or not (cuda / "cuda_runtime_api.h").is_file():
        pytest.skip("needs g++ and the CUDA headers (cuda_runtime_api.h)")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_trt_headers.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    trt_include = proc.stdout.strip().splitlines()[-1]
    out = tmp_path_factory.mktemp("plugin-host") / "libfastv_plugin_host.so"
    src = ROOT / "plugins"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations", "-shared",
           "-fPIC", f"-I{src / 'include'}", f"-I{src / 'src'}", "-isystem", trt_include, "-isystem", str(cuda),
           str(src / "tests" / "plugin_host.cpp"), str(src / "src" / "token_select_plugin.cpp"),
           str(src / "src" / "token_select_host.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    so = ctypes.CDLL(str(out))
    so.fastv_plugin_host_build.restype = u64
    so.fastv_plugin_host_build.argtypes = [ctypes.POINTER(i32), ctypes.POINTER(i64), ctypes.POINTER(i64)]
    so.fastv_plugin_host_run.restype = i32
    so.fastv_plugin_host_run.argtypes = [i64, ctypes.POINTER(i32), ctypes.POINTER(i64), ctypes.POINTER(u64),
                                         ctypes.POINTER(i32)]
    return so


def _run(lib, workspace_field: int, dims: np.ndarray) -> tuple[int, int, int]:
    passed, calls = u64(0), i32(0)
    rc = lib.fastv_plugin_host_run(workspace_field, ptr(RANKS, i32), ptr(dims, i64), ctypes.byref(passed),
                                   ctypes.byref(calls))
    return rc, passed.value, calls.value


def test_build_time_workspace_is_serialized(plugin_host, host_math):
    maxima = dict(b=4, n=256, s=320, nq=256, m=200)
    serialized = i64(0)
    answered = plugin_host.fastv_plugin_host_build(ptr(RANKS, i32), ptr(_dims(**maxima), i64), ctypes.byref(serialized))
    assert answered == _needed(host_math, **maxima) > 0
    assert serialized.value == answered, "the workspace size TensorRT reserves is not serialized with the plugin"


def test_enqueue_hands_over_the_workspace_the_engine_reserved(plugin_host, host_math):
    reserved = _needed(host_math, b=4, n=256, s=320, nq=256, m=200)
    run = dict(b=2, n=30, s=30, nq=30, m=12)
    rc, passed, calls = _run(plugin_host, reserved, _dims(**run))
    assert (rc, calls) == (0, 1)
    assert passed == reserved != _needed(host_math, **run), "enqueue passed the needed size as the available one"


def test_enqueue_refuses_shapes_that_need_more_than_was_reserved(plugin_host, host_math, capfd):
    run = dict(b=2, n=30, s=30, nq=30, m=12)
    need = _needed(host_math, **run)
    capfd.readouterr()
    rc, _, calls = _run(plugin_host, need - 1, _dims(**run))
    assert rc == -1 and calls == 0, "the guard did not fire: the launcher ran with too small a workspace"
    err = capfd.readouterr().err
    assert f"enqueue needs {need} bytes of workspace for these shapes, but the engine reserved {need - 1}" in err, err
    assert _run(plugin_host, need, _dims(**run))[:2] == (0, need)          # exactly enough is enough


def test_an_engine_without_the_field_runs_as_before(plugin_host, host_math):
    run = dict(b=1, n=64, s=64, nq=64, m=32)
    assert _run(plugin_host, -1, _dims(**run)) == (0, _needed(host_math, **run), 1)


@pytest.mark.slow
@pytest.mark.tensorrt
def test_an_ahead_of_time_engine_carries_the_workspace_of_the_profile_maxima(plugin_library, host_math):
    """TensorRT-RTX calls getWorkspaceSize before it serializes the plugin: the engine holds "workspace_bytes"
    (name, type kINT64 = 10, length 1, value) equal to what the profile's maximum shapes need."""
    from fastv_export.engines import trt_rtx
    from fastv_export.graphs import token_select as ts

    model = ts.make_token_select_model(ranking="mean", ratio_num=1, ratio_den=2, scale=0.25)
    lo, hi = dict(b=1, n=1, s=1, m=0), dict(b=4, n=256, s=320, m=200)

    def shapes(x):
        return dict(hidden_states=(x["b"], x["n"], 8), query=(x["b"], 4, 1, 16), key=(x["b"], 2, x["s"], 16),
                    attention_mask=(x["b"], x["s"]), position_ids=(x["b"], x["n"]),
                    candidate_positions=(x["b"], x["m"]))

    a, c = shapes(lo), shapes(hi)
    profile = {name: (a[name], c[name], c[name]) for name in a}
    with trt_rtx.plugin_library(plugin_library):
        engine = trt_rtx.build_engine_aot(model, compute_capabilities=["SM86"], profiles=[profile]).engine
    values = [struct.unpack_from("<iiq", engine, m.end()) for m in re.finditer(rb"workspace_bytes\x00", engine)]
    assert values, "the engine carries no workspace_bytes field"
    want = _needed(host_math, b=4, n=256, s=320, nq=1, m=200)
    assert all(v == (10, 1, want) for v in values), (values, want)
