"""Quantized bundles: weight-only int8 / int4 decoder weights (ONNX Runtime's quantization tools), the manifest's
``quantization`` section, and the quantized model's PyTorch reference (docs/design.md §10)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import onnx

from fastv_export.quantize.schemes import NONE, SCHEMES, Scheme, check_target, get_scheme

from fastv_export.errors import FastVError

if TYPE_CHECKING:
    from fastv_export.adapters import ModelAdapter
    from fastv_export.quantize.awq import AwqResult
    from fastv_export.export.onnx_export import WrittenGraph
    from fastv_export.graphs import spec

__all__ = ["NONE", "SCHEMES", "Scheme", "check_target", "get_scheme", "quantize_bundle_graphs"]

log = logging.getLogger(__name__)

METHOD = ("weight-only: symmetric, round to nearest, each group's scale from its absolute maximum (min-max); "
          "activations, attention, norms and the KV cache stay in the bundle's float precision")
AWQ_METHOD = ("weight-only int4 AWQ: NVIDIA ModelOpt's awq_full on the calibration set (INT4_AWQ_CFG's awq_lite "
              "per-Linear activation scale search, alpha grid step 0.1, then awq_clip's per-block amax search); input "
              "scales folded exactly into the RMSNorm weight (when q/k/v or gate/up share one) or into v_proj / "
              "up_proj rows, else a Mul before the MatMul; block scales amax / 7, integers round to nearest in [-8, 7]")


def quantize_bundle_graphs(adapter: ModelAdapter, out: Path, specs: Mapping[str, spec.GraphSpec],
                           written: dict[str, WrittenGraph], scheme: Scheme,
                           save=None, awq: AwqResult | None = None) -> dict:
    """Quantize the decoder-layer weights of the pre_k and post_k graphs written in ``out`` (rewritten in place
    with ``save(model, path)``, default onnx.save; their opsets updated in ``written``); returns the manifest's
    ``quantization`` section. ``awq`` (int4-awq): the folded model's integers, scales and input scales, the
    graphs exported from the model with its folded float weights (:func:`fastv_export.quantize.awq.apply_float`)."""
    import onnxruntime

    from fastv_export.quantize.onnx_weights import decoder_linear_weights, quantize_graph

    weights = decoder_linear_weights(adapter)
    if scheme.calibrated and awq is None:
        raise FastVError(f"{scheme.name} needs its calibration result: a bug, please report")
    given, folded = _given(awq) if awq is not None else ({}, {})
    graphs, float_bytes, q_bytes, params, named, muls = {}, 0, 0, set(), 0, 0
    for name in ("pre_k", "post_k"):
        path = out / specs[name].file
        if awq is not None:
            from fastv_export.quantize.onnx_weights import quantize_graph_given

            model, info, n_folded, n_mul = quantize_graph_given(onnx.load(str(path)), weights, given, folded)
            named, muls = named + n_folded, muls + n_mul
        else:
            model, info = quantize_graph(onnx.load(str(path)), weights, scheme)
        (save or (lambda m, p: onnx.save(m, str(p))))(model, path)
        written[name] = replace(written[name], opsets={o.domain or "ai.onnx": o.version for o in model.opset_import})
        graphs[name] = {"weights": len(info.params)}
        float_bytes, q_bytes = float_bytes + info.float_bytes, q_bytes + info.quantized_bytes
        params.update(info.params)
    if len(params) != len(weights):
        log.warning("%d of %d decoder Linear weights were found in the graphs and quantized", len(params),
                    len(weights))
    log.info("%s: %d decoder weights, %d -> %d bytes", scheme.name, len(params), float_bytes, q_bytes)
    section = {**scheme.to_manifest(), "method": METHOD,
               "calibration": {"kind": "none", "count": 0, "source": None,
                               "note": "weight-only min-max scales come from the weights alone: no calibration data"},
               "quantized": {"decoder_layers": True, "lm_head": False, "vision_tower": False, "embeddings": False},
               "graphs": graphs, "weights": len(params),
               "weight_bytes": {"float": float_bytes, "quantized": q_bytes},
               "tool": f"onnxruntime {onnxruntime.__version__} quantization"}
    if awq is not None:
        if named != len(awq.norms):
            raise FastVError(f"{named} of {len(awq.norms)} folded norm weights were found in the graphs: a bug")
        section.update(method=AWQ_METHOD, calibration=awq.calibration, tool=f"{awq.tool}; onnx {onnx.__version__}",
                       folding={**awq.folding(), "mul": muls})
    return section


def _given(awq: AwqResult) -> tuple[dict, dict]:
    """The AWQ result as the graph rewrite takes it: torch parameter -> GivenWeight ([in, out] integers, [blocks,
    out] scales), and sha256 of each folded norm weight -> its parameter."""
    from fastv_export.quantize.onnx_weights import GivenWeight, _digest

    given = {}
    for name, lin in awq.linears.items():
        q, scale = lin.integers()
        given[name] = GivenWeight(q.t().contiguous().numpy(), scale.t().contiguous().numpy(), lin.block_size,
                                  None if lin.pre_scale is None else lin.pre_scale.numpy())
    folded = {_digest(w.numpy()): name for name, w in awq.norms.items()}
    if len(folded) != len(awq.norms):
        raise FastVError("two folded norm weights are identical: their graph weights cannot be told apart")
    return given, folded
