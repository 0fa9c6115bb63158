"""The quantized model's PyTorch reference: the bundle's integer weights dequantized in PyTorch.

Every ``DequantizeLinear`` of a quantized bundle whose input is a weight named ``<param>.T_DQ_Q<bits>``
(fastv_export/quantize/onnx_weights.py) gives ``W = q * scale`` (symmetric: no zero point), the scale repeated
over each block of ``block_size`` rows of the reduction axis (or taken per output channel), in float32 as
DequantizeLinear computes it; ``<param>`` of the model is set to ``W`` transposed back to Linear's [out, in].
An int4-awq bundle also holds float weights with AWQ scales folded in (``<param>.AWQ_FOLDED``, RMSNorm weights:
copied as they are) and input scales left as a ``Mul`` before a MatMul (``<weight param>.AWQ_PRE_SCALE``: the same
product as a forward pre-hook of that Linear).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fastv_export.errors import FastVError
from fastv_export.quantize.onnx_weights import FOLDED_NAME, PRE_SCALE_NAME, QUANT_NAME

log = logging.getLogger(__name__)

QUANTIZED_GRAPHS = ("pre_k", "post_k")


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int, block_size: int) -> torch.Tensor:
    """DequantizeLinear of a 2-D weight without zero point, in torch: per-axis (``block_size`` 0; ``scale`` has
    one value per index of ``axis``) or block-wise (``scale`` has ceil(rows / block) entries along ``axis``)."""
    qt = torch.from_numpy(np.asarray(q).astype(np.float32))          # integers or float8: exact
    st = torch.from_numpy(np.array(scale, dtype=np.float32))
    if block_size:
        st = st.repeat_interleave(block_size, dim=axis).narrow(axis, 0, qt.shape[axis])
    else:
        st = st.reshape([-1 if d == axis else 1 for d in range(qt.dim())])
    return qt * st


def dequantized_weights(bundle_dir: str | Path, files: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """torch parameter name -> its dequantized weight ([out, in]) for every quantized weight of the bundle's
    decoder graphs (``files``: graph name -> file, default pre_k.onnx / post_k.onnx)."""
    files = files or {g: f"{g}.onnx" for g in QUANTIZED_GRAPHS}
    out: dict[str, torch.Tensor] = {}
    for graph in QUANTIZED_GRAPHS:
        model = onnx.load(str(Path(bundle_dir) / files[graph]))
        inits = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                continue
            match = QUANT_NAME.match(node.input[0])
            if match is None:
                continue
            if len(node.input) > 2 and node.input[2]:
                raise FastVError(f"{files[graph]}: {node.input[0]} has a zero point; quantized bundles are symmetric")
            q = numpy_helper.to_array(inits[node.input[0]])
            scale = numpy_helper.to_array(inits[node.input[1]])
            w = dequantize(q, scale, _attr(node, "axis", 1), _attr(node, "block_size", 0))
            out[match["param"]] = w.t().contiguous()
        for name, init in inits.items():
            folded = FOLDED_NAME.match(name)
            if folded is not None:
                out[folded["param"]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    return out


def pre_scales(bundle_dir: str | Path, files: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Linear weight parameter name -> the input scale of the Mul before its MatMul (int4-awq bundles)."""
    files = files or {g: f"{g}.onnx" for g in QUANTIZED_GRAPHS}
    out: dict[str, torch.Tensor] = {}
    for graph in QUANTIZED_GRAPHS:
        for init in onnx.load(str(Path(bundle_dir) / files[graph])).graph.initializer:
            match = PRE_SCALE_NAME.match(init.name)
            if match is not None:
                out[match["param"]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    return out


def apply_quantized_weights(model: torch.nn.Module, bundle_dir: str | Path, files: dict[str, str] | None = None) -> int:
    """Replace ``model``'s parameters by the bundle's dequantized (and folded) weights and put its input scales
    before their Linears (in place); returns how many parameters were replaced."""
    from fastv_export.quantize.awq import install_pre_scales

    weights = dequantized_weights(bundle_dir, files)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            if name not in params or params[name].shape != w.shape:
                raise FastVError(f"the bundle's quantized weight {name} does not match the model: re-export it")
            params[name].copy_(w.to(params[name].dtype))
    scales = pre_scales(bundle_dir, files)
    install_pre_scales(model, scales)
    log.info("reference: %d weights replaced by their dequantized (or folded) values, %d input scales",
             len(weights), len(scales))
    return len(weights)
