"""INT4 AWQ weight-only quantization of the decoder layers with NVIDIA ModelOpt (``nvidia-modelopt``, its PyTorch
API, on the CPU, on the Hugging Face model), expressed as our graphs' DequantizeLinear -> MatMul.

1. Search: ``modelopt.torch.quantization.quantize`` with INT4_AWQ_CFG's weight quantizer (4 bits, blocks of 128
   along the reduction axis, static) on a copy of the model restricted to the decoder layers' Linears, with
   ModelOpt's ``awq_full`` (INT4_AWQ_CFG's ``awq_lite`` scale search: per Linear, ``s = mean|x|^alpha`` over
   alpha in a grid of step 0.1 minimising the block-int4 output error on the calibration set; then ``awq_clip``:
   per block, the amax minimising that error). Each Linear then holds ``W * s``, an input ``pre_quant_scale =
   1 / s`` and the per-block amax of ``W * s``.
2. Folding, exact only (the integers and amax stay those ModelOpt computed): o_proj's and down_proj's input scales
   into v_proj's / up_proj's output rows where the widths agree (not across grouped KV heads); the scales of
   Linears that share an input (q/k/v, gate/up) into the RMSNorm weight before them when they are equal
   (ModelOpt's ``fuse_prequant_layernorm``). awq_lite searches each Linear alone, so they seldom are: an input
   scale left over stays as a ``Mul`` before its MatMul. (Averaging them, as ModelOpt's TensorRT-LLM export does,
   recomputes the amax and loses the clip search: measured worse on the demo, docs/design.md §10.)
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

ALGORITHM = "awq-full"
INT4_MAX = 7            # ModelOpt's 4-bit bound: scale = amax / 7, integers in [-8, 7]
ATTN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass
class AwqLinear:
    """One quantized Linear: ``weight`` [out, in] and ``amax`` [out, blocks] as ModelOpt left them (``W * s`` and
    its per-block amax), ``pre_scale`` [in]: the input multiplier left as a Mul before the MatMul (None when
    folded into the op before), ``row_scale`` [out]: the next Linear's input scale folded into this one's output
    rows (None: none)."""
    weight: torch.Tensor
    amax: torch.Tensor
    pre_scale: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None

    @property
    def folded_weight(self) -> torch.Tensor:
        """The float weight the exported MatMul holds before it is quantized (output rows scaled)."""
        return self.weight if self.row_scale is None else self.weight * self.row_scale[:, None]

    @property
    def block_size(self) -> int:
        return math.ceil(self.weight.shape[1] / self.amax.shape[1])

    def integers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [out, in] int8 in [-8, 7], scale [out, blocks] float32 = amax / 7, times the row scale) as the graph
        stores them."""
        scale = (self.amax.to(torch.float32) / INT4_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        per_column = scale.repeat_interleave(self.block_size, dim=1)[:, :self.weight.shape[1]]
        q = torch.clamp(torch.round(self.weight.to(torch.float32) / per_column), -8, INT4_MAX).to(torch.int8)
        return q, scale if self.row_scale is None else scale * self.row_scale[:, None]

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
        into = sum(1 for x in self.linears.values() if x.row_scale is not None)
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


def quant_config(linear_names: list[str], block_size: int, algorithm: str = "awq_full") -> dict:
    """ModelOpt's INT4_AWQ_CFG restricted to ``linear_names`` (everything else, the vision tower and lm_head
    included, left in float), with ModelOpt's AWQ ``algorithm``."""
    _, mtq, _ = _modelopt()
    base = copy.deepcopy(mtq.INT4_AWQ_CFG)
    weight_cfg = next(e["cfg"] for e in base["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    weight_cfg = {**weight_cfg, "block_sizes": {**weight_cfg["block_sizes"], -1: block_size}}
    entries = [{"quantizer_name": "*", "enable": False}]
    entries += [{"quantizer_name": f"{n}.weight_quantizer", "cfg": weight_cfg} for n in linear_names]
    extra = {k: v for k, v in base["algorithm"].items() if k != "method"} if algorithm != "awq_clip" else {}
    return {"quant_cfg": entries, "algorithm": {**extra, "method": algorithm}}


def search(model: torch.nn.Module, adapter, items: list, block_size: int = 128,
           algorithm: str = "awq_full") -> torch.nn.Module:
    """A copy of ``model`` quantized by ModelOpt (INT4 AWQ, fake quantization) on the calibration ``items``
    (``model_inputs()`` each) with ModelOpt's ``algorithm`` (awq_lite: scale search; awq_clip: clip search;
    awq_full: both); ``model`` is left as it was."""
    _, mtq, _ = _modelopt()
    names = decoder_linear_names(model, adapter)
    qmodel = copy.deepcopy(model).eval()

    def forward_loop(m):
        for item in items:
            m(**item.model_inputs())

    with torch.no_grad():
        mtq.quantize(qmodel, quant_config(names, block_size, algorithm), forward_loop)
    return qmodel


def _pre_scale(linear) -> torch.Tensor | None:
    return getattr(linear.input_quantizer, "_pre_quant_scale", None)


def _fold_rows(into, source) -> torch.Tensor | None:
    """``source``'s input scale for the output rows of the Linear before it (``into``: v_proj for o_proj, up_proj
    for down_proj), exact when the widths agree; returns it (None: not foldable) and removes it from ``source``.
    A block lies inside one row, so the rows' integers stay those ModelOpt computed and only their block scales
    (and bias) are multiplied (:attr:`AwqLinear.row_scale`)."""
    p = _pre_scale(source)
    if p is None or p.numel() != into.weight.shape[0]:
        return None
    delattr(source.input_quantizer, "_pre_quant_scale")
    return p.detach().to(torch.float32).clone()


def fold(qmodel: torch.nn.Module, adapter_of_qmodel) -> AwqResult:
    """Fold the input scales of the ModelOpt-quantized ``qmodel`` (changed in place) into the ops before them
    where exact, and read back each decoder Linear's weight, amax and leftover scale and the folded norms, by
    parameter name. The folded model computes what ``qmodel`` computed (same integers, same amax)."""
    modelopt, _, qu = _modelopt()
    with torch.no_grad():
        layers = [_layer_parts(layer) for layer in adapter_of_qmodel.layers()]
        rows, folded_norms = {}, set()
        for parts in layers:
            for into, source in (("v_proj", "o_proj"), ("up_proj", "down_proj")):   # not across grouped KV heads
                rows[id(parts[into])] = _fold_rows(parts[into], parts[source])
            for group, norm in ((ATTN, "input_layernorm"), (MLP_IN, "post_attention_layernorm")):
                linears = [parts[n] for n in group]
                scales = [_pre_scale(x) for x in linears]
                if scales[0] is not None and all(x is not None and torch.equal(x, scales[0]) for x in scales):
                    qu.fuse_prequant_layernorm(parts[norm], linears)      # one scale for the shared input
                    folded_norms.add(id(parts[norm]))
    names = {id(p): n for n, p in qmodel.named_parameters()}       # the folding made new parameters
    linears, norms = {}, {}
    for parts in layers:
        for key in ("input_layernorm", "post_attention_layernorm"):
            if id(parts[key]) in folded_norms:
                norms[names[id(parts[key].weight)]] = parts[key].weight.detach().to(torch.float32).clone()
        for key in (*ATTN, "o_proj", *MLP_IN, "down_proj"):
            lin = parts[key]
            w = lin.weight.detach().to(torch.float32).clone()
            amax = lin.weight_quantizer.amax.detach().to(torch.float32).reshape(w.shape[0], -1).clone()
            pre = getattr(lin.input_quantizer, "_pre_quant_scale", None)
            if getattr(lin, "bias", None) is not None and rows.get(id(lin)) is not None:    # Qwen2's v_proj under MHA
                raise FastVError(f"int4-awq: {names[id(lin.weight)]} has a bias and a folded row scale, not handled "
                                 "yet; use --quantize int4")
            linears[names[id(lin.weight)]] = AwqLinear(w, amax, None if pre is None
                                                       else pre.detach().to(torch.float32).clone(),
                                                       rows.get(id(lin)))
    result = AwqResult(linears, norms, tool=f"nvidia-modelopt {modelopt.__version__} (PyTorch API)")
    log.info("AWQ: %d Linears, %d norms folded, %d input scales kept as Mul", len(linears), len(norms),
             result.folding()["mul"])
    return result


def calibrate(model: torch.nn.Module, adapter, items: list, block_size: int = 128,
              algorithm: str = "awq_full") -> AwqResult:
    """ModelOpt's AWQ search on ``items`` then the folding (:func:`search`, :func:`fold`); ``model`` unchanged."""
    from fastv_export.adapters import get_adapter

    qmodel = search(model, adapter, items, block_size, algorithm)
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
        for name, w in [*((n, x.folded_weight) for n, x in result.linears.items()), *result.norms.items()]:
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
