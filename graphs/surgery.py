"""Graph surgery on exported decoder slices (onnx-graphsurgeon).

- ``insert_token_select``: the exported pre-K graph ends in layer K-1's hidden states plus that
  layer's post-rotary query and key; this wires them into ONE ``fastv::TokenSelect`` node (with its
  standard-ONNX local function) and makes the node's outputs the graph's outputs.
- ``name_dims`` / ``name_ir_dims``: symbolic dimension names that users (and the manifest) can read.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fastv_export.config import FastVConfig
from fastv_export.graphs import token_select as ts

PRE_K_OUTPUTS = ("hidden_states", "selected_position_ids", "kept_indices")


def insert_token_select(model: onnx.ModelProto, cfg: FastVConfig, *, scale: float,
                        position_rank: int) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    outputs = {t.name: t for t in graph.outputs}
    inputs = {t.name: t for t in graph.inputs}
    hidden, query, key = outputs["layer_hidden"], outputs["layer_query"], outputs["layer_key"]
    mask, positions = inputs["attention_mask"], inputs["position_ids"]
    candidates = gs.Variable("candidate_positions", dtype=np.int64, shape=["batch", "num_candidates"])
    graph.inputs.append(candidates)
    pos_shape = ["batch", "kept_seq"] if position_rank == 2 else [3, "batch", "kept_seq"]
    selected = gs.Variable(PRE_K_OUTPUTS[0], dtype=hidden.dtype, shape=["batch", "kept_seq", hidden.shape[-1]])
    sel_pos = gs.Variable(PRE_K_OUTPUTS[1], dtype=np.int64, shape=pos_shape)
    kept = gs.Variable(PRE_K_OUTPUTS[2], dtype=np.int64, shape=["batch", "kept_seq"])
    ratio_num, ratio_den = (cfg.r.numerator, cfg.r.denominator)
    node = ts.make_token_select_node(
        [hidden.name, query.name, key.name, mask.name, positions.name, candidates.name],
        [selected.name, sel_pos.name, kept.name], ranking=cfg.ranking, ratio_num=ratio_num, ratio_den=ratio_den,
        keep=-1 if cfg.keep is None else cfg.keep, scale=scale, seed=cfg.seed)
    graph.nodes.append(gs.Node(op=node.op_type, name=node.name, domain=node.domain,
                               attrs={a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
                               inputs=[hidden, query, key, mask, positions, candidates],
                               outputs=[selected, sel_pos, kept]))
    presents = [t for t in graph.outputs if t.name.startswith("present.")]
    graph.outputs = [selected, sel_pos, kept] + presents
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.functions.append(ts.token_select_function(cfg.ranking, position_rank=position_rank))
    if not any(o.domain == ts.OP_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(ts.OP_DOMAIN, ts.OP_VERSION))
    out.ir_version = model.ir_version
    return name_dims(out, {"hidden_states": ["batch", "kept_seq", None]})


# dynamo names dynamic dims s0, s1, ...: give the graph's I/O readable, consistent names
_DIM_NAMES = {
    "inputs_embeds": ["batch", "seq", None], "hidden_states": ["batch", "seq", None],
    "attention_mask": ["batch", "total_seq"], "input_ids": ["batch", "seq"],
    "image_features": ["image_tokens", None], "candidate_positions": ["batch", "num_candidates"],
    "logits": ["batch", None, None],
}


def dim_names(name: str, rank: int, overrides: dict[str, list] | None = None) -> list[str | None] | None:
    """The readable names of the dims of graph input/output ``name`` (None: leave that dim alone)."""
    if name.startswith(("past_key_values.", "present.")):
        return ["batch", None, "past_seq" if name.startswith("past") else "total_seq", None]
    if name in ("position_ids", "selected_position_ids"):
        seq = "seq" if name == "position_ids" else "kept_seq"
        return ["batch", seq] if rank == 2 else [None, "batch", seq]
    return dict(_DIM_NAMES, **(overrides or {})).get(name)


def name_dims(model: onnx.ModelProto, overrides: dict[str, list] | None = None) -> onnx.ModelProto:
    """Name the symbolic dims of an ONNX model's I/O in place (fixed dims stay)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, dim_names(value.name, len(dims), overrides) or []):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name
    return model


def name_ir_dims(model) -> None:
    """The same on an ``onnx_ir`` model (torch.onnx's ONNXProgram.model) before it is saved, so that
    large models are written once, with their external data, and never re-loaded."""
    import onnx_ir as ir

    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is None:
            continue
        for i, name in enumerate(dim_names(value.name, len(value.shape)) or []):
            if name is not None and not isinstance(value.shape[i], int):
                value.shape[i] = ir.SymbolicDim(name)
