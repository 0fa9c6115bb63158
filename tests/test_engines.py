"""fastv_export.engines: profiles from the limits (post-K over the pruned length), trtexec lines,
TensorRT-RTX ahead-of-time builds of whole bundles, the manifest's engines section and its checks."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastv_export.bundle import Manifest
from fastv_export.engines.profiles import BuildLimits, engine_profiles, trtexec_shape_flags
from fastv_export.errors import FastVError
from tests.helpers import PRESET_NAMES, once_per_run, shared_dir

# a manifest as much as the profiles read of it: tiny-llava-like, K=2 of 4 layers, R=1/2
RAW = {
    "fastv": {"k": 2, "ratio": "1/2", "ratio_num": 1, "ratio_den": 2, "keep": None, "ranking": "last", "seed": 0},
    "source_model": {"num_layers": 4, "hidden_size": 64, "vocab_size": 512},
    "kv_cache": {"num_kv_heads": 2, "head_dim": 16},
    "image_tokens": {"per_image": 64, "prompt_tokens_per_image": [[500, 64]], "vision_input": {"shape": [1, 3, 56, 56]}},
    "positions": {"rank": 2},
    "precision": "fp32",
}
MANIFEST = Manifest(RAW)


def _pruned(n: int, m: int, num: int, den: int) -> int:
    """n' computed here, independently: drop floor(M * num / den) of the M image tokens."""
    dropped = (m * num) // den
    return n - dropped


@pytest.mark.parametrize("n,images,num,den", [(256, 1, 1, 2), (300, 2, 3, 4), (129, 2, 9, 10), (100, 1, 2, 3)])
def test_post_k_prefill_profile_is_built_for_the_pruned_length(n, images, num, den):
    manifest = json.loads(json.dumps(RAW))
    manifest["fastv"].update(ratio=f"{num}/{den}", ratio_num=num, ratio_den=den)
    limits = BuildLimits(max_batch=2, max_prompt=n, images=images, max_new_tokens=16)
    profiles = engine_profiles(Manifest(manifest), limits)
    kept = _pruned(n, 64 * images, num, den)
    post = profiles["post_k"]["prefill"]
    assert post["hidden_states"][1] == [2, kept, 64] and post["hidden_states"][2] == [2, kept, 64]
    assert post["attention_mask"][2] == [2, kept]
    assert post["past_key_values.2.key"][2] == [2, 2, 0, 16]
    dec = profiles["post_k"]["decode"]
    assert dec["past_key_values.3.value"][2] == [2, 2, kept + 16 - 1, 16]
    assert dec["attention_mask"][2] == [2, kept + 16]
    pre = profiles["pre_k"]
    assert pre["prefill"]["inputs_embeds"][2] == [2, n, 64] and pre["prefill"]["candidate_positions"][2] == [2, 64 * images]
    assert pre["decode"]["past_key_values.0.key"][2] == [2, 2, n + 16 - 1, 16]
    assert pre["decode"]["candidate_positions"] == ([1, 0], [2, 0], [2, 0])
    assert profiles["vision"] == {}


def test_mrope_positions_and_keep_count_profiles():
    manifest = json.loads(json.dumps(RAW))
    manifest["positions"]["rank"] = 3
    manifest["fastv"].update(keep=10, ratio="0/1", ratio_num=0, ratio_den=1)
    profiles = engine_profiles(Manifest(manifest), BuildLimits(max_prompt=90))
    assert profiles["post_k"]["prefill"]["position_ids"][2] == [3, 1, 90 - 64 + 10]


@pytest.mark.parametrize("limits,message", [
    (dict(max_batch=0), "--max-batch must be an integer >= 1"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(max_prompt=64), "leaves no room for text"),
])
def test_bad_limits_are_named(limits, message):
    with pytest.raises(FastVError, match=message):
        engine_profiles(MANIFEST, BuildLimits(**limits))


def _parse_trtexec(line: str) -> list[dict[str, tuple[list[int], list[int], list[int]]]]:
    """The optimization profiles a trtexec line asks for: each repeated min/opt/max set is one."""
    sets = re.findall(r"--(min|opt|max)Shapes=(\S+)", line)
    profiles = []
    for i in range(0, len(sets), 3):
        (kmin, smin), (kopt, sopt), (kmax, smax) = sets[i:i + 3]
        assert (kmin, kopt, kmax) == ("min", "opt", "max")
        def parse(s):
            return {name: [int(d) for d in dims.split("x")] for name, dims in (p.rsplit(":", 1) for p in s.split(","))}
        lo, opt, hi = parse(smin), parse(sopt), parse(smax)
        profiles.append({name: (lo[name], opt[name], hi[name]) for name in lo})
    return profiles


def test_trtexec_lines_hold_every_profile():
    from fastv_export.engines.build import trtexec_lines

    limits = BuildLimits(max_batch=3, max_prompt=200, images=1, max_new_tokens=32)
    lines = trtexec_lines(MANIFEST, limits)
    profiles = engine_profiles(MANIFEST, limits)
    by_graph = {re.search(r"--onnx=(\w+)\.onnx", line).group(1): line for line in lines}
    assert set(by_graph) == {"vision", "embed", "pre_k", "post_k"}
    for graph, line in by_graph.items():
        got = _parse_trtexec(line)
        want = [{k: tuple(v) for k, v in p.items()} for p in profiles[graph].values()]
        assert got == want, graph
        assert "--stronglyTyped" in line and f"--saveEngine={graph}.engine" in line
    assert "--dynamicPlugins=libfastv_plugins.so" in by_graph["pre_k"]
    assert "--dynamicPlugins" not in by_graph["post_k"]
    assert "--dynamicPlugins" not in " ".join(trtexec_lines(MANIFEST, limits, use_plugin=False))
    assert trtexec_shape_flags({}) == []


def test_compute_capabilities_are_checked():
    from fastv_export.engines.build import target_names

    assert target_names(["8.6", "89", "sm120", "SM75"]) == ["SM86", "SM89", "SM120", "SM75"]
    with pytest.raises(FastVError, match="8.7"):
        target_names(["8.7"])


def test_full_tensorrt_missing_is_one_clear_error(monkeypatch):
    import importlib.util

    from fastv_export.engines import build

    real = importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    with pytest.raises(FastVError, match="TensorRT 10 .* is not installed"):
        build.resolve_backend("tensorrt")
    assert build.resolve_backend(None) == "tensorrt-rtx"


# ---- whole bundles, TensorRT-RTX ahead of time ---------------------------------------------------
def _snapshot(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def built(exported_bundle, plugin_library, tmp_path_factory):
    """tiny-llava and tiny-qwen2-vl bundles (K=2, R=1/2) with engines, with the plugin and without (once per
    test run, read-only)."""
    from fastv_export.engines.build import BuildOptions, build_engines

    def make(dst: Path, preset: str, use_plugin: bool) -> None:
        shutil.copytree(exported_bundle(preset, 2, "1/2"), dst)
        build_engines(dst, BuildOptions(backend="tensorrt-rtx", compute_capabilities=("8.6", "8.9"),
                                        plugin_library=str(plugin_library), use_plugin=use_plugin,
                                        limits=BuildLimits(max_batch=2, max_prompt=160, max_new_tokens=24)))

    root = shared_dir(tmp_path_factory) / "engines"
    return {(preset, use_plugin): once_per_run(root / f"{preset}-{'plugin' if use_plugin else 'body'}",
                                               lambda dst, p=preset, u=use_plugin: make(dst, p, u))
            for preset in PRESET_NAMES for use_plugin in (True, False)}


@pytest.mark.slow
@pytest.mark.tensorrt
@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("use_plugin", [True, False], ids=["plugin", "function-body"])
def test_build_records_engines_for_the_pruned_length(built, preset, use_plugin):
    from fastv_export.bundle import load_bundle

    bundle = load_bundle(built[(preset, use_plugin)])
    section = json.loads((bundle.path / "manifest.json").read_text())["engines"]
    assert section["backend"] == "tensorrt-rtx" and section["targets"] == ["SM86", "SM89"]
    assert section["token_select"] == ("plugin" if use_plugin else "onnx_function_body")
    assert set(section["engines"]) == {"vision", "embed", "pre_k", "post_k"}
    assert section["engines"]["pre_k"]["plugin_layers"] == (1 if use_plugin else 0)
    assert (section["plugin"] is not None) == use_plugin
    assert section["plugin"] is None or "source" not in section["plugin"]     # no path of the building machine
    m = bundle.tokens_per_image
    kept = _pruned(160, m, 1, 2)
    post = {p["name"]: p["shapes"] for p in section["engines"]["post_k"]["profiles"]}
    assert post["prefill"]["hidden_states"]["opt"][1] == post["prefill"]["hidden_states"]["max"][1] == kept
    assert post["decode"]["attention_mask"]["max"] == [2, kept + 24]
    assert section["lengths"] == {"prompt": 160, "image_tokens": m, "kept": kept, "new_tokens": 24}
    for e in section["engines"].values():
        assert (bundle.path / e["file"]).stat().st_size == e["bytes"] > 0
    assert (bundle.path / "build_engines.sh").is_file() and (bundle.path / section["timing_cache"]).is_file()
    assert section["timing_cache"] == "timing.tensorrt-rtx-" + section["backend_version"] + "-SM86-SM89.cache"


@pytest.mark.slow
@pytest.mark.tensorrt
def test_tampering_is_refused_with_one_line(built, tmp_path):
    from fastv_export.bundle import load_bundle
    from fastv_export.engines.build import check_engines

    src = built[("tiny-llava", True)]
    check_engines(load_bundle(src))                     # the untouched bundle passes (no GPU here to check)
    cases = {}
    b = shutil.copytree(src, tmp_path / "engine")
    with open(b / "post_k.engine", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    cases["engine file"] = (b, "sha256 does not match")
    for name, field, value, message in [("plugin", ("plugin", "sha256"), "0" * 64, "engines.plugin.sha256"),
                                        ("version", ("backend_version",), "9.9.9", "built with tensorrt-rtx 9.9.9")]:
        b = shutil.copytree(src, tmp_path / name)
        man = json.loads((b / "manifest.json").read_text())
        target = man["engines"]
        for key in field[:-1]:
            target = target[key]
        target[field[-1]] = value
        (b / "manifest.json").write_text(json.dumps(man))
        cases[name] = (b, message)
    for name, (path, message) in cases.items():
        with pytest.raises(FastVError, match=re.escape(message)) as exc:
            check_engines(load_bundle(path))
        assert "\n" not in str(exc.value), name


@pytest.mark.slow
@pytest.mark.tensorrt
def test_failed_builds_leave_the_bundle_unchanged(exported_bundle, tmp_path, capsys):
    from fastv_export.cli import main

    b = shutil.copytree(exported_bundle("tiny-llava", 2, "1/2"), tmp_path / "b")
    before = _snapshot(b)
    for argv, message in [
        (["--plugin-lib", str(tmp_path / "missing.so")], "does not exist"),
        (["--compute-capability", "8.7", "--no-plugin"], "compute capability '8.7'"),
        (["--backend", "tensorrt", "--no-plugin"], "TensorRT 10 (Python package `tensorrt`) is not installed"),
        (["--max-prompt", "10", "--no-plugin"], "leaves no room for text"),
    ]:
        capsys.readouterr()
        assert main(["build", str(b), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert _snapshot(b) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "a temporary directory was left behind"


@pytest.mark.slow
@pytest.mark.tensorrt
def test_bundles_with_external_data_validate_and_build(tmp_path, capsys):
    """Every graph's weights in <graph>.onnx.data (as real models over 2 GB have them): the bundle lists the
    data files, validates, and its engines build, twice (the second build on the first one's output)."""
    from fastv_export.bundle import load_bundle
    from fastv_export.cli import main

    b = tmp_path / "b"
    assert main(["export", "--out", str(b), "--external-data"]) == 0
    files = set(load_bundle(b).files)
    assert {f"{g}.onnx.data" for g in ("vision", "embed", "pre_k", "post_k")} <= files
    assert all((b / f"{g}.onnx.data").stat().st_size > 50_000 for g in ("vision", "embed", "pre_k", "post_k"))
    assert main(["validate", str(b), "--max-new-tokens", "4", "--batch-sizes", "1"]) == 0
    for _ in range(2):
        capsys.readouterr()
        assert main(["build", str(b), "--no-plugin"]) == 0, capsys.readouterr().err
        engines = load_bundle(b).engines
        assert set(engines.engines) == {"vision", "embed", "pre_k", "post_k"}
        assert all((b / e.file).stat().st_size == e.bytes > 0 for e in engines.engines.values())
        assert all((b / f).stat().st_nlink == 1 for f in files), "a bundle file is still hard-linked"


def _stand_in_engine(*args):
    """In place of engines.build._build_rtx: writes 13 bytes to the engine file (its last argument)."""
    import hashlib

    from fastv_export.engines import build

    data = b"not an engine"
    Path(args[-1]).write_bytes(data)
    return build.BuiltEngine(hashlib.sha256(data).hexdigest(), len(data), ["MATRIX_MULTIPLY"], b"")


@pytest.mark.slow
@pytest.mark.tensorrt
def test_one_function_writes_the_manifest(tmp_path, monkeypatch):
    """Every write of a manifest.json, by the export and by the engine build, goes through
    fastv_export.bundle.write_manifest (the one writer, which checks before it writes)."""
    import os
    import traceback

    from fastv_export import files
    from fastv_export.config import FastVConfig
    from fastv_export.engines import build
    from fastv_export.export import ExportOptions, export_bundle

    writers: list[list[str]] = []
    real_write, real_replace = files.atomic_write, os.replace

    def spy(path, *args, **kwargs):
        if Path(path).name == "manifest.json":
            writers.append([frame.name for frame in traceback.extract_stack()])
        return real_write(path, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):        # any other way of putting a file in place
        if Path(dst).name == "manifest.json" and not any("atomic_write" in f.name for f in traceback.extract_stack()):
            writers.append([frame.name for frame in traceback.extract_stack()])
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(files, "atomic_write", spy)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(build, "_build_rtx", _stand_in_engine)
    bundle = export_bundle(tmp_path / "b", FastVConfig(k=2, ratio="1/2"), ExportOptions())
    build.build_engines(bundle, build.BuildOptions(backend="tensorrt-rtx", use_plugin=False))
    assert len(writers) == 2, writers
    assert all("write_manifest" in stack for stack in writers), writers


@pytest.mark.tensorrt
def test_an_inconsistent_engines_section_is_refused_before_anything_is_written(exported_bundle, tmp_path,
                                                                               monkeypatch):
    """The build goes through the one manifest writer, which checks before it writes: an engines section
    whose KV bytes are not what its limits imply is refused, the bundle left as it was. (The engines are
    stand-ins: what is tested is the section, not TensorRT.)"""
    from fastv_export.bundle import load_bundle
    from fastv_export.engines import build

    monkeypatch.setattr(build, "_build_rtx", _stand_in_engine)
    options = build.BuildOptions(backend="tensorrt-rtx", use_plugin=False)
    good = shutil.copytree(exported_bundle("tiny-llava", 2, "1/2"), tmp_path / "good")
    assert load_bundle(build.build_engines(good, options).path).engines.engines["post_k"].bytes == 13  # a control
    b = shutil.copytree(exported_bundle("tiny-llava", 2, "1/2"), tmp_path / "b")
    before = _snapshot(b)
    real = build.kv_cache_bytes
    monkeypatch.setattr(build, "kv_cache_bytes", lambda m, limits, graph: real(m, limits, graph) + 1)
    with pytest.raises(FastVError, match=r"manifest.json field 'engines.engines.vision.kv_cache_bytes_at_max': 1 is "
                                         r"not 0 \(what engines.limits imply\)") as exc:
        build.build_engines(b, options)
    assert "\n" not in str(exc.value)
    assert _snapshot(b) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "good"], "a temporary directory was left behind"


@pytest.mark.slow
@pytest.mark.tensorrt
def test_build_cli_prints_the_summary_and_the_trtexec_lines(exported_bundle, tmp_path, capsys):
    from fastv_export.cli import main

    b = shutil.copytree(exported_bundle("tiny-qwen2-vl", 2, "1/2"), tmp_path / "b")
    assert main(["build", str(b), "--no-plugin", "--max-prompt", "128"]) == 0
    out = capsys.readouterr().out
    assert "post-K n'=" in out and "post_k" in out
    assert main(["build", str(b), "--print-trtexec", "--max-prompt", "128", "--no-plugin"]) == 0
    printed = capsys.readouterr().out
    assert printed == (b / "build_engines.sh").read_text()
    assert len(_parse_trtexec(printed.splitlines()[-1])) == 2


def _gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _gpu(), reason="needs an NVIDIA GPU (and TensorRT or TensorRT-RTX)")
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_tensorrt_engines_generate_the_reference_tokens(exported_bundle, plugin_build, tmp_path, preset):
    """Engines built for this GPU, run through the one generation loop: validation (reference vs the
    TensorRT runner) passes, and the tokens equal ONNX Runtime's."""
    import torch

    from fastv_export.bundle import load_bundle
    from fastv_export.engines.build import BuildOptions, build_engines
    from fastv_export.engines.runner import TrtRunner
    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.ort import OrtRunner
    from fastv_export.validate import validate_bundle

    major, minor = torch.cuda.get_device_capability(0)
    lib = plugin_build(archs=f"{major}{minor}")
    b = shutil.copytree(exported_bundle(preset, 2, "1/2"), tmp_path / "b")
    build_engines(b, BuildOptions(compute_capabilities=("current",), plugin_library=str(lib),
                                  limits=BuildLimits(max_batch=3, max_prompt=192, max_new_tokens=32)))
    bundle = load_bundle(b)
    runner = TrtRunner(bundle)
    report = validate_bundle(b, max_new_tokens=16, batch_sizes=(1, 3), runner=runner)
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]
    ids = np.array([[1] + [20] * 5 + bundle.image_prompt_tokens() + [30] * 8])
    px = np.random.default_rng(0).standard_normal(bundle.vision_input_shape).astype(np.float32)
    trt_gen = generate(runner, ids, np.ones_like(ids), [px], 16)
    ort_gen = generate(OrtRunner(bundle), ids, np.ones_like(ids), [px], 16)
    assert np.array_equal(trt_gen.tokens, ort_gen.tokens) and np.array_equal(trt_gen.kept, ort_gen.kept)


def test_default_prompt_is_the_images_and_64_text_tokens():
    from fastv_export.engines.profiles import lengths

    n = lengths(MANIFEST, BuildLimits(images=2))
    assert (n.prompt, n.image_tokens, n.kept) == (2 * 64 + 64, 128, 2 * 64 + 64 - 64)


def test_device_buffers_are_reserved_once_and_grow_only_beyond_the_reservation():
    """The TensorRT runner's buffer pool on the CPU: views of one reservation (same address) for every
    smaller shape, a non-null address for empty tensors, growth (doubling) only past the reservation."""
    import torch

    from fastv_export.engines.runner import DeviceBuffers

    sizes = []
    pool = DeviceBuffers(lambda n: sizes.append(n) or torch.zeros(n, dtype=torch.uint8))
    pool.reserve("pre_k/past.0.key", 4 * 2 * 3 * 5)
    full = pool.view("pre_k/past.0.key", (2, 3, 5), torch.float32)
    for step in range(1, 5):                                   # a growing past within the reservation
        v = pool.view("pre_k/past.0.key", (2, 3, step), torch.float32)
        assert v.shape == (2, 3, step) and v.dtype == torch.float32 and v.data_ptr() == full.data_ptr()
    assert sizes == [120] and pool.allocations == 1
    empty = pool.view("pre_k/candidate_positions", (2, 0), torch.int64)
    assert empty.numel() == 0 and pool.address("pre_k/candidate_positions", empty) != 0 and pool.allocations == 2
    assert pool.address("pre_k/past.0.key", full) == full.data_ptr()
    grown = pool.view("pre_k/past.0.key", (2, 3, 6), torch.float32)   # 144 bytes > 120: grows to 240
    assert grown.shape == (2, 3, 6) and sizes[-1] == 240 and pool.allocations == 3
    pool.view("pre_k/past.0.key", (2, 3, 10), torch.float32)          # 240 bytes: fits, no allocation
    assert pool.allocations == 3
