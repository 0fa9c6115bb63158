"""Quantized bundles: weight-only int8 / int4 decoder weights (ONNX Runtime's quantization tools), the manifest's
``quantization`` section, and the quantized model's PyTorch reference (docs/design.md §10)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import onnx

from fastv_export.quantize.schemes import NONE, SCHEMES, Scheme, check_target, get_scheme

if TYPE_CHECKING:
    from fastv_export.adapters import ModelAdapter
    from fastv_export.export.onnx_export import WrittenGraph
    from fastv_export.graphs import spec

__all__ = ["NONE", "SCHEMES", "Scheme", "check_target", "get_scheme", "quantize_bundle_graphs"]

log = logging.getLogger(__name__)

METHOD = ("weight-only: symmetric, round to nearest, each group's scale from its absolute maximum (min-max); "
          "activations, attention, norms and the KV cache stay in the bundle's float precision")


def quantize_bundle_graphs(adapter: ModelAdapter, out: Path, specs: Mapping[str, spec.GraphSpec],
                           written: dict[str, WrittenGraph], scheme: Scheme,
                           save=None) -> dict:
    """Quantize the decoder-layer weights of the pre_k and post_k graphs written in ``out`` (rewritten in place
    with ``save(model, path)``, default onnx.save; their opsets updated in ``written``); returns the manifest's
    ``quantization`` section."""
    import onnxruntime

    from fastv_export.quantize.onnx_weights import decoder_linear_weights, quantize_graph

    weights = decoder_linear_weights(adapter)
    graphs, float_bytes, q_bytes, params = {}, 0, 0, set()
    for name in ("pre_k", "post_k"):
        path = out / specs[name].file
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
    return {**scheme.to_manifest(), "method": METHOD,
            "calibration": {"kind": "none", "count": 0, "source": None,
                            "note": "weight-only min-max scales come from the weights alone: no calibration data"},
            "quantized": {"decoder_layers": True, "lm_head": False, "vision_tower": False, "embeddings": False},
            "graphs": graphs, "weights": len(params),
            "weight_bytes": {"float": float_bytes, "quantized": q_bytes},
            "tool": f"onnxruntime {onnxruntime.__version__} quantization"}
