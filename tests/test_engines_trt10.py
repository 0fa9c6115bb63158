"""The engine build's TensorRT settings, checked without a GPU: the TensorRT 10 path driven by a stand-in
``tensorrt`` module (tests/fake_tensorrt.py, which imports ONNX as onnx-tensorrt 10.1 does), the
TensorRT-RTX path with its build call recorded, and build_engines.sh run with stand-in ``trtexec`` and
``nvidia-smi`` commands. Covers: no TF32 for fp32 bundles, TokenSelect handed to the parser without its
function body when the plugin is used, no plugin serialization into engines that are not version-compatible,
one registration per plugin library, timing caches named by backend, version and GPU."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from fastv_export.bundle import load_bundle
from fastv_export.engines import build
from fastv_export.engines.profiles import BuildLimits
from fastv_export.engines.timing_cache import cache_name
from fastv_export.graphs import op
from tests import fake_tensorrt

LIMITS = BuildLimits(max_batch=1, max_prompt=128, max_new_tokens=8)


@pytest.fixture
def trt10(monkeypatch):
    """Installs a stand-in TensorRT 10 module; returns a function that replaces it (another version,
    unreadable caches) and returns its record."""
    def install(version: str = "10.1.0", **behaviour) -> fake_tensorrt.Record:
        module, record = fake_tensorrt.make_module(version, **behaviour)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(build, "_trt10_plugins", {}, raising=False)
        return record

    monkeypatch.setattr(build, "current_gpu", lambda: "SM90-NVIDIA H100 80GB HBM3", raising=False)
    return install


@pytest.fixture
def bundle_copy(exported_bundle, tmp_path):
    return shutil.copytree(exported_bundle("tiny-llava", 2, "1/2"), tmp_path / "b")


@pytest.fixture
def plugin_file(tmp_path) -> Path:
    """A file standing in for libfastv_plugins.so (the stand-in registry only records its path)."""
    lib = tmp_path / "plugins" / op.PLUGIN_LIBRARY
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF stand-in")
    return lib


def _options(plugin: Path | None, backend: str = "tensorrt") -> build.BuildOptions:
    return build.BuildOptions(backend=backend, plugin_library=None if plugin is None else str(plugin),
                              use_plugin=plugin is not None, limits=LIMITS)


def _stand_in_file_build(out, layers: list[str]):
    """What trt_rtx.build_engine_to_file returns, for a stand-in engine written to ``out``."""
    import hashlib

    from fastv_export.engines import trt_rtx

    Path(out).write_bytes(b"engine")
    return trt_rtx.FileBuild(hashlib.sha256(b"engine").hexdigest(), 6, layers, [], b"cache")


def _token_select(model: onnx.ModelProto) -> tuple[onnx.NodeProto, list[onnx.FunctionProto]]:
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (op.OP_DOMAIN, op.OP_TYPE)]
    assert len(nodes) == 1
    return nodes[0], [f for f in model.functions if (f.domain, f.name) == (op.OP_DOMAIN, op.OP_TYPE)]


# ---------------------------------------------------------------------------------------------- 1. TF32
def test_fp32_engines_are_built_without_tf32(trt10, bundle_copy):
    record = trt10()
    assert load_bundle(bundle_copy).precision == "fp32"
    build.build_engines(bundle_copy, _options(None))
    assert len(record.configs) == 4
    assert all(not c.get_flag("TF32") for c in record.configs), [sorted(c.flags) for c in record.configs]


def test_tensorrt_rtx_builds_of_fp32_bundles_clear_tf32(bundle_copy, monkeypatch):
    """build_engines asks TensorRT-RTX for no TF32 on an fp32 bundle, and the builder config of build_engine_aot (and
    build_engine_to_file: the same config) clears the flag on the real TensorRT-RTX builder (on by default)."""
    from fastv_export.engines import trt_rtx

    trt = trt_rtx.import_trt()
    calls = []
    real_build = trt_rtx.build_engine_aot

    def recorder(onnx_path, out, **kwargs):
        calls.append(kwargs)
        return _stand_in_file_build(out, ["MATRIX_MULTIPLY"])

    monkeypatch.setattr(trt_rtx, "build_engine_to_file", recorder)
    build.build_engines(bundle_copy, _options(None, "tensorrt-rtx"))
    assert [c["tf32"] for c in calls] == [False] * 4

    # the flag on a real TensorRT-RTX config: a one-MatMul fp32 model built ahead of time
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    w = onnx.numpy_helper.from_array(__import__("numpy").eye(4, dtype="float32"), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    parsed = trt_rtx.parse_onnx(model)
    configs = []

    class Builder:      # the parsed network's builder, recording the configs it creates
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def create_builder_config(self):
            configs.append(self.real.create_builder_config())
            return configs[-1]

    default = parsed.builder.create_builder_config()
    assert default.get_flag(trt.BuilderFlag.TF32), "TensorRT-RTX no longer allows TF32 by default"
    parsed.builder = Builder(parsed.builder)
    real_build(model, parsed=parsed, compute_capabilities=["SM86"], tf32=False)
    assert len(configs) == 1 and not configs[0].get_flag(trt.BuilderFlag.TF32)


# ---------------------------------------------------------------------------------------------- 2. parser input
def test_with_the_plugin_the_parser_gets_token_select_without_its_function_body(trt10, bundle_copy, plugin_file):
    """onnx-tensorrt 10.1 expands a local function before it looks for a plugin: pre_k reaches the parser
    without TokenSelect's function body, so the plugin is the only match (one PLUGIN_V3 layer)."""
    record = trt10()
    built = build.build_engines(bundle_copy, _options(plugin_file))
    assert built.engines.engines["pre_k"].plugin_layers == 1
    handed = [onnx.load_from_string(data) for data in record.parsed]
    pre_k = [m for m in handed if any(n.op_type == op.OP_TYPE for n in m.graph.node)]
    assert len(pre_k) == 1
    node, functions = _token_select(pre_k[0])
    assert functions == []
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == op.PLUGIN_NAMESPACE.encode() and attrs["ratio_den"] == 2
    # the bundle's own pre_k.onnx keeps the function body (ONNX Runtime runs it)
    _, kept = _token_select(onnx.load(str(bundle_copy / "pre_k.onnx")))
    assert len(kept) == 1


def test_without_the_plugin_the_parser_gets_the_function_body_and_no_plugin_attributes(trt10, bundle_copy):
    record = trt10()
    built = build.build_engines(bundle_copy, _options(None))
    assert built.engines.engines["pre_k"].plugin_layers == 0
    pre_k = [m for m in map(onnx.load_from_string, record.parsed) if any(n.op_type == op.OP_TYPE for n in m.graph.node)]
    node, functions = _token_select(pre_k[0])
    assert len(functions) == 1 and not {"plugin_namespace", "plugin_version"} & {a.name for a in node.attribute}


def test_tensorrt_rtx_gets_pre_k_without_the_function_body_too(bundle_copy, plugin_file, monkeypatch):
    import contextlib

    from fastv_export.engines import trt_rtx

    handed = []

    def recorder(onnx_path, out, transform, **kwargs):
        model = transform(onnx.load(str(onnx_path)))
        handed.append(model)
        has_node = any(n.op_type == op.OP_TYPE for n in model.graph.node)
        return _stand_in_file_build(out, ["PLUGIN_V3"] if has_node else ["MATRIX_MULTIPLY"])

    monkeypatch.setattr(trt_rtx, "build_engine_to_file", recorder)
    monkeypatch.setattr(trt_rtx, "plugin_library", lambda path: contextlib.nullcontext())
    build.build_engines(bundle_copy, _options(plugin_file, "tensorrt-rtx"))
    pre_k = [m for m in handed if any(n.op_type == op.OP_TYPE for n in m.graph.node)]
    assert len(pre_k) == 1 and _token_select(pre_k[0])[1] == []


# ---------------------------------------------------------------------------------------------- 3. serialization
def test_the_plugin_is_not_serialized_into_engines_that_are_not_version_compatible(trt10, bundle_copy, plugin_file):
    record = trt10()
    built = build.build_engines(bundle_copy, _options(plugin_file))
    assert all(c.serialize_plugins is None for c in record.configs), [c.serialize_plugins for c in record.configs]
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["engines"]["plugin"]["serialized_in_engine"] is False
    assert built.engines.plugin["serialized_in_engine"] is False


def test_a_plugin_library_is_registered_once_per_process(trt10, bundle_copy, plugin_file, tmp_path):
    """Two builds and a runner's load in one process: TensorRT's registry sees the library once (a second
    load_library registers its creators twice, which TensorRT refuses)."""
    record = trt10()
    build.build_engines(bundle_copy, _options(plugin_file))
    build.build_engines(bundle_copy, _options(plugin_file))
    build.load_plugin_library("tensorrt", plugin_file)
    assert record.loaded_libraries == [os.path.realpath(plugin_file)]


# ---------------------------------------------------------------------------------------------- 4. timing cache
def test_timing_cache_names_differ_by_backend_version_and_gpu():
    names = {cache_name("tensorrt", "10.1.0", ["SM90-NVIDIA H100"]),
             cache_name("tensorrt", "10.14.1", ["SM90-NVIDIA H100"]),
             cache_name("tensorrt", "10.1.0", ["SM89-NVIDIA L4"]),
             cache_name("tensorrt-rtx", "1.7.1.116", ["SM86", "SM89"]),
             cache_name("tensorrt-rtx", "1.7.1.116", ["SM86"])}
    assert len(names) == 5
    assert all(n.startswith("timing.") and n.endswith(".cache") and "/" not in n and " " not in n for n in names)


def test_a_timing_cache_is_reused_only_by_the_same_backend_version_and_gpu(trt10, bundle_copy, monkeypatch):
    record = trt10("10.1.0")
    first = build.build_engines(bundle_copy, _options(None))
    name = first.engines.timing_cache
    assert name == cache_name("tensorrt", "10.1.0", ["SM90-NVIDIA H100 80GB HBM3"])
    assert (bundle_copy / name).is_file() and not (bundle_copy / "timing.cache").exists()
    assert record.configs[0].given_cache == b""                       # nothing to reuse yet
    written = (bundle_copy / name).read_bytes()

    record = trt10("10.1.0")                                            # same version and GPU: reused
    build.build_engines(bundle_copy, _options(None))
    assert record.configs[0].given_cache == written

    for version, gpu in [("10.14.1", "SM90-NVIDIA H100 80GB HBM3"), ("10.1.0", "SM89-NVIDIA L4"), ("10.1.0", None)]:
        record = trt10(version)
        monkeypatch.setattr(build, "current_gpu", lambda gpu=gpu: gpu)
        section = build.build_engines(bundle_copy, _options(None)).engines
        assert record.configs[0].given_cache == b"", (version, gpu)     # another version or GPU: a new cache
        caches = sorted(f.name for f in bundle_copy.iterdir() if f.name.startswith("timing."))
        assert caches == [section.timing_cache], "a cache of another backend, version or GPU was kept"


def test_a_legacy_timing_cache_is_not_reused(trt10, bundle_copy):
    (bundle_copy / "timing.cache").write_bytes(b"from a TensorRT-RTX build")
    record = trt10()
    build.build_engines(bundle_copy, _options(None))
    assert all(c.given_cache == b"" for c in record.configs[:1]) and not (bundle_copy / "timing.cache").exists()


def test_an_unreadable_timing_cache_starts_a_new_one_with_one_line(trt10, bundle_copy, caplog):
    trt10()
    build.build_engines(bundle_copy, _options(None))
    record = trt10(unreadable_cache=True)           # this TensorRT cannot read the cache it is given
    with caplog.at_level(logging.WARNING, logger="fastv_export.engines.timing_cache"):
        build.build_engines(bundle_copy, _options(None))
    assert record.built == 4 and record.configs[0].cache.data == b""
    lines = [r.getMessage() for r in caplog.records if "timing cache" in r.getMessage()]
    assert len(lines) == 1 and "could not be read" in lines[0] and "\n" not in lines[0]


# ---------------------------------------------------------------------------------------------- trtexec script
def _run_script(bundle: Path, tmp_path: Path, trt_banner: str, gpu: str) -> list[list[str]]:
    """Runs build_engines.sh with stand-in trtexec / nvidia-smi on PATH; returns each trtexec's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "trtexec.log"
    log.write_text("")
    (bin_dir / "trtexec").write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "${{1:-}}" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec [{trt_banner}] # trtexec --help"; '
        "exit 0; fi\n"
        f'printf "%s\\x1f" "$@" >> {log}; echo >> {log}\n')
    (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\necho '{gpu}'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(bundle / "build_engines.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines() if line]


def test_trtexec_script_builds_without_tf32_loads_the_plugin_and_names_its_cache(bundle_copy, tmp_path, monkeypatch):
    """build_engines.sh for an fp32 bundle with the plugin, run with stand-ins: --noTF32 on every build, the
    plugin loaded but not serialized, the timing cache named by TensorRT version and GPU."""
    from fastv_export.engines import trt_rtx
    import contextlib

    monkeypatch.setattr(trt_rtx, "build_engine_to_file", lambda path, out, transform, **kw: _stand_in_file_build(
        out, ["PLUGIN_V3"] if any(n.op_type == op.OP_TYPE for n in transform(onnx.load(str(path))).graph.node)
        else ["SHUFFLE"]))
    monkeypatch.setattr(trt_rtx, "plugin_library", lambda path: contextlib.nullcontext())
    lib = tmp_path / op.PLUGIN_LIBRARY
    lib.write_bytes(b"stand-in")
    build.build_engines(bundle_copy, _options(lib, "tensorrt-rtx"))
    runs = _run_script(bundle_copy, tmp_path, "TensorRT v101400", "NVIDIA H100 80GB HBM3, 9.0")
    assert len(runs) == 4
    caches = set()
    for args in runs:
        assert "--noTF32" in args and "--stronglyTyped" in args, args
        assert not [a for a in args if a.startswith("--setPluginsToSerialize")], args
        caches |= {a.split("=", 1)[1] for a in args if a.startswith("--timingCacheFile=")}
    assert caches == {"timing.tensorrt-v101400-NVIDIA_H100_80GB_HBM3_9.0.cache"}
    rtx_cache = load_bundle(bundle_copy).engines.timing_cache
    assert rtx_cache not in caches
    assert [a for a in runs[2] if a.startswith("--dynamicPlugins")] == [f"--dynamicPlugins={op.PLUGIN_LIBRARY}"]
    other = _run_script(bundle_copy, tmp_path, "TensorRT v101400", "NVIDIA L4, 8.9")
    assert {a for a in other[0] if a.startswith("--timingCacheFile=")} != {f"--timingCacheFile={c}" for c in caches}
    # a TensorRT or GPU the script cannot name: its cache is removed before the builds, never reused
    unnamed = bundle_copy / "timing.tensorrt-unknown-NVIDIA_H100_80GB_HBM3_9.0.cache"
    unnamed.write_bytes(b"from some other GPU")
    runs = _run_script(bundle_copy, tmp_path, "no banner", "NVIDIA H100 80GB HBM3, 9.0")
    assert f"--timingCacheFile={unnamed.name}" in runs[0] and not unnamed.exists()


def test_trtexec_lines_of_reduced_precision_bundles_keep_tf32():
    from tests.test_engines import RAW

    from fastv_export.bundle import Manifest

    raw = json.loads(json.dumps(RAW))
    raw["precision"] = "fp16"
    lines = build.trtexec_lines(Manifest(raw), LIMITS)
    assert lines and not any("--noTF32" in line for line in lines)
    assert all("--noTF32" in line for line in build.trtexec_lines(Manifest(RAW), LIMITS))
