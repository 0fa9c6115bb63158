"""export --quantize-parts: lm_head and the vision tower quantized beside the decoder layers (docs/design.md §10):
the graphs' dequantized weights against the Hugging Face weights, validate against the quantized reference at
fp32's tolerances, the manifest record, a tied lm_head in the reference, an ahead-of-time TensorRT-RTX build and
the one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fastv_export.errors import FastVError
from fastv_export.quantize import PARTS, SCHEMES, parse_parts
from tests.helpers import once_per_run, run_cli, shared_dir

MODEL = "tiny-llava"
ALL = ("decoder", "lm_head", "vision")


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("argv,words", [
    (["--quantize", "int8", "--quantize-parts", "decoder,lmhead"], ["unknown --quantize-parts part 'lmhead'",
                                                                     "decoder, lm_head, vision"]),
    (["--quantize-parts", "decoder,vision"], ["--quantize-parts needs a scheme", "--quantize"]),
    (["--quantize", "none", "--quantize-parts", "decoder"], ["--quantize-parts needs a scheme"]),
    (["--quantize", "int4", "--quantize-parts", "lm_head,vision"], ["leaves out decoder",
                                                                    "decoder,lm_head,vision"]),
])
def test_bad_parts_are_one_line(capsys, tmp_path, argv, words):
    rc, err = run_cli(capsys, ["export", *argv, "--out", str(tmp_path / "b")])
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "b").exists()


def test_parts_parse_in_one_order():
    assert parse_parts(None, None) == ("decoder",) == parse_parts(None, "int8")
    assert parse_parts("vision, decoder,lm_head", "int4") == ALL == tuple(PARTS)
    with pytest.raises(FastVError, match="needs a scheme"):
        from fastv_export.config import FastVConfig
        from fastv_export.export import ExportOptions, export_bundle
        export_bundle("/nonexistent/b", FastVConfig(k=2), ExportOptions(quantize_parts=("decoder", "vision")))


# ------------------------------------------------------------------------------------------------- tied lm_head
class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 128)
        self.lm_head = torch.nn.Linear(128, 32, bias=False)
        self.lm_head.weight = self.embed.weight


def _head_graph(w: np.ndarray, shared: bool) -> onnx.ModelProto:
    """x [2, 128] -> MatMul(x, w [128, 32]); ``shared``: the same initializer also feeds a Gather (a tied table)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])]
    if shared:
        nodes.append(helper.make_node("Gather", ["w", "i"], ["g"], axis=0))
        outs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 32]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128]),
              helper.make_tensor_value_info("i", TensorProto.INT64, [1])][:1 + shared]
    graph = helper.make_graph(nodes, "g", inputs, outs, [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_tied_lm_head_reference_keeps_the_embedding(tmp_path):
    """The reference gives a tied lm_head its own dequantized weight; the token embedding keeps the float table."""
    from fastv_export.quantize.onnx_weights import _digest, quantize_graph
    from fastv_export.quantize.reference import apply_quantized_weights

    model = _Tied()
    table = model.embed.weight.detach().clone()
    w = table.t().contiguous().numpy()
    out, info = quantize_graph(_head_graph(w, False), {_digest(w): "lm_head.weight"}, SCHEMES["int8"])
    assert info.params == ["lm_head.weight"]
    onnx.save(out, str(tmp_path / "post_k.onnx"))
    assert apply_quantized_weights(model, tmp_path) == 1
    assert model.lm_head.weight is not model.embed.weight
    assert torch.equal(model.embed.weight, table)
    scale = table.abs().amax(dim=1, keepdim=True) / 127                    # independent: int8 per output channel
    torch.testing.assert_close(model.lm_head.weight, torch.round(table / scale) * scale, rtol=0, atol=1e-6)


def test_shared_lm_head_initializer_is_refused():
    """A post_k whose lm_head weight also feeds another node cannot quantize it alone: one line."""
    from fastv_export.quantize import _check_found
    from fastv_export.quantize.onnx_weights import _digest, quantize_graph

    w = np.random.default_rng(0).standard_normal((128, 32)).astype(np.float32)
    _, info = quantize_graph(_head_graph(w, True), {_digest(w): "lm_head.weight"}, SCHEMES["int4"])
    assert info.params == []
    with pytest.raises(FastVError) as e:
        _check_found("post_k", info.params, {_digest(w): "lm_head.weight"}, "post_k.onnx")
    assert "lm_head.weight" in str(e.value) and "drop lm_head" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("rows", [40, 200])
def test_int4_reduction_dims_off_the_block(rows):
    """Vision Linears may have a reduction dim under 128 (one block of all rows) or not divisible by 128 (a last,
    shorter block): ONNX Runtime runs the graph and each weight is within half a step of its own block's grid."""
    import onnxruntime as ort

    from fastv_export.quantize.onnx_weights import _digest, quantize_graph

    w = np.random.default_rng(rows).standard_normal((rows, 24)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((2, rows)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    out, info = quantize_graph(model, {_digest(w): "v.fc.weight"}, SCHEMES["int4"])
    assert info.params == ["v.fc.weight"]
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute}["block_size"] == min(rows, 128)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    y = ort.InferenceSession(out.SerializeToString(), so).run(None, {"x": x})[0]
    blocks = [w[i:i + 128] for i in range(0, rows, 128)]          # independent: each block's own absmax grid
    deq = np.concatenate([np.clip(np.round(b / (2 * np.abs(b).max(0) / 15)), -8, 7) * (2 * np.abs(b).max(0) / 15)
                          for b in blocks])
    half = np.concatenate([np.broadcast_to(np.abs(b).max(0) / 15, b.shape) for b in blocks])
    assert np.all(np.abs(deq - w) <= half * (1 + 1e-5))
    np.testing.assert_allclose(y, x @ deq, rtol=1e-4, atol=1e-4)


def test_gemm_linear_weights_are_quantized():
    """A vision tower traced with Linear as Gemm(x, W [out, in], b, transB=1) (Qwen2-VL's, Qwen2.5-VL's) gets the
    same [in, out] DequantizeLinear weight; ONNX Runtime computes x W_q^T + b with the independent int8 grid."""
    import onnxruntime as ort

    from fastv_export.quantize.onnx_weights import _digest, quantize_graph

    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((24, 40)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    out, info = quantize_graph(model, {_digest(w.T.copy()): "visual.fc.weight"}, SCHEMES["int8"])
    assert info.params == ["visual.fc.weight"]
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Gemm"]
    scale = np.abs(w).max(axis=1, keepdims=True) / 127                      # per output channel
    deq = np.round(w / scale) * scale
    so = ort.SessionOptions()                                   # as runtime/ort.py: float activations
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    y = ort.InferenceSession(out.SerializeToString(), so).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq.T + b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- whole bundles
def _bundle(tmp_path_factory, scheme: str) -> Path:
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle

    root = shared_dir(tmp_path_factory) / "quantized-parts"
    return once_per_run(root / f"{MODEL}-{scheme}-all", lambda tmp: export_bundle(
        tmp, FastVConfig(k=2, ratio="1/2"), ExportOptions(model=MODEL, quantize=scheme, quantize_parts=ALL)))


def _graph_weights(path: Path) -> dict[str, np.ndarray]:
    """Independently of the project's reference: parameter -> [in, out] weight dequantized from the graph's
    integers (onnx's own unpacking) and scales, for each DequantizeLinear feeding a MatMul."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    matmul_inputs = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in matmul_inputs:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        q, scale = inits[node.input[0]].astype(np.float64), inits[node.input[1]].astype(np.float64)
        if attrs.get("block_size"):                                # blocks of rows of the reduction axis
            scale = np.repeat(scale, attrs["block_size"], axis=0)[:q.shape[0]]
        else:                                                      # one scale per output channel (axis 1)
            scale = np.broadcast_to(scale.reshape(1, -1), q.shape)
        out[node.input[0].split(".T_DQ_")[0]] = (q * scale, scale)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_parts_follow_the_hf_weights_and_validate(tmp_path_factory, scheme):
    from fastv_export.bundle import load_bundle
    from fastv_export.presets import load_model
    from fastv_export.validate import validate_bundle

    path = _bundle(tmp_path_factory, scheme)
    hf = load_model(MODEL, attn_implementation="eager")
    params = dict(hf.named_parameters())
    linears = {f"{n}.weight" for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    vision = {n for n in linears if n.startswith(("model.vision_tower.", "model.multi_modal_"))}
    decoder = {n for n in linears if ".language_model.layers." in n}
    assert len(vision) == 14 and len(decoder) == 28                # 2 tower layers x 6 + 2 projector; 2 x 14
    used = {n for n in vision if ".layers.1." not in n}    # the tower's last layer is unused (feature layer -2)
    for graph, want in (("vision", used), ("post_k", {"lm_head.weight"})):
        got = _graph_weights(path / f"{graph}.onnx")
        names = set(got) - decoder
        assert names == want, (graph, sorted(names ^ want))
        for name in names:
            w = params[name].detach().double().t().numpy()
            deq, scale = got[name]
            assert np.all(np.abs(deq - w) <= scale / 2 * (1 + 1e-6) + 1e-9), name       # within half a step
            amax = np.abs(w).max(axis=0)                           # the grid is the weight's own: absmax-sized
            assert np.allclose(scale.max(axis=0), amax / (127 if scheme == "int8" else 7.5), rtol=1e-5), name
        left = [i for i in onnx.load(str(path / f"{graph}.onnx")).graph.initializer if len(i.dims) == 2
                and i.data_type == TensorProto.FLOAT]
        assert not any(numpy_helper.to_array(i).shape == params[n].t().shape and np.array_equal(
            numpy_helper.to_array(i), params[n].detach().t().numpy()) for i in left for n in linears), graph
    embed = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path / "embed.onnx")).graph.initializer}
    table = hf.get_input_embeddings().weight.detach().numpy()
    assert any(a.shape == table.shape and np.array_equal(a, table) for a in embed.values())   # embeddings float

    manifest = json.loads((path / "manifest.json").read_text())["quantization"]
    assert manifest["quantized"] == {"decoder_layers": True, "lm_head": True, "vision_tower": True,
                                     "embeddings": False}
    graphs = manifest["graphs"]
    assert {g: v["weights"] for g, v in graphs.items()} == {"pre_k": 14, "post_k": 15, "vision": 8}
    assert manifest["weights"] == 37
    for key in ("float", "quantized"):
        assert manifest["weight_bytes"][key] == sum(v["weight_bytes"][key] for v in graphs.values())
    assert graphs["vision"]["weight_bytes"]["float"] == 4 * sum(params[n].numel() for n in used)
    bundle = load_bundle(path)                                     # the schema accepts the record
    report = validate_bundle(bundle, max_new_tokens=4, batch_sizes=(1,), report_dir=tmp_path_factory.mktemp("v"))
    assert report["passed"], [c["failure"] for c in report["cases"]]
    assert report["tolerances"]["logits"] == 1e-4


@pytest.mark.slow
def test_all_parts_build_with_tensorrt_rtx(tmp_path_factory, plugin_library):
    """TensorRT-RTX builds an int4 bundle with all three parts ahead of time for SM86 (TokenSelect as the plugin):
    one int4 DEQUANTIZE layer per quantized weight in vision, pre_k and post_k."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from fastv_export.bundle import load_bundle
    from fastv_export.commands.build import build_with_progress
    from fastv_export.engines.build import BuildOptions
    from fastv_export.engines.trt_rtx import parse_onnx
    from tests.helpers import copy_bundle

    path = copy_bundle(_bundle(tmp_path_factory, "int4"), tmp_path_factory.mktemp("trt"))
    built = build_with_progress(load_bundle(path), BuildOptions(compute_capabilities=("SM86",),
                                                                plugin_library=str(plugin_library)))
    engines = built.engines.engines
    assert engines["pre_k"].plugin_layers == 1 and built.engines.token_select == "plugin"
    assert all(engines[g].bytes > 0 for g in ("vision", "pre_k", "post_k", "embed"))
    for graph, n in (("vision", 8), ("post_k", 15), ("pre_k", 14)):     # every quantized weight: one DEQUANTIZE
        assert parse_onnx(path / f"{graph}.onnx", plugin_library=plugin_library).layer_types.count("DEQUANTIZE") == n


@pytest.mark.slow
def test_tied_embeddings_checkpoint_quantizes_lm_head_alone_and_validates(tmp_path):
    """A user-style Qwen2.5-VL checkpoint with tied embeddings (as Qwen2.5-VL-3B ships): --quantize-parts
    decoder,lm_head quantizes post_k's copy of the table, embed.onnx keeps the float table (equal to the HF
    embedding), post_k's dequantized lm_head is within half a step of the same table, and validate passes."""
    import transformers

    from fastv_export.bundle import load_bundle
    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle
    from fastv_export.validate import validate_bundle
    from tests import user_checkpoints as uc

    ckpt = uc.qwen2_5_vl_checkpoint(tmp_path / "ckpt")
    config = transformers.AutoConfig.from_pretrained(ckpt, local_files_only=True)
    config.tie_word_embeddings = config.get_text_config().tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(ckpt)    # the table saved once, tied
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, local_files_only=True,
                                                                         dtype=torch.float32)
    table = hf.get_input_embeddings().weight.detach().double().numpy()
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # tied
    out = tmp_path / "b"
    export_bundle(out, FastVConfig(k=2, ratio="1/2"), ExportOptions(model=str(ckpt), quantize="int8",
                                                                   quantize_parts=("decoder", "lm_head")))
    embed_floats = [numpy_helper.to_array(i) for i in onnx.load(str(out / "embed.onnx")).graph.initializer
                    if i.data_type == TensorProto.FLOAT and tuple(i.dims) == table.shape]
    assert len(embed_floats) == 1 and np.array_equal(embed_floats[0], table.astype(np.float32))
    post = onnx.load(str(out / "post_k.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in post.graph.initializer}
    assert not any(v.dtype == np.float32 and v.shape in (table.shape, table.T.shape) for v in inits.values())
    heads = [n for n in post.graph.node if n.op_type == "DequantizeLinear" and inits[n.input[0]].shape == table.T.shape]
    assert len(heads) == 1
    q, scale = inits[heads[0].input[0]].astype(np.float64), inits[heads[0].input[1]].astype(np.float64)
    deq = q * scale.reshape(1, -1)                                  # int8 per output channel: [hidden, vocab]
    assert np.all(np.abs(deq - table.T) <= scale.reshape(1, -1) / 2 * (1 + 1e-5) + 1e-12)
    bundle = load_bundle(out)
    parts = bundle.quantization["quantized"]
    assert parts["lm_head"] is True and parts["embeddings"] is False
    report = validate_bundle(bundle, max_new_tokens=4, batch_sizes=(1,), report_dir=tmp_path / "v")
    assert report["passed"], [c["failure"] for c in report["cases"]]
