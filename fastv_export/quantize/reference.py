"""The quantized model's PyTorch reference: the bundle's integer weights dequantized in PyTorch.

Every ``DequantizeLinear`` of a quantized bundle whose input is a weight named ``<param>.T_DQ_Q<bits>``
(fastv_export/quantize/onnx_weights.py) gives ``W = q * scale`` (symmetric: no zero point), the scale repeated
over each block of ``block_size`` rows of the reduction axis (or taken per output channel), in float32 as
DequantizeLinear computes it; ``<param>`` of the model is set to ``W`` transposed back to Linear's [out, in].
An int4-awq bundle also holds float weights with AWQ scales folded in (``<param>.AWQ_FOLDED``, RMSNorm weights:
copied as they are) and input scales left as a ``Mul`` before a MatMul (``<weight param>.AWQ_PRE_SCALE``: the same
product as a forward pre-hook of that Linear). The weights of every quantized part are found this way: the decoder
layers' (pre_k, post_k), lm_head's (post_k) and the vision Linears' (vision). A tied lm_head gets its own parameter
(the token embedding keeps the float table, as embed.onnx does).
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

#: the graphs that may hold quantized weights (vision: with ``--quantize-parts ...,vision``; a missing file is skipped)
QUANTIZED_GRAPHS = ("pre_k", "post_k", "vision")


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
        if graph not in files or not (Path(bundle_dir) / files[graph]).is_file():
            continue
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
        if graph not in files or not (Path(bundle_dir) / files[graph]).is_file():
            continue
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
    shared = _shared_parameters(model)
    with torch.no_grad():
        for name, w in weights.items():
            module_name, _, attr = name.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                module = None
            param = getattr(module, attr, None)
            if not isinstance(param, torch.nn.Parameter) or param.shape != w.shape:
                raise FastVError(f"the bundle's quantized weight {name} does not match the model: re-export it")
            if id(param) in shared:       # tied (lm_head and the token embedding): only this module's copy changes
                setattr(module, attr, torch.nn.Parameter(w.to(param.dtype), requires_grad=param.requires_grad))
            else:
                param.copy_(w.to(param.dtype))
    scales = pre_scales(bundle_dir, files)
    install_pre_scales(model, scales)
    log.info("reference: %d weights replaced by their dequantized (or folded) values, %d input scales",
             len(weights), len(scales))
    return len(weights)


def _shared_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters held by more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}
