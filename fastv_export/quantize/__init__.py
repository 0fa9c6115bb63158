"""Quantized bundles: weight-only int8 / int4 / fp8 decoder weights, lm_head and the vision tower by option (ONNX
Runtime's quantization tools), the manifest's ``quantization`` section, and the quantized model's PyTorch reference
(docs/design.md §10)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from fastv_export.quantize.schemes import (DEFAULT_PARTS, NONE, PARTS, SCHEMES, Scheme, check_target, get_scheme,
                                          parse_parts)

from fastv_export.errors import FastVError

if TYPE_CHECKING:
    from fastv_export.adapters import ModelAdapter
    from fastv_export.quantize.awq import AwqResult
    from fastv_export.export.onnx_export import WrittenGraph
    from fastv_export.graphs import spec

__all__ = ["DEFAULT_PARTS", "NONE", "PARTS", "SCHEMES", "Scheme", "check_target", "get_scheme", "parse_parts",
           "quantize_bundle_graphs"]

log = logging.getLogger(__name__)

METHOD = ("weight-only: symmetric, round to nearest, each group's scale from its absolute maximum (min-max); "
          "activations, attention, norms and the KV cache stay in the bundle's float precision")
AWQ_METHOD = ("weight-only int4 AWQ: NVIDIA ModelOpt's awq_full on the calibration set (INT4_AWQ_CFG's awq_lite "
              "per-Linear activation scale search, alpha grid step 0.1, then awq_clip's per-block amax search); input "
              "scales folded exactly into the RMSNorm weight (when q/k/v or gate/up share one) or into v_proj / "
              "up_proj rows, else a Mul before the MatMul; block scales amax / 7, integers round to nearest in [-8, 7]")


def quantize_bundle_graphs(adapter: ModelAdapter, out: Path, specs: Mapping[str, spec.GraphSpec],
                           written: dict[str, WrittenGraph], scheme: Scheme,
                           save=None, awq: AwqResult | None = None, parts: tuple[str, ...] = DEFAULT_PARTS) -> dict:
    """Quantize the weights of ``parts`` (:data:`PARTS`: the decoder layers' Linears in pre_k and post_k, lm_head in
    post_k, the vision tower's and projector's Linears in vision) in the graphs written in ``out`` (rewritten in
    place with ``save(model, path)``, default onnx.save; their opsets updated in ``written``); returns the
    manifest's ``quantization`` section. ``awq`` (int4-awq): the folded model's integers, scales and input scales
    of the decoder layers, the graphs exported from the model with its folded float weights
    (:func:`fastv_export.quantize.awq.apply_float`); lm_head and vision then take min-max int4 blocks."""
    import onnx   # here, not at the top: `fastv-export --help` and `flops` import the scheme names without onnx
    import onnxruntime

    from fastv_export.quantize.onnx_weights import (decoder_linear_weights, lm_head_weights, quantize_graph,
                                                    vision_linear_weights)

    if "decoder" not in parts or set(parts) - set(PARTS):
        raise FastVError(f"quantized parts {', '.join(parts)}: decoder is required, the others one of "
                         f"{', '.join(PARTS)}")
    weights = decoder_linear_weights(adapter)
    if scheme.calibrated and awq is None:
        raise FastVError(f"{scheme.name} needs its calibration result: a bug, please report")
    given, folded = _given(awq) if awq is not None else ({}, {})
    extra_scheme = SCHEMES["int4"] if scheme.calibrated else scheme      # lm_head / vision: min-max
    extra = {"pre_k": {}, "post_k": lm_head_weights(adapter) if "lm_head" in parts else {},
             "vision": vision_linear_weights(adapter) if "vision" in parts else {}}
    graphs, float_bytes, q_bytes, params, named, muls = {}, 0, 0, set(), 0, 0
    for name in ("pre_k", "post_k", "vision"):
        if name == "vision" and not extra["vision"]:
            continue
        path = out / specs[name].file
        model, found, g_float, g_q = onnx.load(str(path)), [], 0, 0
        if name != "vision" and awq is not None:
            from fastv_export.quantize.onnx_weights import quantize_graph_given

            model, info, n_folded, n_mul = quantize_graph_given(model, weights, given, folded)
            named, muls = named + n_folded, muls + n_mul
            found, g_float, g_q = list(info.params), info.float_bytes, info.quantized_bytes
            targets = extra[name]
        else:
            targets = extra[name] if name == "vision" else {**weights, **extra[name]}
        if targets:
            model, info = quantize_graph(model, targets, scheme if name != "vision" and awq is None else extra_scheme)
            found, g_float, g_q = found + info.params, g_float + info.float_bytes, g_q + info.quantized_bytes
        _check_found(name, found, extra[name], specs[name].file)
        (save or (lambda m, p: onnx.save(m, str(p))))(model, path)
        written[name] = replace(written[name], opsets={o.domain or "ai.onnx": o.version for o in model.opset_import})
        graphs[name] = {"weights": len(found), "weight_bytes": {"float": g_float, "quantized": g_q}}
        float_bytes, q_bytes = float_bytes + g_float, q_bytes + g_q
        params.update(found)
    decoder = params & set(weights.values())
    if len(decoder) != len(weights):
        log.warning("%d of %d decoder Linear weights were found in the graphs and quantized", len(decoder),
                    len(weights))
    log.info("%s (%s): %d weights, %d -> %d bytes", scheme.name, ",".join(parts), len(params), float_bytes, q_bytes)
    section = {**scheme.to_manifest(), "method": METHOD,
               "calibration": {"kind": "none", "count": 0, "source": None,
                               "note": "weight-only min-max scales come from the weights alone: no calibration data"},
               "quantized": {**{key: part in parts for part, key in PARTS.items()}, "embeddings": False},
               "graphs": graphs, "weights": len(params),
               "weight_bytes": {"float": float_bytes, "quantized": q_bytes},
               "tool": f"onnxruntime {onnxruntime.__version__} quantization"}
    if awq is not None:
        if named != len(awq.norms):
            raise FastVError(f"{named} of {len(awq.norms)} folded norm weights were found in the graphs: a bug")
        method = AWQ_METHOD + ("; lm_head and the vision Linears: min-max int4 blocks of 128 (not searched)"
                               if len(parts) > 1 else "")
        section.update(method=method, calibration=awq.calibration, tool=f"{awq.tool}; onnx {onnx.__version__}",
                       folding={**awq.folding(), "mul": muls})
    return section


def _check_found(graph: str, found: list[str], wanted: dict[str, str], file: str) -> None:
    """FastVError in one line when an optional part's weight was not found in its graph as a MatMul weight of its
    own: lm_head (e.g. tied to the token embedding and shared with another node) or no vision Linear at all."""
    missing = set(wanted.values()) - set(found)
    if graph == "post_k" and missing:
        raise FastVError(f"{file} holds no separate MatMul weight for {min(missing)} (shared with another "
                         "node, e.g. a tied token embedding): it cannot be quantized alone; drop lm_head from "
                         "--quantize-parts")
    if graph == "vision" and wanted and not set(wanted.values()) & set(found):
        raise FastVError(f"{file} has none of the vision tower's Linear weights as a MatMul or Gemm weight of its "
                         "own: drop vision from --quantize-parts")
    if graph == "vision" and missing:
        log.info("%d vision Linear weights are not in %s (layers the model does not use): left out", len(missing),
                 file)


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
