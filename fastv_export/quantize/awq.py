"""INT4 AWQ weight-only quantization of the decoder layers with NVIDIA ModelOpt (``nvidia-modelopt``, its PyTorch
API, on the CPU, on the Hugging Face model), expressed as our graphs' DequantizeLinear -> MatMul.

1. Search: ``modelopt.torch.quantization.quantize`` with INT4_AWQ_CFG's weight quantizer (4 bits, blocks of 128
   along the reduction axis, static) and algorithm (``awq_lite``: per Linear, the activation scale
   ``s = mean|x|^alpha`` over alpha in a grid minimising the block-int4 output error on the calibration set), on
   a copy of the model restricted to the decoder layers' Linears. Each Linear then holds ``W * s`` and an input
   ``pre_quant_scale = 1 / s``, and the per-block ``amax`` of ``W * s``.
2. Folding, with ModelOpt's own export steps (``modelopt.torch.export.quant_utils``): o_proj's and down_proj's
   input scales into v_proj's / up_proj's output rows where exact (``fuse_prequant_to_linear``: same width,
   i.e. not across grouped KV heads); q/k/v and gate/up share one input, so their scales are averaged
   (``preprocess_linear_fusion``: weights rescaled, amax recomputed) and folded into the RMSNorm weight before
   them (``fuse_prequant_layernorm``). A scale left over (o_proj under grouped-query attention) stays as a
   ``Mul`` before the MatMul.
3. Read back: each Linear's folded float weight, its amax per block (the DequantizeLinear scale is
   ``amax / 7``, integers ``clamp(round(W / scale), -8, 7)``), the leftover input scale, and the folded norm
   weights. :func:`apply_float` puts the folded float weights and norms in the model that is exported (the same
   function in float), the graph rewrite (``onnx_weights.quantize_graph_given``) writes the integers.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

ALGORITHM = "awq-lite"
INT4_MAX = 7            # ModelOpt's 4-bit bound: scale = amax / 7, integers in [-8, 7]
ATTN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass
class AwqLinear:
    """One quantized Linear after folding: ``weight`` [out, in] (float, what the graph's MatMul would hold in
    float), ``amax`` [out, blocks] (ModelOpt's per-block absolute maximum of it) and ``pre_scale`` [in]: the
    input multiplier left as a Mul before the MatMul (None when folded into the op before)."""
    weight: torch.Tensor
    amax: torch.Tensor
    pre_scale: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return math.ceil(self.weight.shape[1] / self.amax.shape[1])

    def integers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [out, in] int8 in [-8, 7], scale [out, blocks] float32 = amax / 7) as the graph stores them."""
        scale = (self.amax.to(torch.float32) / INT4_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        per_column = scale.repeat_interleave(self.block_size, dim=1)[:, :self.weight.shape[1]]
        q = torch.clamp(torch.round(self.weight.to(torch.float32) / per_column), -8, INT4_MAX).to(torch.int8)
        return q, scale

    def dequantized(self) -> torch.Tensor:
        """q x scale [out, in] in float32, as DequantizeLinear computes it."""
        q, scale = self.integers()
        return q.to(torch.float32) * scale.repeat_interleave(self.block_size, dim=1)[:, :q.shape[1]]


@dataclass
class AwqResult:
    """The decoder's folded weights: torch weight parameter name -> :class:`AwqLinear`, norm weight parameter
    name -> its folded weight; how the scales were found."""
    linears: dict[str, AwqLinear]
    norms: dict[str, torch.Tensor]
    calibration: dict = field(default_factory=dict)
    tool: str = ""

    def folding(self) -> dict:
        """How the input scales are expressed: folded into norms / preceding Linears, or a Mul."""
        muls = sum(1 for x in self.linears.values() if x.pre_scale is not None)
        into = sum(1 for n, x in self.linears.items() if n.endswith(("o_proj.weight", "down_proj.weight"))
                   and x.pre_scale is None)
        return {"norms": len(self.norms), "linears": into, "mul": muls}


def _modelopt():
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import quant_utils
    except ImportError as exc:
        raise FastVError(f"--quantize int4-awq needs NVIDIA ModelOpt ({exc}); pip install nvidia-modelopt requests"
                         ) from None
    return modelopt, mtq, quant_utils


def _layer_parts(layer) -> dict:
    """The norms and Linears of a Llama-style decoder layer (Llama, Qwen2/2.5/3, InternVL's LM, ...)."""
    try:
        attn, mlp = layer.self_attn, layer.mlp
        parts = {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm,
                 **{n: getattr(attn, n) for n in (*ATTN, "o_proj")},
                 **{n: getattr(mlp, n) for n in (*MLP_IN, "down_proj")}}
    except AttributeError as exc:
        raise FastVError(f"int4-awq folds its scales into Llama-style decoder layers (input_layernorm, self_attn "
                         f"q/k/v/o_proj, mlp gate/up/down_proj); {type(layer).__name__} lacks one ({exc}); "
                         "use --quantize int4") from None
    return parts


def decoder_linear_names(model: torch.nn.Module, adapter) -> list[str]:
    """Module names (in ``model``) of the decoder layers' Linears."""
    ids = {id(m) for layer in adapter.layers() for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    return [n for n, m in model.named_modules() if id(m) in ids]


def quant_config(linear_names: list[str], block_size: int) -> dict:
    """ModelOpt's INT4_AWQ_CFG restricted to ``linear_names`` (everything else, the vision tower and lm_head
    included, left in float)."""
    _, mtq, _ = _modelopt()
    base = copy.deepcopy(mtq.INT4_AWQ_CFG)
    weight_cfg = next(e["cfg"] for e in base["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    weight_cfg = {**weight_cfg, "block_sizes": {**weight_cfg["block_sizes"], -1: block_size}}
    entries = [{"quantizer_name": "*", "enable": False}]
    entries += [{"quantizer_name": f"{n}.weight_quantizer", "cfg": weight_cfg} for n in linear_names]
    return {"quant_cfg": entries, "algorithm": base["algorithm"]}


def search(model: torch.nn.Module, adapter, items: list, block_size: int = 128) -> torch.nn.Module:
    """A copy of ``model`` quantized by ModelOpt (INT4 AWQ, fake quantization) on the calibration ``items``
    (``model_inputs()`` each); ``model`` is left as it was."""
    _, mtq, _ = _modelopt()
    names = decoder_linear_names(model, adapter)
    qmodel = copy.deepcopy(model).eval()

    def forward_loop(m):
        for item in items:
            m(**item.model_inputs())

    with torch.no_grad():
        mtq.quantize(qmodel, quant_config(names, block_size), forward_loop)
    return qmodel


def share_scales(qmodel: torch.nn.Module, adapter_of_qmodel) -> None:
    """One input scale per shared input (in place): q/k/v and gate/up read the same activations, so ModelOpt's
    export step ``preprocess_linear_fusion`` averages their AWQ scales, rescales the weights and recomputes their
    amax. This changes the quantized model (the integers); the folding that follows does not."""
    _, _, qu = _modelopt()
    with torch.no_grad():
        for layer in adapter_of_qmodel.layers():
            parts = _layer_parts(layer)
            for group in (ATTN, MLP_IN):
                linears = [parts[n] for n in group]
                if getattr(linears[0].input_quantizer, "pre_quant_scale", None) is not None:
                    qu.preprocess_linear_fusion(linears, resmooth_only=True)


def fold(qmodel: torch.nn.Module, adapter_of_qmodel) -> AwqResult:
    """Fold the (shared, :func:`share_scales`) input scales of the ModelOpt-quantized ``qmodel`` (changed in
    place) into the ops before them, and read back each decoder Linear's weight, amax and leftover scale and the
    folded norms, by parameter name. The folded model computes what ``qmodel`` computed."""
    modelopt, _, qu = _modelopt()
    with torch.no_grad():
        qu.fuse_prequant_to_linear(qmodel)                    # o -> v, down -> up where the widths agree
        layers = [_layer_parts(layer) for layer in adapter_of_qmodel.layers()]
        for parts in layers:
            for group, norm in ((ATTN, "input_layernorm"), (MLP_IN, "post_attention_layernorm")):
                linears = [parts[n] for n in group]
                if getattr(linears[0].input_quantizer, "pre_quant_scale", None) is not None:
                    qu.fuse_prequant_layernorm(parts[norm], linears)
    names = {id(p): n for n, p in qmodel.named_parameters()}       # the folding made new parameters
    linears, norms = {}, {}
    for parts in layers:
        for key in ("input_layernorm", "post_attention_layernorm"):
            norms[names[id(parts[key].weight)]] = parts[key].weight.detach().to(torch.float32).clone()
        for key in (*ATTN, "o_proj", *MLP_IN, "down_proj"):
            lin = parts[key]
            w = lin.weight.detach().to(torch.float32).clone()
            amax = lin.weight_quantizer.amax.detach().to(torch.float32).reshape(w.shape[0], -1).clone()
            pre = getattr(lin.input_quantizer, "_pre_quant_scale", None)
            linears[names[id(lin.weight)]] = AwqLinear(w, amax, None if pre is None
                                                       else pre.detach().to(torch.float32).clone())
    result = AwqResult(linears, norms, tool=f"nvidia-modelopt {modelopt.__version__} ({ALGORITHM}, PyTorch)")
    log.info("AWQ: %d Linears, %d norms folded, %d input scales kept as Mul", len(linears), len(norms),
             result.folding()["mul"])
    return result


def calibrate(model: torch.nn.Module, adapter, items: list, block_size: int = 128) -> AwqResult:
    """ModelOpt's AWQ search on ``items``, one scale per shared input, then the folding (:func:`search`,
    :func:`share_scales`, :func:`fold`); ``model`` unchanged."""
    from fastv_export.adapters import get_adapter

    qmodel = search(model, adapter, items, block_size)
    share_scales(qmodel, get_adapter(qmodel))
    result = fold(qmodel, get_adapter(qmodel))
    del qmodel
    return result


def calibrate_export(model: torch.nn.Module, adapter, model_name, source: str | None, size: int) -> AwqResult:
    """The export's AWQ step: the calibration set (fastv_export/quantize/calibration.py), the search and folding,
    and the folded float weights put into ``model`` (the graphs are traced from it next)."""
    from fastv_export.quantize.calibration import load_calibration

    cal = load_calibration(source, adapter, size, model=model_name)
    _modelopt()                                           # missing: one line before any work
    log.info("AWQ calibration on %d prompts (%s)", len(cal.items), cal.source)
    result = calibrate(model, adapter, cal.items)
    result.calibration = cal.to_manifest()
    apply_float(model, result)
    return result


def apply_float(model: torch.nn.Module, result: AwqResult) -> None:
    """Put the folded FLOAT weights and norms into ``model`` (in place): the model the graphs are exported from,
    whose quantized Linears ``onnx_weights.quantize_graph_given`` then writes as integers."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in [*((n, x.weight) for n, x in result.linears.items()), *result.norms.items()]:
            if name not in params or params[name].shape != w.shape:
                raise FastVError(f"the AWQ result's {name} does not match the model: a bug, please report")
            params[name].copy_(w.to(params[name].dtype))


def install_pre_scales(model: torch.nn.Module, scales: dict[str, torch.Tensor]) -> list:
    """``x * scale`` before each Linear whose weight parameter is named in ``scales`` (the graph's Mul before its
    MatMul), as forward pre-hooks; returns their handles."""
    handles = []
    for param, scale in scales.items():
        module = model.get_submodule(param.rsplit(".", 1)[0])
        s = scale.to(torch.float32)

        def hook(_module, args, s=s):
            return (args[0] * s.to(args[0].dtype), *args[1:])
        handles.append(module.register_forward_pre_hook(hook))
    return handles


def apply_quantized(model: torch.nn.Module, result: AwqResult) -> list:
    """``model`` as the graphs compute it (in place): dequantized folded weights, folded norms, leftover input
    scales as pre-hooks (returned)."""
    apply_float(model, result)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, lin in result.linears.items():
            params[name].copy_(lin.dequantized().to(params[name].dtype))
    return install_pre_scales(model, {n: x.pre_scale for n, x in result.linears.items() if x.pre_scale is not None})
