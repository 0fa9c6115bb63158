"""Shared fixtures: the built-in tiny models, exported bundles and the plugin library, built once per
session; every file a test writes goes under pytest's temporary directories, never into the checkout.

Plain helpers shared by several modules live in tests/helpers.py and tests/independent.py (imported
as ``tests.<module>``); test modules never import each other."""
from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PRESET_NAMES = ["tiny-llava", "tiny-qwen2-vl"]
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
    exported once per session (treat it as read-only: copy it before changing anything)."""
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("bundles")
    cache: dict = {}

    def get(model: str = "tiny-llava", k: int = 2, ratio: str = "1/2", ranking: str = "last",
            dtype: str = "fp32") -> Path:
        key = (model, k, ratio, ranking, dtype)
        if key not in cache:
            out = root / f"{model}-k{k}-r{ratio.replace('/', '_')}-{ranking}-{dtype}"
            export_bundle(out, FastVConfig(k=k, ratio=ratio, ranking=ranking), ExportOptions(model=model, dtype=dtype))
            cache[key] = out
        return cache[key]
    return get


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory) -> Callable[..., Path]:
    """``plugin_build(archs=None, build_dir=None)`` -> libfastv_plugins.so built by scripts/build_plugin.sh,
    once per session per (archs, build_dir); ``plugin_build.seconds[build_dir]`` is how long the build took.

    ``archs`` defaults to $FASTV_CUDA_ARCHS or the CI pair 86;89. ``build_dir`` defaults to
    $FASTV_PLUGIN_BUILD_DIR (for the default ``archs`` only: set it to reuse an incremental build across
    sessions) or else a folder under pytest's temporary directory, one per arch list. Serialised with a
    file lock, so concurrent sessions sharing a build folder do not race in it. (build_plugin.sh itself
    caches the TensorRT headers it fetches in the checkout's .third_party/, ignored by git.)"""
    cache: dict = {}
    seconds: dict[str, float] = {}

    def build(archs: str | None = None, build_dir: str | os.PathLike | None = None) -> Path:
        if build_dir is None and archs is None:
            build_dir = os.environ.get("FASTV_PLUGIN_BUILD_DIR") or None
        archs = archs or os.environ.get("FASTV_CUDA_ARCHS") or PLUGIN_CI_ARCHS
        if build_dir is None:
            build_dir = tmp_path_factory.getbasetemp() / f"plugins-{archs.replace(';', '-')}"
        build_dir = Path(build_dir)
        key = (archs, str(build_dir))
        if key not in cache:
            build_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(build_dir.parent / f".{build_dir.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                start = time.perf_counter()
                proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_plugin.sh"), "--build-dir",
                                       str(build_dir), "--archs", archs], capture_output=True, text=True, cwd=ROOT)
                seconds[str(build_dir)] = time.perf_counter() - start
            assert proc.returncode == 0, f"build_plugin.sh failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
            lib = Path(proc.stdout.strip().splitlines()[-1])
            assert lib.is_file(), proc.stdout
            cache[key] = lib
        return cache[key]

    build.seconds = seconds
    return build


@pytest.fixture(scope="session")
def plugin_library(plugin_build) -> Path:
    """libfastv_plugins.so for the default arch list and build folder (see ``plugin_build``)."""
    return plugin_build()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
