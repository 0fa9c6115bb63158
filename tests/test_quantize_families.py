"""Quantized bundles beyond LLaVA and the fp8 scheme: tiny-qwen2.5-vl (q/k/v biases, M-RoPE) and tiny-internvl
(its own vision tower and projector) exported with int8 / int4 (and fp8) weights, checked against the Hugging Face
weights, validated in ONNX Runtime and built ahead of time with TensorRT-RTX and the plugin; the fp8 rewrite
against an independent float8 rounding; the one-line refusals (a target or a TensorRT too old for the scheme)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastv_export.errors import FastVError
from fastv_export.quantize import SCHEMES, check_target, get_scheme
from fastv_export.quantize.onnx_weights import quantize_graph
from fastv_export.quantize.reference import dequantize
from fastv_export.quantize.schemes import check_backend, trtexec_guard
from tests.helpers import copy_bundle, matmul_model, once_per_run, ort_outputs, shared_dir, weight_digests

E4M3_MAX = 448.0


def _dq_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """torch parameter -> (dequantized [in, out] float64, the scale repeated to [in, out], q as float64) for every
    DequantizeLinear of a graph file, computed here with numpy from the initializers and the node's attributes."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        assert len(node.input) == 2 or not node.input[2], "a zero point"
        attrs = {a.name: a.i for a in node.attribute}
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if attrs.get("block_size"):
            assert attrs["axis"] == 0
            s = np.repeat(s, attrs["block_size"], axis=0)[:q.shape[0]]
        else:
            assert attrs.get("axis", 1) == 1 and s.shape == (q.shape[1],)
            s = np.broadcast_to(s[None, :], q.shape)
        param = node.input[0].rsplit(".T_DQ_Q", 1)[0]
        out[param] = (q * s, s, q)
    return out


# ------------------------------------------------------------------------------------------- fp8 weights
def test_fp8_rewrite_rounds_to_the_e4m3_grid_and_runs_in_onnxruntime():
    """fp8: one scale per output channel = absmax / 448; the weight is w / scale rounded to the nearest float8 e4m3fn
    (ml_dtypes' cast, independent of ONNX's QuantizeLinear); ONNX Runtime runs the opset 19 graph and the reference's
    torch dequantization equals its DequantizeLinear bit for bit."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    weights = {"model.layers.0.self_attn.q_proj.weight": rng.standard_normal((200, 48)).astype(np.float32),
               "model.layers.0.mlp.down_proj.weight": (rng.standard_normal((200, 24)) * 0.02).astype(np.float32)}
    weights["model.layers.0.mlp.down_proj.weight"][:, 3] = 0          # an all-zero channel: scale 1, q 0
    model = matmul_model(weights)
    out, info = quantize_graph(model, weight_digests(weights), SCHEMES["fp8"])
    onnx.checker.check_model(out, full_check=True)
    assert next(o.version for o in out.opset_import if o.domain == "") == 19
    assert sorted(info.params) == sorted(weights) and info.float_bytes == sum(w.nbytes for w in weights.values())
    assert info.quantized_bytes == sum(w.size + 4 * w.shape[1] for w in weights.values())   # 1 byte + fp32 scales
    inits = {i.name: i for i in out.graph.initializer}
    for node in (n for n in out.graph.node if n.op_type == "DequantizeLinear"):
        param = node.input[0].rsplit(".T_DQ_Q", 1)[0]
        w = weights[param]
        assert inits[node.input[0]].data_type == TensorProto.FLOAT8E4M3FN and len(node.input) == 2
        scale = numpy_helper.to_array(inits[node.input[1]])
        absmax = np.abs(w).max(axis=0)
        np.testing.assert_allclose(scale, np.where(absmax > 0, absmax / E4M3_MAX, 1), rtol=1e-6)
        q = numpy_helper.to_array(inits[node.input[0]])
        mine = (w / scale[None, :]).astype(ml_dtypes.float8_e4m3fn)
        np.testing.assert_array_equal(q.view(np.uint8), mine.view(np.uint8))
        deq = q.astype(np.float64) * scale[None, :]
        # e4m3: 3 mantissa bits, so round to nearest is within 2^-4 of the value; 2^-10 x scale below 2^-6 (subnormal)
        assert np.all(np.abs(deq - w) <= np.abs(w) * 2.0 ** -4 + scale[None, :] * 2.0 ** -10 + 1e-12)
    x = rng.standard_normal((2, 200)).astype(np.float32)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and "q_proj" in n.input[0])
    out.graph.output.append(helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
    y = ort_outputs(out, x)
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    torch_w = dequantize(numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]]), 1,
                         0).numpy()
    np.testing.assert_array_equal(torch_w, y[-1])
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert np.abs(y[0] - ref).max() <= 0.05 * np.abs(ref).max()


def test_fp8_weight_only_builds_for_sm89_and_sm120_not_sm86():
    """What TensorRT-RTX 1.7 does with DequantizeLinear(float8e4m3fn weight, per-channel scale) -> MatMul ahead of
    time: an engine for SM89 and SM120 whose DEQUANTIZE layer stays in the network; SM86 is refused by its
    compiler because the model contains float8 (the reason the fp8 scheme needs SM89)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from fastv_export.engines import trt_rtx

    rng = np.random.default_rng(4)
    weights = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((256, 128)).astype(np.float32)}
    out, _ = quantize_graph(matmul_model(weights), weight_digests(weights), SCHEMES["fp8"])
    for cc in ("SM89", "SM120"):
        built = trt_rtx.build_engine_aot(out, compute_capabilities=[cc])
        assert len(built.engine) > 0 and "DEQUANTIZE" in built.layer_types
    with pytest.raises(FastVError) as e:
        trt_rtx.build_engine_aot(out, compute_capabilities=["SM86"])
    assert "HW-specific datatypes: fp8_e4m3" in str(e.value)


# ------------------------------------------------------------------------------------------- refusals
def test_fp8_below_sm89_is_one_line():
    check_target("fp8", ["8.9", "SM120", "12.1"])
    for cc in ("8.6", "SM87", "8.7", "SM80", "7.5"):
        with pytest.raises(FastVError) as e:
            check_target("fp8", ["8.9", cc])
        msg = str(e.value)
        assert cc in msg and "SM89" in msg and "Orin" in msg and "\n" not in msg
    check_target("int4", ["8.7"])                                  # Orin runs int4 / int8 weight-only


def test_unknown_scheme_is_one_line():
    for name in ("fp4", "nvfp4", "int3", "INT4"):
        with pytest.raises(FastVError) as e:
            get_scheme(name)
        assert repr(name) in str(e.value) and "fp8" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("scheme,too_old,new_enough", [("int4", "9.3.0.1", "10.0.1.6"), ("fp8", "8.6.1", "9.0.0"),
                                                      ("int8", "7.2.3", "8.6.1")])
def test_tensorrt_version_without_the_scheme_is_one_line(scheme, too_old, new_enough):
    """onnx-tensorrt's changelog: INT4 (block-wise DequantizeLinear) came in 10.0, FP8 in 9.0, per-axis 8.0."""
    check_backend(scheme, "tensorrt", new_enough)
    check_backend(scheme, "tensorrt-rtx", "1.7.1.116")
    check_backend(None, "tensorrt", too_old)
    with pytest.raises(FastVError) as e:
        check_backend(scheme, "tensorrt", too_old)
    msg = str(e.value)
    assert too_old in msg and scheme in msg and "--backend tensorrt-rtx" in msg and "\n" not in msg


def _pretend_quantized(monkeypatch, bundle_dir: Path, scheme: str):
    from fastv_export.bundle import Bundle, load_bundle

    monkeypatch.setattr(Bundle, "quantization_scheme", property(lambda self: scheme))
    return load_bundle(bundle_dir)


def test_build_with_a_tensorrt_without_the_scheme_stops_before_parsing(monkeypatch, exported_bundle, tmp_path):
    """build_engines with a stand-in TensorRT 9.3 (no int4 import) refuses an int4 bundle in one line before any
    graph reaches the parser; an fp8 bundle on a Jetson Orin GPU (SM87) likewise; TensorRT 10.1 goes on."""
    from fastv_export.engines import build
    from fastv_export.engines.profiles import BuildLimits
    from tests import fake_tensorrt

    path = copy_bundle(exported_bundle("tiny-llava", 2, "1/2"), tmp_path)
    opts = build.BuildOptions(backend="tensorrt", use_plugin=False,
                              limits=BuildLimits(max_batch=1, max_prompt=128, max_new_tokens=8))
    gpu = {"name": "SM86-NVIDIA RTX A6000"}
    monkeypatch.setattr(build, "current_gpu", lambda: gpu["name"], raising=False)

    def install(version):
        module, record = fake_tensorrt.make_module(version)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(build, "_trt10_plugins", {}, raising=False)
        return record

    record = install("9.3.0.1")
    with pytest.raises(FastVError) as e:
        build.build_engines(_pretend_quantized(monkeypatch, path, "int4"), opts)
    assert "TensorRT 9.3.0.1" in str(e.value) and "\n" not in str(e.value) and record.parsed == []
    gpu["name"] = "SM87-Orin"
    record = install("10.3.0")
    with pytest.raises(FastVError) as e:
        build.build_engines(_pretend_quantized(monkeypatch, path, "fp8"), opts)
    assert "SM87" in str(e.value) and "SM89" in str(e.value) and record.parsed == []
    record = install("10.3.0")
    built = build.build_engines(_pretend_quantized(monkeypatch, path, "int4"), opts)   # Orin builds int4
    assert len(record.parsed) == 4 and set(built.engines.engines) == {"vision", "embed", "pre_k", "post_k"}
    script = (path / built.engines.trtexec_script).read_text()
    assert "int4 weights need compute capability 8.0" in script


def _run_guard(tmp_path: Path, scheme: str, cc: str | None, gpu: str = "") -> subprocess.CompletedProcess:
    """build_engines.sh's quantization guard with a stand-in nvidia-smi printing ``cc`` (None: no nvidia-smi)."""
    bin_dir = tmp_path / f"bin-{cc}"
    bin_dir.mkdir(exist_ok=True)
    if cc is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho {cc}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    script = "\n".join(["set -euo pipefail", f"gpu={gpu!r}", *trtexec_guard(scheme), "echo built"])
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    return subprocess.run(["bash", "-c", script], check=False, capture_output=True, text=True, env=env)


def test_trtexec_script_refuses_a_gpu_below_the_scheme(tmp_path):
    assert shutil.which("awk") and trtexec_guard(None) == []
    for scheme, cc, gpu, ok in [("fp8", "8.9", "", True), ("fp8", "12.0", "", True), ("fp8", "8.6", "", False),
                                ("fp8", None, "NVIDIA Jetson AGX Orin Developer Kit", False),
                                ("int4", None, "NVIDIA Jetson AGX Orin Developer Kit", True), ("int4", "8.6", "", True),
                                ("int8", "7.5", "", False), ("fp8", None, "", True)]:    # unknown GPU: trtexec decides
        r = _run_guard(tmp_path, scheme, cc, gpu)
        assert (r.returncode == 0) == ok, (scheme, cc, gpu, r.stderr)
        if ok:
            assert r.stdout.strip() == "built"
        else:
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and scheme in r.stderr


# ------------------------------------------------------------------------------------------- two more families
#: each family and each scheme once (CI time: a case takes about a minute on 2 cores); docs/design.md §10 records
#: the full 2 families x 3 schemes run
FAMILIES = [("tiny-qwen2.5-vl", "int4"), ("tiny-internvl", "int8"), ("tiny-qwen2.5-vl", "fp8")]


def _bundle(tmp_path_factory, model: str, scheme: str) -> Path:
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle

    root = shared_dir(tmp_path_factory) / "quantized"
    return once_per_run(root / f"{model}-{scheme}", lambda tmp: export_bundle(
        tmp, FastVConfig(k=2, ratio="1/2"), ExportOptions(model=model, quantize=scheme)))


@pytest.mark.slow
@pytest.mark.parametrize("model,scheme", FAMILIES)
def test_family_quantized_end_to_end(tmp_path_factory, model_and_adapter, plugin_library, model, scheme):
    """Export, the graph's dequantized weights against the Hugging Face weights (within half a step of the scheme's
    grid), validate in ONNX Runtime with fp32's tolerances, and an ahead-of-time TensorRT-RTX build with the plugin
    whose manifest records layer counts and engine bytes."""
    from fastv_export.bundle import load_bundle
    from fastv_export.validate import validate_bundle

    path = _bundle(tmp_path_factory, model, scheme)
    hf, adapter = model_and_adapter(model)
    params = {n: p.detach().double().numpy() for n, p in hf.named_parameters()}
    num_layers = adapter.decoder_shape().num_layers
    found = {}
    for graph in ("pre_k", "post_k"):
        found.update(_dq_weights(path / f"{graph}.onnx"))
    assert len(found) == 7 * num_layers                                # q k v o gate up down of every layer
    assert not any(n.endswith(".bias") or "lm_head" in n or "visual" in n or "vision" in n for n in found)
    for name, (deq, step, q) in found.items():
        w = params[name].T                                             # Linear [out, in] -> MatMul [in, out]
        if scheme == "fp8":
            assert np.all(np.abs(deq - w) <= np.abs(w) * 2.0 ** -4 + step * 2.0 ** -10 + 1e-12), name
        else:
            assert np.all(np.abs(deq - w) <= step / 2 * (1 + 1e-5) + 1e-12), name
            qmax = 7 if scheme == "int4" else 127
            assert q.min() >= -qmax - 1 and q.max() <= qmax
    # the float parts are the Hugging Face values: Qwen's q/k/v biases stay float32 constants in the graphs
    float_inits = {hashlib.sha256(numpy_helper.to_array(i).astype(np.float32).tobytes()).hexdigest()
                   for g in ("pre_k", "post_k") for i in onnx.load(str(path / f"{g}.onnx")).graph.initializer
                   if i.data_type == TensorProto.FLOAT}
    import torch

    names = {id(p): n for n, p in hf.named_parameters()}
    biases = [names[id(m.bias)] for layer in adapter.layers() for m in layer.modules()
              if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert len(biases) == 3 * num_layers                               # both LMs are Qwen2: q, k, v biases
    for n in biases:
        assert hashlib.sha256(params[n].astype(np.float32).tobytes()).hexdigest() in float_inits, n

    bundle = load_bundle(path)
    assert bundle.quantization["scheme"] == scheme and bundle.quantization["weights"] == 7 * num_layers
    report = validate_bundle(bundle, max_new_tokens=6, batch_sizes=(1, 2), report_dir=tmp_path_factory.mktemp("v"))
    assert report["passed"], [c["failure"] for c in report["cases"]]
    assert report["tolerances"]["logits"] == 1e-4
    gaps = report["quantization"]["gap_to_unquantized"]         # reported, not bounded (int4 on random weights:
    assert len(gaps) == 2 and all(0 < g["prefill_logits_error"] < np.inf for g in gaps)   # larger than |logits|)

    pytest.importorskip("tensorrt_rtx_bindings")
    from fastv_export.commands.build import build_with_progress
    from fastv_export.engines.build import BuildOptions
    from fastv_export.engines.trt_rtx import parse_onnx

    target = "SM89" if scheme == "fp8" else "SM86"
    work = copy_bundle(path, tmp_path_factory.mktemp("trt"))
    built = build_with_progress(load_bundle(work), BuildOptions(backend="tensorrt-rtx", compute_capabilities=(target,),
                                                                plugin_library=str(plugin_library)))
    manifest = json.loads((work / "manifest.json").read_text())["engines"]
    assert manifest["engines"]["pre_k"]["plugin_layers"] == 1 and built.engines.token_select == "plugin"
    for graph, entry in manifest["engines"].items():
        assert entry["layers"] > 0 and entry["bytes"] == (work / entry["file"]).stat().st_size > 0, graph
    layers = parse_onnx(work / "pre_k.onnx", plugin_library=plugin_library).layer_types
    assert "DEQUANTIZE" in layers and layers.count("PLUGIN_V3") == 1
    if scheme == "fp8":
        with pytest.raises(FastVError, match="SM89"):
            build_with_progress(load_bundle(work), BuildOptions(backend="tensorrt-rtx", compute_capabilities=("8.6",),
                                                                use_plugin=False))
