"""INT4 AWQ (export --quantize int4-awq): ModelOpt's search on the trained demo preset, the folding of its scales
(checked against ModelOpt's own fake-quantized model), its error against min-max int4 (both computed here in
PyTorch), export + validate in ONNX Runtime, the manifest's calibration record and the calibration sets'
one-line refusals."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastv_export.errors import FastVError
from tests.helpers import once_per_run, run_cli, shared_dir

DEMO = "tiny-llava-shapes"
CALIBRATION = 32


@pytest.fixture(scope="module")
def one_thread():
    """ModelOpt's search runs many small matmuls: one thread each is faster than two fighting over a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def searched(one_thread):
    """(fp32 demo model, its adapter, ModelOpt's INT4 AWQ (awq_full) fake-quantized copy)."""
    pytest.importorskip("modelopt.torch.quantization")
    from fastv_export.adapters import get_adapter
    from fastv_export.presets import load_model
    from fastv_export.quantize import awq
    from fastv_export.quantize.calibration import load_calibration

    model = load_model(DEMO, attn_implementation="eager")
    adapter = get_adapter(model)
    cal = load_calibration("demo", adapter, CALIBRATION, model=DEMO)
    return model, adapter, awq.search(model, adapter, cal.items)


def _held_out(n: int = 60) -> list[dict]:
    """Calibration-like inputs the search never saw: the demo task's TEST split, prompt + answer."""
    from fastv_export.presets import shapes

    return [{"input_ids": torch.tensor([s.prompt + s.answer]), "pixel_values": torch.from_numpy(s.pixels[None])}
            for s in shapes.split("test", n)]


def _logits(model, inputs: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**x, attention_mask=torch.ones_like(x["input_ids"])).logits[0] for x in inputs])


def _min_max_int4(model, adapter) -> None:
    """Min-max int4 of every decoder Linear (in place), written here from its definition: blocks of 128 inputs,
    scale 2 absmax / 15, round to nearest, clamp to [-8, 7] (what ONNX Runtime's quantizer does for int4)."""
    with torch.no_grad():
        for layer in adapter.layers():
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    o, i = m.weight.shape
                    b = min(128, i)
                    w = m.weight.reshape(o, i // b, b)
                    s = 2 * w.abs().amax(-1, keepdim=True) / 15
                    m.weight.copy_((torch.clamp(torch.round(w / s), -8, 7) * s).reshape(o, i))


# --------------------------------------------------------------------------------------------- the folding
@pytest.mark.slow
def test_folded_model_equals_modelopt_fake_quant(searched):
    """The exported form (scales folded into RMSNorm / v_proj / up_proj, or a Mul; integers x amax / 7) computes
    what ModelOpt's fake-quantized model (input scale applied by its quantizer) computes."""
    from fastv_export.adapters import get_adapter
    from fastv_export.presets import load_model
    from fastv_export.quantize import awq

    model, adapter, qmodel = searched
    inputs = _held_out(8)
    expected = _logits(qmodel, inputs)
    work = copy.deepcopy(qmodel)
    layer0 = get_adapter(qmodel).layers()[0]
    down_scale = layer0.mlp.down_proj.input_quantizer.pre_quant_scale.detach().clone()
    up_weight = layer0.mlp.up_proj.weight.detach().clone()
    result = awq.fold(work, get_adapter(work))
    n = len(adapter.layers())
    # down_proj's scale goes into up_proj's rows; the demo's attention is grouped (4 heads, 2 KV heads), so
    # o_proj's cannot go into v_proj: a Mul
    fold = result.folding()
    assert fold["linears"] == n and fold["mul"] >= n
    lins = result.linears
    assert all(lins[k].pre_scale is not None for k in lins if k.endswith("o_proj.weight"))
    assert all(lins[k].pre_scale is None for k in lins if k.endswith("down_proj.weight"))
    up = "model.language_model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(lins[up].folded_weight, up_weight * down_scale[:, None])
    assert lins[up].row_scale is not None and result.norms.keys() <= set(dict(model.named_parameters()))
    folded = load_model(DEMO, attn_implementation="eager")
    handles = awq.apply_quantized(folded, result)
    assert len(handles) == fold["mul"]
    got = _logits(folded, inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # and quantization did change the model (the check above is not float against float)
    assert (_logits(model, inputs) - expected).abs().max() > 1e-2


@pytest.mark.slow
def test_equal_shared_scales_fold_into_the_norms(searched):
    """When q/k/v (and gate/up) carry one input scale (here made so by ModelOpt's own averaging step), it goes into
    the RMSNorm weight before them, no Mul is left for them, and the folded model still computes ModelOpt's."""
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    from fastv_export.adapters import get_adapter
    from fastv_export.presets import load_model
    from fastv_export.quantize import awq

    model, adapter, qmodel = searched
    work = copy.deepcopy(qmodel)
    with torch.no_grad():
        for layer in get_adapter(work).layers():
            preprocess_linear_fusion([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                                     resmooth_only=True)
            preprocess_linear_fusion([layer.mlp.gate_proj, layer.mlp.up_proj], resmooth_only=True)
    inputs = _held_out(6)
    expected = _logits(work, inputs)
    shared = get_adapter(work).layers()[0].self_attn.q_proj.input_quantizer.pre_quant_scale.detach().clone()
    result = awq.fold(work, get_adapter(work))
    n = len(adapter.layers())
    assert result.folding() == {"norms": 2 * n, "linears": n, "mul": n}       # only o_proj keeps its Mul
    norm = "model.language_model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(result.norms[norm], dict(model.named_parameters())[norm] * shared)
    folded = load_model(DEMO, attn_implementation="eager")
    awq.apply_quantized(folded, result)
    torch.testing.assert_close(_logits(folded, inputs), expected, atol=1e-4, rtol=1e-4)


def test_integers_are_on_modelopt_grid():
    """AwqLinear.integers: scale amax / 7 per block, q in [-8, 7], and q x scale within half a step of W."""
    from fastv_export.quantize.awq import AwqLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g)
    amax = w.reshape(6, 2, 128).abs().amax(-1)
    lin = AwqLinear(w, amax)
    q, scale = lin.integers()
    assert lin.block_size == 128 and q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    torch.testing.assert_close(scale, amax / 7)
    step = scale.repeat_interleave(128, dim=1)
    assert ((lin.dequantized() - w).abs() <= step / 2 + 1e-6).all()
    assert (q.abs() == 7).sum() >= 12                          # each block's absmax lands on +-7


# ----------------------------------------------------------------------------------- AWQ against min-max
@pytest.mark.slow
def test_awq_has_lower_error_than_min_max(searched):
    """On held-out calibration-like inputs, int4 AWQ's logits are closer to the fp32 model's than min-max int4's
    (both models computed here in PyTorch)."""
    from fastv_export.adapters import get_adapter
    from fastv_export.presets import load_model

    model, _, qmodel = searched
    inputs = _held_out()
    reference = _logits(model, inputs)
    plain = load_model(DEMO, attn_implementation="eager")
    _min_max_int4(plain, get_adapter(plain))
    awq_err = (_logits(qmodel, inputs) - reference).abs().mean().item()
    min_max_err = (_logits(plain, inputs) - reference).abs().mean().item()
    print(f"held-out mean |logit error| vs fp32: AWQ {awq_err:.4f}, min-max {min_max_err:.4f}")
    assert 0 < awq_err < min_max_err, (awq_err, min_max_err)


# ------------------------------------------------------------------------------------------ whole bundle
def _awq_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("modelopt.torch.quantization")
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle

    root = shared_dir(tmp_path_factory) / "quantized"
    return once_per_run(root / f"{DEMO}-int4-awq", lambda tmp: export_bundle(
        tmp, FastVConfig(k=2, ratio="1/2"), ExportOptions(model=DEMO, quantize="int4-awq", calibration="demo",
                                                         calibration_size=CALIBRATION)))


@pytest.mark.slow
def test_int4_awq_bundle_validates_in_onnxruntime(tmp_path_factory, one_thread):
    """export --quantize int4-awq of the demo preset: the manifest records the calibration; the graphs hold int4
    DequantizeLinear, the folded norms and the Muls; validate PASSES at fp32 tolerances against the reference."""
    import onnx

    from fastv_export.bundle import load_bundle
    from fastv_export.validate import validate_bundle

    path = _awq_bundle(tmp_path_factory)
    bundle = load_bundle(path)                                       # the schema accepts the section
    q = bundle.quantization
    n = bundle.num_layers
    assert (q["scheme"], q["algorithm"], q["bits"], q["block_size"]) == ("int4-awq", "awq-full", 4, 128)
    assert q["calibration"] == {"kind": "demo", "count": CALIBRATION,
                                "source": f"{DEMO} train split (samples 0-{CALIBRATION - 1})"}
    assert q["folding"]["linears"] == n and q["folding"]["mul"] >= n and q["weights"] == 7 * n
    assert "modelopt" in q["tool"] and q["weight_bytes"]["quantized"] <= 0.3 * q["weight_bytes"]["float"]
    ops = {"DequantizeLinear": 0, "Mul": 0, "folded": 0}
    for g in ("pre_k", "post_k"):
        graph = onnx.load(str(path / f"{g}.onnx")).graph
        ops["DequantizeLinear"] += sum(1 for x in graph.node if x.op_type == "DequantizeLinear")
        ops["Mul"] += sum(1 for x in graph.node if x.op_type == "Mul" and x.name.endswith(".AWQ_PRE_SCALE_Mul"))
        ops["folded"] += sum(1 for i in graph.initializer if i.name.endswith(".AWQ_FOLDED"))
        assert all(i.data_type == onnx.TensorProto.INT4 for i in graph.initializer if i.name.endswith("_DQ_Q4"))
    assert ops == {"DequantizeLinear": 7 * n, "Mul": q["folding"]["mul"], "folded": q["folding"]["norms"]}
    report = validate_bundle(bundle, max_new_tokens=8, batch_sizes=(1, 3), report_dir=tmp_path_factory.mktemp("v"))
    assert report["passed"], [c["failure"] for c in report["cases"]]
    assert report["tolerances"]["logits"] == 1e-4 and report["quantization"]["scheme"] == "int4-awq"
    assert all(c["max_logits_error"] < 1e-3 for c in report["cases"])
    gaps = report["quantization"]["gap_to_unquantized"]
    assert all(0 < g["prefill_logits_error"] < g["prefill_logits_max"] for g in gaps)


@pytest.mark.slow
def test_int4_awq_bundle_builds_with_tensorrt_rtx(tmp_path_factory, one_thread):
    """TensorRT-RTX builds the int4-awq bundle ahead of time for SM86 (TokenSelect as its function body): int4
    DequantizeLinear layers, the Muls as elementwise layers; SM75 refused in one line."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from fastv_export.bundle import load_bundle
    from fastv_export.commands.build import build_with_progress
    from fastv_export.engines.build import BuildOptions
    from fastv_export.engines.trt_rtx import parse_onnx
    from tests.helpers import copy_bundle

    path = copy_bundle(_awq_bundle(tmp_path_factory), tmp_path_factory.mktemp("trt"))
    built = build_with_progress(load_bundle(path), BuildOptions(compute_capabilities=("SM86",), use_plugin=False))
    assert all(built.engines.engines[g].bytes > 0 for g in ("pre_k", "post_k"))
    layers = parse_onnx(path / "post_k.onnx").layer_types
    assert layers.count("DEQUANTIZE") == 7 * (load_bundle(path).num_layers - 2)
    with pytest.raises(FastVError, match="SM80"):
        build_with_progress(load_bundle(path), BuildOptions(compute_capabilities=("SM75",), use_plugin=False))


# ------------------------------------------------------------------------------ bad calibration, one line
@pytest.fixture(scope="module")
def demo_adapter():
    from fastv_export.adapters import get_adapter
    from fastv_export.presets import load_model

    return get_adapter(load_model(DEMO))


def _one_line(exc_info, *words: str) -> None:
    text = str(exc_info.value)
    assert "\n" not in text and all(w in text for w in words), text


def _folder(tmp_path: Path, lines: list[str], image: bytes | None = None) -> Path:
    from PIL import Image

    folder = tmp_path / "cal"
    folder.mkdir()
    Image.new("RGB", (56, 56), (200, 20, 20)).save(folder / "red.png")
    if image is not None:
        (folder / "bad.png").write_bytes(image)
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_empty_calibration_sets(tmp_path, demo_adapter):
    from fastv_export.quantize.calibration import load_calibration

    with pytest.raises(FastVError) as e:
        load_calibration("demo", demo_adapter, 0, model=DEMO)
    _one_line(e, "empty", "--calibration-size 0")
    with pytest.raises(FastVError) as e:
        load_calibration(str(_folder(tmp_path, ["", "  "])), demo_adapter, 8, model=DEMO)
    _one_line(e, "prompts.jsonl", "no prompts")


def test_unreadable_image_and_malformed_line(tmp_path, demo_adapter):
    from fastv_export.quantize.calibration import load_calibration

    folder = _folder(tmp_path, ['{"image": "bad.png", "prompt": "USER: <image> what? ASSISTANT:"}'],
                     image=b"not a png")
    with pytest.raises(FastVError) as e:
        load_calibration(str(folder), demo_adapter, 8, model=DEMO)
    _one_line(e, "prompts.jsonl:1", "cannot read image", "bad.png")
    (folder / "prompts.jsonl").write_text('\n{"image": "red.png", "prompt": \n{"image": "red.png"}\n')
    with pytest.raises(FastVError) as e:
        load_calibration(str(folder), demo_adapter, 8, model=DEMO)
    _one_line(e, "prompts.jsonl:2", "not valid JSON")


def test_calibration_source_refusals(tmp_path, demo_adapter):
    from fastv_export.quantize.calibration import load_calibration

    with pytest.raises(FastVError) as e:
        load_calibration(str(tmp_path / "missing"), demo_adapter, 8, model=DEMO)
    _one_line(e, "neither 'demo', 'synthetic' nor a folder")
    with pytest.raises(FastVError) as e:
        load_calibration("demo", demo_adapter, 8, model="tiny-llava")
    _one_line(e, "--calibration demo", "tiny-llava-shapes")


def test_calibration_sets_are_model_inputs(demo_adapter):
    """demo: the TRAIN split (the test split stays held out), prompt + answer; synthetic: the preset's prompts;
    both run through the model as they are."""
    from fastv_export.presets import shapes
    from fastv_export.quantize.calibration import load_calibration

    cal = load_calibration(None, demo_adapter, 3, model=DEMO)
    first = shapes.split("train", 1)[0]
    assert cal.to_manifest()["kind"] == "demo" and cal.to_manifest()["count"] == 3
    assert cal.items[0].input_ids[0].tolist() == first.prompt + first.answer
    np.testing.assert_array_equal(cal.items[0].vision["pixel_values"][0].numpy(), first.pixels)
    syn = load_calibration("synthetic", demo_adapter, 2, model=DEMO)
    assert syn.kind == "synthetic" and len(syn.items) == 2
    with torch.no_grad():
        for item in cal.items[:1] + syn.items[:1]:
            assert torch.isfinite(demo_adapter.model(**item.model_inputs()).logits).all()


def test_cli_calibration_without_awq_is_one_line(capsys, tmp_path):
    rc, err = run_cli(capsys, ["export", "--model", DEMO, "--quantize", "int4", "--calibration", "demo",
                               "--out", str(tmp_path / "b")])
    assert rc == 2 and "--calibration is for a calibrated scheme" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_schema_records_the_calibration():
    """The schema's quantization section: int4-awq, its algorithm, the calibration kinds and the folding."""
    from fastv_export.bundle.verify import manifest_schema
    from fastv_export.quantize import SCHEMES

    props = manifest_schema()["properties"]["quantization"]["properties"]
    assert "int4-awq" in props["scheme"]["enum"] and SCHEMES["int4-awq"].algorithm in props["algorithm"]["enum"]
    assert set(props["calibration"]["properties"]["kind"]["enum"]) == {"none", "demo", "synthetic", "folder"}
    assert props["folding"]["required"] == ["norms", "linears", "mul"]
    json.dumps(props)
