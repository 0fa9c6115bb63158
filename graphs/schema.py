"""``fastv::TokenSelect`` as an ``onnx.defs.OpSchema``: the machine-readable twin of ``docs/token_select.md``.

ONNX models carry TokenSelect as a custom-domain node plus its model-local function
(``graphs/token_select.py``). Without a schema, ``onnx.checker`` accepts any node of the ``fastv``
domain unchecked and shape inference only sees the function body, which cannot name N' (its outputs
come back as ``unk__*`` dims). Registering :data:`TOKEN_SELECT_SCHEMA` makes the op known to onnx:

- the checker verifies the node: six inputs, three outputs, attribute names and types, required
  attributes; with ``full_check=True`` (which runs strict shape inference) also T in {float, float16,
  bfloat16}, one T for inputs 0-2, int64 elsewhere, input ranks and the attribute values that
  ``op.check_attributes`` accepts;
- shape inference runs :func:`infer_token_select` (not the function body): output 0 gets input 0's
  element type and ``[B, N', D]``, output 1 int64 with the rank of ``position_ids`` (leading dims
  copied, last dim N'), output 2 int64 ``[B, N']``. N' is a number when N and M are numbers
  (``op.kept_length``), N's own dim when M is a number that keeps every candidate (M = 0, R = 0,
  keep >= M), otherwise the symbolic dim :data:`KEPT_DIM` (``"kept_seq"``, the bundle's name for it,
  see ``graphs/spec.py``). One fixed name is a deliberate choice: a bundle's pre_k holds exactly one
  TokenSelect node, and a readable, stable name is what the manifest and users see. A graph with two
  TokenSelect nodes of different N' would wrongly get the same name for both. B, which all six
  inputs share, is a number if any input has one, else the dim name most inputs use: exported graphs
  keep exporter names such as ``s10`` in their value_info, while the graph inputs say ``batch``.

Caveats (onnx 1.23): an exception raised by the Python inference function surfaces even from
non-strict ``infer_shapes`` (only invalid nodes raise). The checker does not tie the model's
``fastv`` opset import to the schema: at version 0 no schema applies (the node goes unchecked), at 2
this version-1 schema does; the builders import ``fastv`` at ``op.OP_VERSION``, as they must.

ONNX Runtime and TensorRT never read Python-registered schemas: ORT still runs the local-function
body, TensorRT the plugin or that body. Registration is explicit (:func:`register_schema`, idempotent);
importing this module registers nothing.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema
from onnx.shape_inference import InferenceContext, InferenceError

from fastv_export.graphs import op
from fastv_export.graphs.token_select import ATTRIBUTES, INPUTS, OUTPUTS

__all__ = ["KEPT_DIM", "TOKEN_SELECT_SCHEMA", "deregister_schema", "infer_token_select", "is_registered",
           "register_schema", "token_select_schema"]

#: the symbolic name of N' when it is not a number (the bundle's dynamic dim of graphs/spec.py)
KEPT_DIM = "kept_seq"

#: type constraint names: the float type shared by inputs 0-2 and output 0, and int64
FLOAT_TYPE, INT_TYPE = "T", "I"
_FLOAT_TYPE_STRS = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")

# (type constraint, one-line description), in the order of token_select.INPUTS / OUTPUTS
_INPUT_DOCS: tuple[tuple[str, str], ...] = (
    (FLOAT_TYPE, "[B, N, D]: output of decoder layer K-1 for the N new tokens"),
    (FLOAT_TYPE, "[B, H, Nq, d]: layer K-1's post-rotary query of the last Nq new tokens (1 <= Nq <= N)"),
    (FLOAT_TYPE, "[B, Hkv, S, d]: layer K-1's post-rotary key, past included (S = P + N, H % Hkv == 0)"),
    (INT_TYPE, "[B, S]: 1 = real token, 0 = padding (past and new)"),
    (INT_TYPE, "[B, N] or [3, B, N] (M-RoPE): original positions of the new tokens"),
    (INT_TYPE, "[B, M]: ascending indices in [0, N) of the image tokens among the new tokens; M may be 0"),
)
_OUTPUT_DOCS: tuple[tuple[str, str], ...] = (
    (FLOAT_TYPE, "[B, N', D]: rows of hidden_states at the kept indices, N' = N - M + keep(M)"),
    (INT_TYPE, "[B, N'] or [3, B, N']: position_ids at the kept indices"),
    (INT_TYPE, "[B, N']: kept indices into [0, N), ascending"),
)

# attribute -> (type, default or None when required, one-line description)
_ATTRIBUTE_DOCS: dict[str, tuple[OpSchema.AttrType, object, str]] = {
    "ratio_num": (OpSchema.AttrType.INT, None, "numerator of the drop ratio R = ratio_num / ratio_den, "
                                               "0 <= ratio_num < ratio_den"),
    "ratio_den": (OpSchema.AttrType.INT, None, "denominator of R, at most 2^31 - 1 (int32); "
                                               "dropped = floor(M * ratio_num / ratio_den)"),
    "keep": (OpSchema.AttrType.INT, -1, "-1: use the ratio; >= 0: keep min(keep, M) image tokens"),
    "scale": (OpSchema.AttrType.FLOAT, None, "softmax scale of layer K-1 (1/sqrt(head_dim) for Llama/Qwen2)"),
    "seed": (OpSchema.AttrType.INT, 0, "seed of the 'random' ranking, 0 <= seed < 2^31"),
    "ranking": (OpSchema.AttrType.STRING, None, f"image-token ranking, one of {', '.join(op.RANKINGS)}"),
    "plugin_namespace": (OpSchema.AttrType.STRING, op.PLUGIN_NAMESPACE,
                         "namespace of the TensorRT plugin that implements the op"),
    "plugin_version": (OpSchema.AttrType.STRING, op.PLUGIN_VERSION,
                       "version of the TensorRT plugin that implements the op"),
}
_DEFAULTS: dict[str, object] = {name: d for name, (_, d, _) in _ATTRIBUTE_DOCS.items() if d is not None}

_EXPECTED_RANKS: tuple[tuple[int, ...], ...] = ((3,), (4,), (4,), (2,), (2, 3), (2,))
_HIDDEN, _QUERY, _KEY, _MASK, _POSITIONS, _CANDIDATES = range(len(INPUTS))

Dim = onnx.TensorShapeProto.Dimension


# ---- shape inference ------------------------------------------------------------------------------
def _fail(message: str) -> InferenceError:
    return InferenceError(f"[ShapeInferenceError] fastv::TokenSelect: {message}")


def _tensor_dims(t: onnx.TypeProto | None) -> list[Dim] | None:
    """The dims of a tensor type, or None when its rank is unknown."""
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return list(t.tensor_type.shape.dim)


def _unify(dims: Iterable[Dim | None], what: str) -> Dim:
    """One dim that several inputs share by contract: a number if any input has one (all numbers must
    agree), else the name most inputs use (ties: input order), else an unknown dim."""
    present = [d for d in dims if d is not None]
    values = {d.dim_value for d in present if d.HasField("dim_value")}
    if len(values) > 1:
        raise _fail(f"inputs disagree on {what}: {sorted(values)}")
    if values:
        return Dim(dim_value=values.pop())
    names = Counter(d.dim_param for d in present if d.HasField("dim_param"))
    return Dim(dim_param=names.most_common(1)[0][0]) if names else Dim()


def _attribute(ctx: InferenceContext, name: str) -> object:
    """The node's attribute ``name``, else the schema default; a missing required one fails."""
    proto = ctx.get_attribute(name)
    if proto is not None:
        return helper.get_attribute_value(proto)
    if name in _DEFAULTS:
        return _DEFAULTS[name]
    raise _fail(f"required attribute {name!r} is missing")


def _kept_dim(n: Dim, m: Dim, ratio_num: int, ratio_den: int, keep: int) -> Dim:
    """N' = N - M + keep(M): a number when N and M are numbers, N itself when M is a number that
    keeps every candidate, else the symbolic :data:`KEPT_DIM`."""
    if m.HasField("dim_value"):
        m_value = m.dim_value
        if n.HasField("dim_value"):
            if m_value > n.dim_value:
                raise _fail(f"{INPUTS[_CANDIDATES]} has M = {m_value} > N = {n.dim_value} columns")
            return Dim(dim_value=op.kept_length(n.dim_value, m_value, ratio_num, ratio_den, keep))
        if op.keep_count(m_value, ratio_num, ratio_den, keep) == m_value and n.HasField("dim_param"):
            return Dim(dim_param=n.dim_param)  # nothing dropped: N' = N
    return Dim(dim_param=KEPT_DIM)


def _tensor_type(elem_type: int, dims: Sequence[Dim] | None) -> onnx.TypeProto:
    t = onnx.TypeProto()
    t.tensor_type.elem_type = elem_type
    if dims is not None:
        shape = t.tensor_type.shape
        shape.SetInParent()  # rank 0 would still need an explicit (empty) shape
        for d in dims:
            shape.dim.add().CopyFrom(d)
    return t


def infer_token_select(ctx: InferenceContext) -> None:
    """Type-and-shape inference of ``fastv::TokenSelect`` (see the module docstring for the rules).

    Also checks what the schema's types cannot express: input ranks, ``position_ids``' leading 3
    for M-RoPE, numbers that disagree between inputs, and attribute values (``op.check_attributes``).
    """
    if ctx.get_num_inputs() != len(INPUTS) or ctx.get_num_outputs() != len(OUTPUTS):
        raise _fail(f"needs {len(INPUTS)} inputs and {len(OUTPUTS)} outputs, got "
                    f"{ctx.get_num_inputs()} and {ctx.get_num_outputs()}")
    values = {name: _attribute(ctx, name) for name in ("ranking", "ratio_num", "ratio_den", "keep", "seed")}
    ranking = values["ranking"]
    try:
        op.check_attributes(ranking=ranking.decode() if isinstance(ranking, bytes) else ranking,
                            ratio_num=values["ratio_num"], ratio_den=values["ratio_den"],
                            keep=values["keep"], seed=values["seed"])
    except ValueError as exc:
        raise _fail(str(exc)) from None

    types = [ctx.get_input_type(i) if ctx.has_input(i) else None for i in range(len(INPUTS))]
    dims = [_tensor_dims(t) for t in types]
    for name, d, ranks in zip(INPUTS, dims, _EXPECTED_RANKS):
        if d is not None and len(d) not in ranks:
            raise _fail(f"input {name!r} must have rank {' or '.join(map(str, ranks))}, got {len(d)}")
    pos = dims[_POSITIONS]
    if pos is not None and len(pos) == 3 and pos[0].HasField("dim_value") and pos[0].dim_value != 3:
        raise _fail(f"rank-3 {INPUTS[_POSITIONS]!r} must be [3, B, N] (M-RoPE), got {pos[0].dim_value} first")

    def dim(i: int, axis: int) -> Dim | None:
        return None if dims[i] is None else dims[i][axis]

    batch = _unify([dim(_HIDDEN, 0), dim(_QUERY, 0), dim(_KEY, 0), dim(_MASK, 0), dim(_POSITIONS, -2),
                    dim(_CANDIDATES, 0)], "the batch size B")
    n = _unify([dim(_HIDDEN, 1), dim(_POSITIONS, -1)], "the number of new tokens N")
    hidden_size = dim(_HIDDEN, 2) or Dim()
    m = dim(_CANDIDATES, 1) or Dim()
    kept = _kept_dim(n, m, values["ratio_num"], values["ratio_den"], values["keep"])

    # one T for inputs 0-2 (onnx checks each against the constraint, not that they agree)
    float_types = {t.tensor_type.elem_type for t in types[:_MASK]
                   if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type}
    if len(float_types) > 1:
        names = sorted(TensorProto.DataType.Name(e) for e in float_types)
        raise _fail(f"{', '.join(INPUTS[:_MASK])} must share one type T, got {', '.join(names)}")
    if float_types:
        ctx.set_output_type(0, _tensor_type(float_types.pop(), [batch, kept, hidden_size]))
    ctx.set_output_type(1, _tensor_type(TensorProto.INT64, None if pos is None else [*pos[:-2], batch, kept]))
    ctx.set_output_type(2, _tensor_type(TensorProto.INT64, [batch, kept]))


# ---- the schema ---------------------------------------------------------------------------------
def _attribute_param(name: str) -> OpSchema.Attribute:
    attr_type, default, doc = _ATTRIBUTE_DOCS[name]
    if default is None:
        return OpSchema.Attribute(name, attr_type, doc, required=True)
    return OpSchema.Attribute(name, helper.make_attribute(name, default), doc)


def token_select_schema() -> OpSchema:
    """A fresh ``OpSchema`` of ``fastv::TokenSelect`` (domain, name and version from ``graphs/op.py``,
    formal names from ``graphs/token_select.py``), with :func:`infer_token_select` attached."""
    if len(_INPUT_DOCS) != len(INPUTS) or len(_OUTPUT_DOCS) != len(OUTPUTS) or set(_ATTRIBUTE_DOCS) != set(ATTRIBUTES):
        raise RuntimeError("graphs/schema.py is out of date with graphs/token_select.py's INPUTS/OUTPUTS/ATTRIBUTES")
    schema = OpSchema(
        op.OP_TYPE, op.OP_DOMAIN, op.OP_VERSION,
        "FastV visual-token pruning between decoder layers K-1 and K: keeps every non-image token and the "
        "keep(M) image tokens that rank highest. Contract: docs/token_select.md.",
        inputs=[OpSchema.FormalParameter(name, type_str, doc)
                for name, (type_str, doc) in zip(INPUTS, _INPUT_DOCS)],
        outputs=[OpSchema.FormalParameter(name, type_str, doc)
                 for name, (type_str, doc) in zip(OUTPUTS, _OUTPUT_DOCS)],
        type_constraints=[(FLOAT_TYPE, list(_FLOAT_TYPE_STRS), "hidden states, query and key (one type)"),
                          (INT_TYPE, ["tensor(int64)"], "masks, positions and indices")],
        attributes=[_attribute_param(name) for name in ATTRIBUTES],
        node_determinism=OpSchema.NodeDeterminism.Deterministic,
    )
    schema.set_type_and_shape_inference_function(infer_token_select)
    return schema


#: the schema object (not registered; see :func:`register_schema`)
TOKEN_SELECT_SCHEMA: OpSchema = token_select_schema()


def is_registered() -> bool:
    """Whether onnx's schema registry knows ``fastv::TokenSelect`` at version ``op.OP_VERSION``."""
    return onnx.defs.has(op.OP_TYPE, op.OP_VERSION, op.OP_DOMAIN)


def register_schema(*, replace: bool = False) -> OpSchema:
    """Register :data:`TOKEN_SELECT_SCHEMA` with onnx (process-wide; idempotent) and return the
    registered schema. An existing registration is kept unless ``replace`` is true."""
    if is_registered():
        if not replace:
            return onnx.defs.get_schema(op.OP_TYPE, op.OP_VERSION, op.OP_DOMAIN)
        onnx.defs.deregister_schema(op.OP_TYPE, op.OP_VERSION, op.OP_DOMAIN)
    onnx.defs.register_schema(TOKEN_SELECT_SCHEMA)
    return onnx.defs.get_schema(op.OP_TYPE, op.OP_VERSION, op.OP_DOMAIN)


def deregister_schema() -> None:
    """Remove ``fastv::TokenSelect`` from onnx's registry if it is there (for tests)."""
    if is_registered():
        onnx.defs.deregister_schema(op.OP_TYPE, op.OP_VERSION, op.OP_DOMAIN)
