"""Weight-only quantization of the exported decoder graphs with ONNX Runtime's quantization tools.

Each decoder-layer MatMul whose weight is a constant (a Linear of ``adapter.layers()``, found by its exact values)
gets ``DequantizeLinear(weight_q, scale) -> MatMul``, standard ONNX that ONNX Runtime (CPU) and TensorRT(-RTX)
run, with ONNX Runtime's quantization parameters and quantizer (``quant_utils``): int4 in blocks of 128 rows of
the reduction axis (opset 21 block-wise DequantizeLinear), int8 per output channel (opset 13 DequantizeLinear with
an axis). Both symmetric: zero point 0 (not written) and positive scales, as TensorRT's ONNX parser requires.
The quantized weight is named ``<torch parameter name>.T_DQ_Q<bits>`` so that the PyTorch reference finds which
parameter it replaces (fastv_export/quantize/reference.py). lm_head (post_k.onnx) and the vision tower's and
projector's Linears (vision.onnx) are quantized the same way when ``--quantize-parts`` names them; the embeddings
stay as exported.
"""
from __future__ import annotations

import hashlib
import math
import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from fastv_export.errors import FastVError
from fastv_export.quantize.schemes import Scheme

log = logging.getLogger(__name__)

#: a quantized weight's initializer name: the torch parameter it came from, transposed (MatMul's [in, out])
QUANT_NAME = re.compile(r"^(?P<param>.+)\.T_DQ_Q(?P<bits>\d+)$")


@dataclass
class GraphQuantization:
    """What quantizing one graph did: the parameters replaced, their bytes before (float) and after (integer
    weights + scales)."""
    params: list[str]
    float_bytes: int
    quantized_bytes: int


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def decoder_linear_weights(adapter) -> dict[str, str]:
    """sha256 of each decoder-layer Linear weight as the exported MatMul holds it ([in, out], i.e. transposed)
    -> the torch parameter name in ``adapter.model``."""
    import torch

    names = {id(p): n for n, p in adapter.model.named_parameters()}
    out = {}
    for layer in adapter.layers():
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.detach()
                out[_digest(w.t().contiguous().cpu().numpy())] = names[id(module.weight)]
    return out


def _module_weight_name(model, module) -> str:
    """``<module path>.weight`` of ``module`` in ``model``: the module's own name, also when its weight is shared
    (tied lm_head and token embedding: named_parameters would name the embedding)."""
    return next(f"{n}.weight" for n, m in model.named_modules() if m is module)


def lm_head_weights(adapter) -> dict[str, str]:
    """sha256 of lm_head's weight as post_k's last MatMul holds it ([in, out]) -> ``<lm_head path>.weight``."""
    head = adapter.lm_head()
    return {_digest(head.weight.detach().t().contiguous().cpu().numpy()): _module_weight_name(adapter.model, head)}


def vision_linear_weights(adapter) -> dict[str, str]:
    """sha256 of each Linear weight of the vision path ([in, out]) -> its torch parameter name: every Linear of
    the model outside the language model and lm_head (the vision tower and the projector)."""
    import torch

    text = {id(m) for m in adapter.text_model().modules()} | {id(adapter.lm_head())}
    out = {}
    for name, module in adapter.model.named_modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in text:
            out[_digest(module.weight.detach().t().contiguous().cpu().numpy())] = f"{name}.weight"
    return out


def _gemm_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _untranspose_gemm_weights(model: onnx.ModelProto, weights: dict[str, str]) -> int:
    """``Gemm(x, W, b, transB=1)`` with a Linear's [out, in] weight of ``weights`` (a graph traced with TorchScript
    or a 2-D Linear input, e.g. Qwen2-VL's vision tower) rewritten exactly as ``Gemm(x, W^T, b)``, so that the weight
    is [in, out] as a MatMul holds it; returns how many."""
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    done = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = _gemm_attrs(node)
        if attrs.get("transA", 0) or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or users[node.input[1]] != 1:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        w = numpy_helper.to_array(init).T.copy()
        if _digest(w) not in weights:
            continue
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        for a in node.attribute:
            if a.name == "transB":
                a.i = 0
        done += 1
    return done


def _targets(model: onnx.ModelProto, weights: dict[str, str]) -> dict[str, tuple[onnx.NodeProto, str]]:
    """Initializer name -> (its MatMul, the torch parameter) for every MatMul (or Gemm without transposes and with
    alpha 1) whose [in, out] weight is one of ``weights``."""
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    found = {}
    for node in model.graph.node:
        gemm = node.op_type == "Gemm" and len(node.input) >= 2 and not _gemm_attrs(node).get("transA", 0) \
            and not _gemm_attrs(node).get("transB", 0) and _gemm_attrs(node).get("alpha", 1.0) == 1.0
        if not (gemm or (node.op_type == "MatMul" and len(node.input) == 2)) or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        param = weights.get(_digest(numpy_helper.to_array(init)))
        if param is not None and users[init.name] == 1:
            found[init.name] = (node, param)
    return found


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    for init in model.graph.initializer:
        if init.name == old:
            init.name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes


#: ops whose meaning (not only their accepted types) changed between opset 18 and 21: refused by the opset raise
CHANGED_BY_OPSET_21 = {"GroupNormalization"}


def _raise_opset(model: onnx.ModelProto, version: int) -> None:
    """Import the default domain at ``version`` in the model and its local functions (TokenSelect's body): the
    changes from 18 to 21 to the ops these graphs use only add element types (int4, float8), so the meaning stays."""
    used = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    if used & CHANGED_BY_OPSET_21:
        raise FastVError(f"cannot raise the graph to opset {version}: it uses {sorted(used & CHANGED_BY_OPSET_21)}")
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for o in imports:
            if o.domain in ("", "ai.onnx") and o.version < version:
                o.version = version
    model.ir_version = max(model.ir_version, 10)


def _quantize_weights(model: onnx.ModelProto, targets: list[str], scheme: Scheme) -> onnx.ModelProto:
    """Replace each weight of ``targets`` ([in, out]) by ``DequantizeLinear(q, scale)``: ONNX Runtime's blocked
    min-max parameters (``compute_scale_zp_blocked``, symmetric: zero point 0, positive scales as TensorRT requires)
    and quantizer (``quantize_nparray``), over blocks of ``scheme.block_size`` rows, or all rows (per channel)."""
    try:
        from onnxruntime.quantization.quant_utils import compute_scale_zp_blocked, pack_bytes_to_4bit, quantize_nparray
    except ImportError as e:              # older ONNX Runtime releases lack the blocked helpers (1.31 has them)
        import onnxruntime
        raise FastVError(f"--quantize needs ONNX Runtime's blocked quantization helpers, which onnxruntime "
                         f"{onnxruntime.__version__} lacks ({e}); pip install -U 'onnxruntime<1.32'") from e

    qtype = getattr(onnx.TensorProto, scheme.onnx_dtype)
    if scheme.min_opset > 18:
        _raise_opset(model, scheme.min_opset)
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for name in targets:
        init = inits[name]
        w = numpy_helper.to_array(init)
        rows, cols = w.shape
        block = min(scheme.block_size, rows) if scheme.block_size else rows   # a short weight: one block
        zero, scale = compute_scale_zp_blocked(w, qtype, axis=0, block_size=block, symmetric=True)
        if np.any(zero != 0) or np.any(scale <= 0):
            raise FastVError(f"symmetric quantization of {name} gave a zero point or a scale <= 0: a bug")
        blocks = scale.shape[0]
        padded = np.zeros((blocks * block, cols), w.dtype)
        padded[:rows] = w
        q = quantize_nparray(qtype, padded.reshape(blocks, block, cols), scale[:, None, :], zero[:, None, :])
        q = np.asarray(q).reshape(blocks * block, cols)[:rows]
        qname, sname = f"{name}_DQ_Q{scheme.bits}", f"{name}_DQ_scales"
        if scheme.bits == 4:
            tensor = onnx.helper.make_tensor(qname, qtype, [rows, cols],
                                             bytes(pack_bytes_to_4bit(q.astype(np.int8).tobytes())), raw=True)
            attrs = {"axis": 0, "block_size": block}
        else:
            tensor = numpy_helper.from_array(q.astype(np.int8), qname)
            scale = scale.reshape(cols)                                   # per output channel: opset 13 form
            attrs = {"axis": 1}
        new_nodes.append(_dequantized(model, init, tensor, numpy_helper.from_array(scale.astype(w.dtype), sname),
                                      attrs))
    return _with_first(model, new_nodes)


def _dequantized(model: onnx.ModelProto, init: onnx.TensorProto, q: onnx.TensorProto, scale: onnx.TensorProto,
                 attrs: dict) -> onnx.NodeProto:
    """The weight ``init`` replaced by ``q`` and ``scale``: returns ``DequantizeLinear(q, scale, **attrs)``, whose
    output ``<weight>_DQ`` every node that read the weight now reads."""
    name = init.name
    model.graph.initializer.remove(init)
    model.graph.initializer.extend([q, scale])
    for node in model.graph.node:
        for i, n in enumerate(node.input):
            if n == name:
                node.input[i] = f"{name}_DQ"
    return onnx.helper.make_node("DequantizeLinear", [q.name, scale.name], [f"{name}_DQ"], name=f"{name}_DQ",
                                 **attrs)


def _with_first(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """``nodes`` (constants' DequantizeLinear) put before the graph's nodes: the graph stays topologically sorted."""
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + rest)
    return model


#: the fp8 scheme's weight type and its largest finite value
FP8_DTYPE, FP8_MAX = "FLOAT8E4M3FN", 448.0


def fp8_weight(w: np.ndarray, qname: str) -> tuple[onnx.TensorProto, np.ndarray]:
    """A [in, out] float weight as float8 e4m3fn with one scale per output channel (absmax / 448, so nothing
    saturates; an all-zero channel gets scale 1), rounded to nearest even by ONNX Runtime's quantizer
    (``quantize_nparray``, which runs ONNX's QuantizeLinear); returns the weight tensor and the scales [out]."""
    from onnxruntime.quantization.quant_utils import quantize_nparray

    absmax = np.abs(w).max(axis=0)
    scale = np.where(absmax > 0, absmax / FP8_MAX, 1.0).astype(w.dtype)
    q = quantize_nparray(onnx.TensorProto.FLOAT8E4M3FN, w, scale, 0)
    return numpy_helper.from_array(np.asarray(q), qname), scale


def _quantize_weights_fp8(model: onnx.ModelProto, targets: list[str], scheme: Scheme) -> onnx.ModelProto:
    """Replace each weight of ``targets`` ([in, out]) by ``DequantizeLinear(q_fp8, scale, axis=1)`` (opset 19:
    float8 inputs), per output channel, no zero point (docs/design.md §10)."""
    _raise_opset(model, scheme.min_opset)
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for name in targets:
        init = inits[name]
        w = numpy_helper.to_array(init)
        qname, sname = f"{name}_DQ_Q{scheme.bits}", f"{name}_DQ_scales"
        tensor, scale = fp8_weight(w, qname)
        new_nodes.append(_dequantized(model, init, tensor, numpy_helper.from_array(scale, sname), {"axis": 1}))
    return _with_first(model, new_nodes)


def quantize_graph(model: onnx.ModelProto, weights: dict[str, str], scheme: Scheme) -> tuple[onnx.ModelProto,
                                                                                             GraphQuantization]:
    """Quantize the decoder-layer MatMul weights of ``model`` (``weights``: :func:`decoder_linear_weights`) with
    ``scheme``; returns the new model and what was quantized."""
    if any(n.op_type == "Gemm" for n in model.graph.node):
        _untranspose_gemm_weights(model, weights)
    found = _targets(model, weights)
    renamed = []
    for old, (node, param) in found.items():
        _rename(model, old, f"{param}.T")
        renamed.append(f"{param}.T")
    float_bytes = sum(_tensor_bytes(i) for i in model.graph.initializer if i.name in set(renamed))
    if renamed:
        rewrite = _quantize_weights_fp8 if scheme.onnx_dtype == FP8_DTYPE else _quantize_weights
        model = rewrite(model, renamed, scheme)
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if renamed and default.version < scheme.min_opset:
        raise FastVError(f"the quantized graph needs opset {scheme.min_opset}, it has {default.version}: a bug")
    left = {i.name for i in model.graph.initializer} & set(renamed)
    if left:
        raise FastVError(f"{len(left)} weights were not quantized (e.g. {sorted(left)[0]}): a bug, please report")
    quantized = [i for i in model.graph.initializer if any(i.name.startswith(r + "_DQ_") for r in renamed)]
    q_bytes = sum(_tensor_bytes(i) for i in quantized)
    return model, GraphQuantization([r[:-2] for r in renamed], float_bytes, q_bytes)


# ------------------------------------------------------------------------------- given integers (int4-awq)
#: a folded float weight the reference must take from the graph (an RMSNorm's, with AWQ scales folded in)
FOLDED_NAME = re.compile(r"^(?P<param>.+)\.AWQ_FOLDED$")
#: the input scale of a Mul before a quantized MatMul: ``<the Linear's weight parameter>.AWQ_PRE_SCALE``
PRE_SCALE_NAME = re.compile(r"^(?P<param>.+)\.AWQ_PRE_SCALE$")


@dataclass
class GivenWeight:
    """One Linear's integers as computed elsewhere (AWQ): ``q`` [in, out] int8 in [-8, 7], ``scale``
    [blocks, out] float32 over blocks of ``block`` rows, and an optional input multiplier ``pre_scale`` [in]."""
    q: np.ndarray
    scale: np.ndarray
    block: int
    pre_scale: np.ndarray | None = None


def quantize_graph_given(model: onnx.ModelProto, weights: dict[str, str], given: dict[str, GivenWeight],
                         folded: dict[str, str]) -> tuple[onnx.ModelProto, GraphQuantization, int, int]:
    """Write the decoder MatMul weights of ``model`` as int4 ``DequantizeLinear(q, scale)`` with the integers and
    scales of ``given`` (torch parameter -> :class:`GivenWeight`), a ``Mul`` by ``pre_scale`` before the MatMul
    where one is given, and name the folded float weights (``folded``: sha256 -> torch parameter) ``<param>
    .AWQ_FOLDED`` so that the reference finds them. Returns the model, what was quantized, the folded weights
    named and the Muls inserted."""
    found = _targets(model, weights)
    inits = {i.name: i for i in model.graph.initializer}
    _raise_opset(model, 21)
    new_nodes, float_bytes, q_bytes, params = [], 0, 0, []
    for old, (node, param) in found.items():
        if param not in given:
            raise FastVError(f"no AWQ integers for {param}: a bug, please report")
        g, init = given[param], inits[old]
        rows, cols = init.dims
        if g.q.shape != (rows, cols) or g.scale.shape != (math.ceil(rows / g.block), cols):
            raise FastVError(f"the AWQ integers of {param} do not fit its MatMul [{rows}, {cols}]: a bug")
        float_bytes += _tensor_bytes(init)
        base = f"{param}.T"
        qname, sname = f"{base}_DQ_Q4", f"{base}_DQ_scales"
        tensors = [onnx.helper.make_tensor(qname, onnx.TensorProto.INT4, [rows, cols],
                                           bytes(_pack_int4(g.q)), raw=True),
                   numpy_helper.from_array(np.ascontiguousarray(g.scale, np.float32), sname)]
        model.graph.initializer.remove(init)
        model.graph.initializer.extend(tensors)
        q_bytes += sum(_tensor_bytes(t) for t in tensors)
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [qname, sname], [f"{base}_DQ"],
                                               name=f"{base}_DQ", axis=0, block_size=g.block))
        node.input[1] = f"{base}_DQ"
        if g.pre_scale is not None:
            pname = f"{param}.AWQ_PRE_SCALE"
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(g.pre_scale, np.float32), pname))
            q_bytes += _tensor_bytes(model.graph.initializer[-1])       # the input scale counts with the weight
            model.graph.node.append(onnx.helper.make_node("Mul", [node.input[0], pname], [f"{pname}_out"],
                                                          name=f"{pname}_Mul"))
            node.input[0] = f"{pname}_out"
        params.append(param)
    muls = [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith(".AWQ_PRE_SCALE_Mul")]
    named = 0
    for init in list(model.graph.initializer):
        param = folded.get(_digest(numpy_helper.to_array(init))) if len(init.dims) == 1 else None
        if param is not None:
            _rename(model, init.name, f"{param}.AWQ_FOLDED")
            named += 1
    nodes = [n for n in model.graph.node if n not in muls]
    del model.graph.node[:]
    order = []
    for n in nodes:                              # each Mul just before its MatMul: the graph stays sorted
        order.extend(m for m in muls if m.output[0] in n.input)
        order.append(n)
    model.graph.node.extend(new_nodes + order)
    return model, GraphQuantization(params, float_bytes, q_bytes), named, len(muls)


def _pack_int4(q: np.ndarray) -> bytes:
    """Signed 4-bit values, two per byte, low nibble first (ONNX's INT4 layout)."""
    flat = np.ascontiguousarray(q, np.int8).reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
