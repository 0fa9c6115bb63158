"""Quantized bundles (export --quantize): the ONNX weight-only rewrite, the PyTorch dequantization of the
reference, the manifest section, validate against the quantized reference, and the one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fastv_export.errors import FastVError
from fastv_export.quantize import SCHEMES, check_target, get_scheme
from fastv_export.quantize.onnx_weights import decoder_linear_weights, quantize_graph
from fastv_export.quantize.reference import dequantize
from tests.helpers import copy_bundle, matmul_model, once_per_run, ort_outputs, run_cli, shared_dir, weight_digests


# ------------------------------------------------------------------------------------------- schemes, refusals
def test_unknown_scheme_is_one_line():
    with pytest.raises(FastVError) as e:
        get_scheme("fp4")
    assert "'fp4'" in str(e.value) and "int8" in str(e.value) and "\n" not in str(e.value)
    assert get_scheme("none") is None and get_scheme(None) is None


def test_cli_unknown_scheme(capsys, tmp_path):
    rc, err = run_cli(capsys, ["export", "--quantize", "int3", "--out", str(tmp_path / "b")])
    assert rc == 2 and "unknown quantization scheme 'int3'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_target_below_sm80_is_refused(scheme):
    check_target(scheme, ["SM86", "8.9", "SM120"])
    check_target(None, ["SM75"])
    with pytest.raises(FastVError) as e:
        check_target(scheme, ["8.6", "7.5"])
    assert "7.5" in str(e.value) and "SM80" in str(e.value) and "\n" not in str(e.value)


def test_fp16_with_quantize_is_refused(capsys, tmp_path):
    rc, err = run_cli(capsys, ["export", "--quantize", "int8", "--dtype", "fp16", "--out", str(tmp_path / "b")])
    assert rc == 2 and "--dtype fp32" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------- the ONNX rewrite
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_graph_rounds_each_weight_to_its_grid(scheme):
    rng = np.random.default_rng(1)
    weights = {"layers.0.q.weight": rng.standard_normal((256, 64)).astype(np.float32),
               "layers.0.o.weight": (rng.standard_normal((256, 32)) * 0.02).astype(np.float32)}
    other = rng.standard_normal((256, 16)).astype(np.float32)        # not a decoder weight: stays float
    model = matmul_model({**weights, "lm_head": other})
    out, info = quantize_graph(model, weight_digests(weights), SCHEMES[scheme])
    onnx.checker.check_model(out, full_check=True)
    assert sorted(info.params) == sorted(weights) and info.float_bytes == sum(w.nbytes for w in weights.values())
    inits = {i.name: i for i in out.graph.initializer}
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and "val_2" in inits and inits["val_2"].data_type == TensorProto.FLOAT
    bits, qmax = SCHEMES[scheme].bits, (7 if scheme == "int4" else 127)
    for node in dqs:
        assert len(node.input) == 2                                  # symmetric: no zero point (TensorRT)
        param = node.input[0][:-len(f".T_DQ_Q{bits}")]
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        w = weights[param].astype(np.float64)
        assert q.min() >= -qmax - 1 and q.max() <= qmax
        if scheme == "int8":                                         # one scale per output channel: absmax / 127
            assert scale.shape == (w.shape[1],)
            np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
            deq, s_full = q * scale[None, :], np.broadcast_to(scale[None, :], w.shape)
        else:                                                        # one scale per 128 rows of each column
            assert scale.shape == (w.shape[0] // 128, w.shape[1])    # [-absmax, absmax] over 15 steps of int4
            np.testing.assert_allclose(scale, 2 * np.abs(w.reshape(2, 128, -1)).max(axis=1) / 15, rtol=1e-6)
            s_full = np.repeat(scale, 128, axis=0)
            deq = q * s_full
        assert np.all(scale > 0)                                     # TensorRT's parser refuses scales <= 0
        assert np.all(np.abs(deq - w) <= s_full / 2 + 1e-6 * np.abs(w).max())   # round to nearest
    x = rng.standard_normal((2, 256)).astype(np.float32)
    y = ort_outputs(out, x)
    ref = [x.astype(np.float64) @ w.astype(np.float64) for w in [*weights.values(), other]]
    np.testing.assert_allclose(y[2], ref[2], rtol=1e-5, atol=1e-5)  # the float weight is untouched
    for got, want in zip(y[:2], ref[:2]):
        assert np.abs(got - want).max() <= (0.02 if scheme == "int8" else 0.2) * np.abs(want).max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_torch_dequantize_matches_onnxruntime(scheme):
    """The reference's dequantization (torch) equals DequantizeLinear in ONNX Runtime, bit for bit; K = 200 is not
    a multiple of the block (the last block is short)."""
    rng = np.random.default_rng(2)
    weights = {"layers.1.mlp.weight": rng.standard_normal((200, 48)).astype(np.float32)}
    out, _ = quantize_graph(matmul_model(weights), weight_digests(weights), SCHEMES[scheme])
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    out.graph.output.append(helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
    ort_w = ort_outputs(out, np.zeros((2, 200), np.float32))[-1]
    inits = {i.name: i for i in out.graph.initializer}
    attrs = {a.name: a.i for a in dq.attribute}
    mine = dequantize(numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]]),
                      attrs.get("axis", 1), attrs.get("block_size", 0)).numpy()
    assert mine.shape == (200, 48)
    np.testing.assert_array_equal(mine, ort_w)


def test_decoder_weights_are_the_layers_linears(model_and_adapter):
    _, adapter = model_and_adapter("tiny-llava-shapes")
    names = decoder_linear_weights(adapter)
    layers = adapter.decoder_shape().num_layers
    assert len(names) == 7 * layers                                 # q k v o gate up down
    assert all(".layers." in n and n.endswith(".weight") for n in names.values())
    assert not any("lm_head" in n or "vision" in n for n in names.values())


# ------------------------------------------------------------------------------------------- whole bundles
def _bundle(tmp_path_factory, model: str, scheme: str) -> Path:
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle

    root = shared_dir(tmp_path_factory) / "quantized"
    return once_per_run(root / f"{model}-{scheme}", lambda tmp: export_bundle(
        tmp, FastVConfig(k=2, ratio="1/2"), ExportOptions(model=model, quantize=None if scheme == "none" else scheme)))


@pytest.mark.slow
@pytest.mark.parametrize("model,scheme", [("tiny-llava-shapes", "int4"), ("tiny-llava-shapes", "int8"),
                                          ("tiny-qwen2-vl", "int4")])
def test_quantized_bundle_validates_against_its_reference(tmp_path_factory, model, scheme):
    from fastv_export.bundle import load_bundle
    from fastv_export.validate import validate_bundle

    path = _bundle(tmp_path_factory, model, scheme)
    bundle = load_bundle(path)                                      # the schema (with 'quantization') accepts it
    q = bundle.quantization
    assert q["scheme"] == scheme and q["calibration"]["kind"] == "none" and q["quantized"]["lm_head"] is False
    assert q["weights"] == 7 * bundle.num_layers
    report = validate_bundle(bundle, max_new_tokens=8, batch_sizes=(1, 3), report_dir=tmp_path_factory.mktemp("v"))
    assert report["passed"], [c["failure"] for c in report["cases"]]
    assert report["tolerances"]["logits"] == 1e-4                   # fp32's: the same weights on both sides
    gaps = report["quantization"]["gap_to_unquantized"]
    assert len(gaps) == 2 and all(0 < g["prefill_logits_error"] < g["prefill_logits_max"] for g in gaps)
    assert all(0 <= g["token_agreement"] <= 1 and 0 < g["selection_agreement"] <= 1 for g in gaps)


@pytest.mark.slow
def test_int4_weight_bytes(tmp_path_factory):
    """int4 decoder weights (+ their fp32 scales) are under 0.3x of their fp32 bytes, measured in the graphs."""
    plain = _bundle(tmp_path_factory, "tiny-llava-shapes", "none")
    int4 = _bundle(tmp_path_factory, "tiny-llava-shapes", "int4")
    manifest = json.loads((int4 / "manifest.json").read_text())
    wb = manifest["quantization"]["weight_bytes"]
    assert wb["quantized"] <= 0.3 * wb["float"]
    # independently: what the decoder graphs' files shrank by is at least what the weights lost
    size = lambda b: sum((b / f).stat().st_size for f in ("pre_k.onnx", "post_k.onnx"))   # noqa: E731
    assert size(plain) - size(int4) >= 0.95 * (wb["float"] - wb["quantized"])
    assert size(int4) <= 0.3 * size(plain)


@pytest.mark.slow
def test_int4_pre_k_builds_with_tensorrt_rtx(tmp_path_factory, plugin_library):
    """TensorRT-RTX builds the quantized pre_k (TokenSelect as the plugin) ahead of time for SM86: int4
    DequantizeLinear layers in the network."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from fastv_export.bundle import load_bundle
    from fastv_export.commands.build import build_with_progress
    from fastv_export.engines.build import BuildOptions
    from tests.helpers import copy_bundle

    path = copy_bundle(_bundle(tmp_path_factory, "tiny-llava-shapes", "int4"), tmp_path_factory.mktemp("trt"))
    built = build_with_progress(load_bundle(path), BuildOptions(compute_capabilities=("SM86",),
                                                                plugin_library=str(plugin_library)))
    pre_k = built.engines.engines["pre_k"]
    assert pre_k.plugin_layers == 1 and pre_k.bytes > 0 and built.engines.token_select == "plugin"
    from fastv_export.engines.trt_rtx import parse_onnx
    layers = parse_onnx(path / "pre_k.onnx", plugin_library=plugin_library).layer_types
    assert "DEQUANTIZE" in layers and "PLUGIN_V3" in layers
    with pytest.raises(FastVError, match="SM80"):
        build_with_progress(load_bundle(path), BuildOptions(compute_capabilities=("SM75",), use_plugin=False))


def test_dequantized_reference_replaces_the_parameters(tmp_path):
    """apply_quantized_weights sets exactly the named parameters, transposed back to [out, in]."""
    from fastv_export.quantize.reference import apply_quantized_weights

    lin = torch.nn.Sequential(torch.nn.Linear(128, 16, bias=False))
    w = lin[0].weight.detach().t().contiguous().numpy()
    out, _ = quantize_graph(matmul_model({"0.weight": w}), weight_digests({"0.weight": w}), SCHEMES["int8"])
    for g in ("pre_k", "post_k"):
        onnx.save(out, str(tmp_path / f"{g}.onnx"))
    before = lin[0].weight.detach().clone()
    assert apply_quantized_weights(lin, tmp_path) == 1
    scale = before.abs().amax(dim=1, keepdim=True) / 127
    torch.testing.assert_close(lin[0].weight, torch.round(before / scale) * scale, rtol=0, atol=1e-6)


def test_schema_section_agrees_with_the_schemes():
    """The manifest schema's quantization section names exactly the schemes the code offers, with their dtypes."""
    from fastv_export.bundle.verify import manifest_schema

    props = manifest_schema()["properties"]["quantization"]["properties"]
    assert set(props["scheme"]["enum"]) == set(SCHEMES)
    assert set(props["weight_dtype"]["enum"]) == {s.onnx_dtype for s in SCHEMES.values()}
    assert set(props["bits"]["enum"]) == {s.bits for s in SCHEMES.values()}
    assert set(props["granularity"]["enum"]) == {s.granularity for s in SCHEMES.values()}
    assert "quantization" not in manifest_schema()["required"]       # float bundles have none


# ------------------------------------------------------------------------------------------- the gap's tolerance
def _gap(batch, top1, selection):
    return {"batch": batch, "prefill_logits_error": 0.5, "prefill_logits_max": 9.0, "prefill_top1_agreement": top1,
            "token_agreement": 0.5, "selection_agreement": selection}


def test_gap_over_tolerance_names_each_shortfall():
    from fastv_export.quantize.gap import over_tolerance

    tol = {"prefill_top1_agreement": 0.9, "selection_agreement": 0.9}
    assert over_tolerance([_gap(1, 1.0, 0.9), _gap(3, 0.95, 1.0)], tol) == []
    assert over_tolerance([_gap(1, 1.0, 0.85), _gap(3, 2 / 3, float("nan"))], tol) == [
        "batch 1: selection_agreement 85.0% < 90%", "batch 3: prefill_top1_agreement 66.7% < 90%",
        "batch 3: selection_agreement nan% < 90%"]


@pytest.mark.slow
def test_validate_fails_on_the_gap_only_when_asked(tmp_path_factory, monkeypatch, capsys):
    """The demo's int8 bundle is within the gap's tolerance and passes; under a tolerance nothing meets it reports
    OVER and still passes, and fails with fail_on_gap (the CLI's --fail-on-gap: exit 1)."""
    from fastv_export.bundle import load_bundle
    from fastv_export.quantize import gap
    from fastv_export.validate import format_report, validate_bundle

    path = _bundle(tmp_path_factory, "tiny-llava-shapes", "int8")
    kwargs = dict(max_new_tokens=2, batch_sizes=(1,))
    report = validate_bundle(load_bundle(path), report_dir=tmp_path_factory.mktemp("v"), **kwargs)
    assert report["passed"] and report["quantization"]["gap_over_tolerance"] == []
    assert "within it" in format_report(report)
    monkeypatch.setattr(gap, "GAP_TOLERANCE", {"prefill_top1_agreement": 1.5, "selection_agreement": 0.0})
    report = validate_bundle(load_bundle(path), report_dir=tmp_path_factory.mktemp("v"), **kwargs)
    assert report["passed"] and report["quantization"]["gap_over_tolerance"] == [
        "batch 1: prefill_top1_agreement 100.0% < 150%"]
    assert "OVER it: batch 1" in format_report(report)
    report = validate_bundle(load_bundle(path), report_dir=tmp_path_factory.mktemp("v"), fail_on_gap=True, **kwargs)
    assert not report["passed"]
    rc, _ = run_cli(capsys, ["validate", str(copy_bundle(path, tmp_path_factory.mktemp("c"))), "--max-new-tokens",
                             "2", "--batch-sizes", "1", "--fail-on-gap"])
    assert rc == 1
