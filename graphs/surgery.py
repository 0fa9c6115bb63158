"""Graph surgery on exported decoder slices (onnx-graphsurgeon). Names and dims come from
:mod:`fastv_export.graphs.spec`; FastV parameters come in as plain attributes.

- ``insert_token_select``: the exported pre-K graph ends in layer K-1's hidden states plus that
  layer's post-rotary query and key; this wires them into ONE ``fastv::TokenSelect`` node (with its
  standard-ONNX local function) and makes the node's outputs the graph's outputs. DeepStack levels
  l >= K (pre_k inputs, :data:`spec.DEEPSTACK_EMBEDS`) leave gathered at the node's kept positions
  (Unsqueeze, Expand, GatherElements: standard ops, no new op).
- ``name_dims`` / ``name_ir_dims``: the spec's dynamic dim names on a graph's inputs and outputs
  (torch.onnx names them s0, s1, ...), so users and the manifest read ``batch``, ``seq``, ...
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fastv_export.graphs import op, spec
from fastv_export.graphs import token_select as ts


def insert_token_select(model: onnx.ModelProto, *, ranking: str, ratio_num: int, ratio_den: int, keep: int,
                        seed: int, scale: float, position_rank: int, k: int = 1, deepstack: int = 0
                        ) -> onnx.ModelProto:
    """pre_k as exported (outputs :data:`spec.PRE_K_EXPORT_OUTPUTS` + presents) -> pre_k of the
    bundle (:func:`spec.pre_k_graph`). ``keep`` is -1 to use the ratio; ``deepstack``: the model's
    DeepStack levels L (levels K <= l < L become outputs gathered at the kept positions)."""
    graph = gs.import_onnx(model)
    outputs = {t.name: t for t in graph.outputs}
    inputs = {t.name: t for t in graph.inputs}
    hidden, query, key = (outputs[n] for n in spec.PRE_K_EXPORT_OUTPUTS)
    target = spec.pre_k_graph(k, position_rank, deepstack)

    def variable(name: str, dtype) -> gs.Variable:
        dims = [d if not isinstance(d, str) or d in spec.DYNAMIC_DIMS else None for d in target.dims_of(name)]
        if name == spec.HIDDEN_STATES or name.startswith(spec.KEPT_DEEPSTACK_EMBEDS + "."):
            dims[-1] = hidden.shape[-1]
        return gs.Variable(name, dtype=dtype, shape=dims)

    candidates = variable(spec.CANDIDATE_POSITIONS, np.int64)
    graph.inputs.append(candidates)
    selected = variable(spec.HIDDEN_STATES, hidden.dtype)
    sel_pos = variable(spec.SELECTED_POSITION_IDS, np.int64)
    kept = variable(spec.KEPT_INDICES, np.int64)
    node_inputs = [hidden, query, key, inputs[spec.ATTENTION_MASK], inputs[spec.POSITION_IDS], candidates]
    node = ts.make_token_select_node([t.name for t in node_inputs], [selected.name, sel_pos.name, kept.name],
                                     ranking=ranking, ratio_num=ratio_num, ratio_den=ratio_den, keep=keep,
                                     scale=scale, seed=seed)
    graph.nodes.append(gs.Node(op=node.op_type, name=node.name, domain=node.domain,
                               attrs={a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
                               inputs=node_inputs, outputs=[selected, sel_pos, kept]))
    gathered = []
    for level in range(k, max(k, deepstack)):
        dense = inputs[spec.level_name(spec.DEEPSTACK_EMBEDS, level)]
        tag = f"deepstack_{level}"
        axes = gs.Constant(f"{tag}_axes", np.array([2], dtype=np.int64))
        width = gs.Constant(f"{tag}_width", np.array([1, 1, hidden.shape[-1]], dtype=np.int64))
        idx = gs.Variable(f"{tag}_index", dtype=np.int64)
        wide = gs.Variable(f"{tag}_wide_index", dtype=np.int64)
        out = variable(spec.level_name(spec.KEPT_DEEPSTACK_EMBEDS, level), hidden.dtype)
        graph.nodes += [gs.Node("Unsqueeze", f"{tag}_unsqueeze", inputs=[kept, axes], outputs=[idx]),
                        gs.Node("Expand", f"{tag}_expand", inputs=[idx, width], outputs=[wide]),
                        gs.Node("GatherElements", f"{tag}_gather", attrs={"axis": 1}, inputs=[dense, wide],
                                outputs=[out])]
        gathered.append(out)
    presents = [t for t in graph.outputs if spec.is_present(t.name)]
    graph.outputs = [selected, sel_pos, kept] + gathered + presents
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.functions.append(ts.token_select_function(ranking))
    if not any(o.domain == op.OP_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(op.OP_DOMAIN, op.OP_VERSION))
    out.ir_version = model.ir_version
    return name_dims(out, target)


def _dynamic_names(graph: spec.GraphSpec, name: str, rank: int) -> list[str | None]:
    dims = graph.dims_of(name)
    if dims is None or len(dims) != rank:
        return []
    return [d if d in spec.DYNAMIC_DIMS else None for d in dims]


def name_dims(model: onnx.ModelProto, graph: spec.GraphSpec) -> onnx.ModelProto:
    """Name the dynamic dims of an ONNX model's I/O in place, as ``graph`` says (fixed dims stay)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, _dynamic_names(graph, value.name, len(dims))):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name
    return model


def name_ir_dims(model, graph: spec.GraphSpec) -> None:
    """The same on an ``onnx_ir`` model (torch.onnx's ONNXProgram.model) before it is saved, so that
    large models are written once, with their external data, and never re-loaded."""
    import onnx_ir as ir

    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is None:
            continue
        for i, name in enumerate(_dynamic_names(graph, value.name, len(value.shape))):
            if name is not None and not isinstance(value.shape[i], int):
                value.shape[i] = ir.SymbolicDim(name)
