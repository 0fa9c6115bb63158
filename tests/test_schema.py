"""fastv::TokenSelect's OpSchema (graphs/schema.py): the checker and shape inference know the op.

- the standalone model of graphs/token_select.py passes ``check_model(full_check=True)`` with the
  schema registered, and shape inference gives its (cleared) outputs N' = ``kept_seq``, or a number
  when N and M are numbers;
- an exported pre_k.onnx (tiny-llava) does the same for hidden_states / selected_position_ids /
  kept_indices;
- the schema declares exactly what ``make_token_select_node`` writes, and rejects wrong nodes;
- ONNX Runtime still runs the model-local function body (it never reads Python schemas).
"""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from fastv_export.graphs import op, spec
from fastv_export.graphs import schema as sc
from fastv_export.graphs import token_select as ts
from fastv_export.reference import selection as ref

SCALE = 0.25
NUM, DEN = 1, 2
DTYPES = [TensorProto.FLOAT, TensorProto.FLOAT16]
HIDDEN, QUERY, KEY, MASK, POSITIONS, CANDIDATES = ts.INPUTS
#: the pre_k outputs that TokenSelect writes
PRE_K_SELECT_OUTPUTS = (spec.HIDDEN_STATES, spec.SELECTED_POSITION_IDS, spec.KEPT_INDICES)

_ATTR_TYPES = {OpSchema.AttrType.INT: onnx.AttributeProto.INT, OpSchema.AttrType.FLOAT: onnx.AttributeProto.FLOAT,
               OpSchema.AttrType.STRING: onnx.AttributeProto.STRING}


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[OpSchema]:
    """The schema registered for this module; removed afterwards unless someone had registered it."""
    was_registered = sc.is_registered()
    yield sc.register_schema()
    if not was_registered:
        sc.deregister_schema()


@contextmanager
def schema_absent() -> Iterator[None]:
    """Run a block with fastv::TokenSelect unknown to onnx, then register it again."""
    sc.deregister_schema()
    try:
        yield
    finally:
        sc.register_schema()


def model(*, ranking: str = "last", keep: int = -1, dtype: int = TensorProto.FLOAT,
          position_rank: int = 2) -> onnx.ModelProto:
    return ts.make_token_select_model(ranking=ranking, ratio_num=NUM, ratio_den=DEN, keep=keep, scale=SCALE,
                                      dtype=dtype, position_rank=position_rank)


def cleared(m: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph outputs keep their element type but lose their shape."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for value in out.graph.output:
        value.type.tensor_type.ClearField("shape")
    return out


def dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
            for d in t.shape.dim]


def set_dim(m: onnx.ModelProto, name: str, axis: int, value: int) -> None:
    value_info = next(v for v in m.graph.input if v.name == name)
    value_info.type.tensor_type.shape.dim[axis].dim_value = value


def node_attribute(m: onnx.ModelProto, name: str) -> onnx.AttributeProto:
    return next(a for a in m.graph.node[0].attribute if a.name == name)


def assert_imports_schema_version(m: onnx.ModelProto) -> None:
    """The model imports ``fastv`` at exactly the schema's since_version, so the schema that onnx
    resolves for it is this one. (The checker itself does not insist: with ``fastv`` imported at 0
    no schema applies and the node goes unchecked; at 2 the version-1 schema still applies.)"""
    imported = {o.domain: o.version for o in m.opset_import}
    assert imported[op.OP_DOMAIN] == op.OP_VERSION
    assert onnx.defs.get_schema(op.OP_TYPE, imported[op.OP_DOMAIN], op.OP_DOMAIN).since_version == op.OP_VERSION


def inferred_outputs(m: onnx.ModelProto) -> dict[str, tuple[int, list[int | str | None] | None]]:
    inferred = onnx.shape_inference.infer_shapes(cleared(m), strict_mode=True)
    return {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in inferred.graph.output}


# ---------------------------------------------------------------------------------------------- schema
def test_schema_identity_and_registration(registered: OpSchema) -> None:
    assert (registered.name, registered.domain, registered.since_version) == (op.OP_TYPE, op.OP_DOMAIN,
                                                                               op.OP_VERSION)
    assert [p.name for p in registered.inputs] == list(ts.INPUTS)
    assert [p.name for p in registered.outputs] == list(ts.OUTPUTS)
    assert registered.has_type_and_shape_inference_function
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in registered.type_constraints}
    assert constraints == {sc.FLOAT_TYPE: {"tensor(float)", "tensor(float16)", "tensor(bfloat16)"},
                           sc.INT_TYPE: {"tensor(int64)"}}
    for p in list(registered.inputs) + list(registered.outputs):
        assert p.description and "\n" not in p.description
    assert all(a.description and "\n" not in a.description for a in registered.attributes.values())
    # idempotent, and replace=True swaps in a fresh registration
    assert sc.register_schema().since_version == op.OP_VERSION
    assert sc.register_schema(replace=True).since_version == op.OP_VERSION
    assert sc.is_registered()


def test_attribute_defaults(registered: OpSchema) -> None:
    attrs = registered.attributes
    assert {name for name, a in attrs.items() if a.required} == {"ratio_num", "ratio_den", "scale", "ranking"}
    defaults = {name: helper.get_attribute_value(a.default_value) for name, a in attrs.items() if not a.required}
    assert defaults == {"keep": -1, "seed": 0, "plugin_namespace": op.PLUGIN_NAMESPACE.encode(),
                        "plugin_version": op.PLUGIN_VERSION.encode()}


def test_import_registers_nothing() -> None:
    code = ("import onnx, fastv_export.graphs.schema, fastv_export.graphs.token_select\n"
            f"assert not onnx.defs.has({op.OP_TYPE!r}, {op.OP_VERSION}, {op.OP_DOMAIN!r})")
    subprocess.run([sys.executable, "-c", code], check=True)


# (c) ---------------------------------------------------------------------------------- node vs schema
@pytest.mark.parametrize("ranking", op.RANKINGS)
def test_node_attributes_declared(registered: OpSchema, ranking: str) -> None:
    node = ts.make_token_select_node(list(ts.INPUTS), list(ts.OUTPUTS), ranking=ranking, ratio_num=NUM,
                                     ratio_den=DEN, scale=SCALE)
    written = {a.name: a.type for a in node.attribute}
    declared = registered.attributes
    assert set(written) == set(declared) == set(ts.ATTRIBUTES)
    for name, attr_type in written.items():
        assert _ATTR_TYPES[declared[name].type] == attr_type, name
    assert (node.domain, node.op_type) == (registered.domain, registered.name)
    assert len(node.input) == len(registered.inputs) and len(node.output) == len(registered.outputs)


# (a) ---------------------------------------------------------------------------------- standalone model
@pytest.mark.parametrize("dtype", DTYPES, ids=["float", "float16"])
@pytest.mark.parametrize("position_rank", [2, 3])
@pytest.mark.parametrize("ranking", op.RANKINGS)
def test_standalone_model_checked_and_inferred(ranking: str, position_rank: int, dtype: int) -> None:
    m = model(ranking=ranking, dtype=dtype, position_rank=position_rank)
    onnx.checker.check_model(m, full_check=True)
    assert_imports_schema_version(m)
    outputs = inferred_outputs(m)
    lead = [] if position_rank == 2 else [3]
    assert outputs == {
        ts.OUTPUTS[0]: (dtype, ["B", sc.KEPT_DIM, "D"]),
        ts.OUTPUTS[1]: (TensorProto.INT64, [*lead, "B", sc.KEPT_DIM]),
        ts.OUTPUTS[2]: (TensorProto.INT64, ["B", sc.KEPT_DIM]),
    }


@pytest.mark.parametrize("n, m, keep, expected", [
    (10, 6, -1, 7),     # R = 1/2: 10 - 6 + 3
    (10, 6, 2, 6),      # keep = 2
    (10, 6, 9, 10),     # keep >= M keeps every candidate
    (10, 0, -1, 10),    # M = 0: identity
    (1, 1, -1, 1),      # ceil(1 * (1 - R)) = 1
])
@pytest.mark.parametrize("position_rank", [2, 3])
def test_static_kept_length(n: int, m: int, keep: int, expected: int, position_rank: int) -> None:
    assert op.kept_length(n, m, NUM, DEN, keep) == expected
    mod = model(keep=keep, position_rank=position_rank)
    set_dim(mod, HIDDEN, 1, n)
    set_dim(mod, POSITIONS, -1, n)
    set_dim(mod, CANDIDATES, 1, m)
    outputs = inferred_outputs(mod)
    assert outputs[ts.OUTPUTS[0]][1] == ["B", expected, "D"]
    assert outputs[ts.OUTPUTS[1]][1][-1] == expected
    assert outputs[ts.OUTPUTS[2]][1] == ["B", expected]


@pytest.mark.parametrize("m, keep, expected", [(0, -1, "N"), (6, 6, "N"), (6, -1, sc.KEPT_DIM)])
def test_symbolic_n_static_m(m: int, keep: int, expected: str) -> None:
    """N' is N's own dim when a known M drops nothing, else kept_seq."""
    mod = model(keep=keep)
    set_dim(mod, CANDIDATES, 1, m)
    assert inferred_outputs(mod)[ts.OUTPUTS[2]][1] == ["B", expected]


def test_static_batch_and_hidden_size_propagate() -> None:
    mod = model(position_rank=3)
    for name in ts.INPUTS:
        set_dim(mod, name, -2 if name == POSITIONS else 0, 2)
    set_dim(mod, HIDDEN, 2, 8)
    outputs = inferred_outputs(mod)
    assert outputs[ts.OUTPUTS[0]][1] == [2, sc.KEPT_DIM, 8]
    assert outputs[ts.OUTPUTS[1]][1] == [3, 2, sc.KEPT_DIM]


# (d) ---------------------------------------------------------------------------------- wrong nodes fail
def _drop_input(m: onnx.ModelProto) -> None:
    del m.graph.node[0].input[-1]


def _drop_attribute(name: str):
    def edit(m: onnx.ModelProto) -> None:
        kept = [a for a in m.graph.node[0].attribute if a.name != name]
        del m.graph.node[0].attribute[:]
        m.graph.node[0].attribute.extend(kept)
    return edit


def _replace_attribute(name: str, value: object):
    def edit(m: onnx.ModelProto) -> None:
        _drop_attribute(name)(m)
        m.graph.node[0].attribute.append(helper.make_attribute(name, value))
    return edit


def _input_type(elem_type: int, *names: str):
    def edit(m: onnx.ModelProto) -> None:
        for value in m.graph.input:
            if value.name in names:
                value.type.tensor_type.elem_type = elem_type
    return edit


def _input_rank(name: str, rank: int):
    def edit(m: onnx.ModelProto) -> None:
        shape = next(v for v in m.graph.input if v.name == name).type.tensor_type.shape
        del shape.dim[rank:]
    return edit


WRONG_NODES = {
    # what the schema declares (node verification)
    "scale_as_int": (_replace_attribute("scale", 1), "Mismatched attribute type"),
    "ranking_as_int": (_replace_attribute("ranking", 1), "Mismatched attribute type"),
    "keep_as_float": (_replace_attribute("keep", 2.0), "Mismatched attribute type"),
    "unknown_attribute": (_replace_attribute("ratio", 0.5), "Unrecognized attribute"),
    "missing_ranking": (_drop_attribute("ranking"), "Required attribute 'ranking' is missing"),
    "missing_input": (_drop_input, "input size 5 not in range"),
    # type constraints and the inference function
    "double_inputs": (_input_type(TensorProto.DOUBLE, *ts.INPUTS[:3]), "unsupported type: tensor\\(double\\)"),
    "int32_mask": (_input_type(TensorProto.INT32, MASK), "unsupported type: tensor\\(int32\\)"),
    "mixed_float_types": (_input_type(TensorProto.FLOAT16, KEY), "must share one type T"),
    "rank2_hidden": (_input_rank(HIDDEN, 2), "must have rank 3"),
    "ratio_den_zero": (_replace_attribute("ratio_den", 0), "ratio_den must be in"),
    "unknown_ranking": (_replace_attribute("ranking", "max"), "ranking must be one of"),
}


@pytest.mark.parametrize("case", list(WRONG_NODES))
def test_checker_rejects_wrong_node(case: str) -> None:
    edit, message = WRONG_NODES[case]
    m = model()
    edit(m)
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match=message):
        onnx.checker.check_model(m, full_check=True)


@pytest.mark.parametrize("case", ["scale_as_int", "unknown_attribute", "missing_ranking", "missing_input"])
def test_without_schema_the_checker_accepts_wrong_node(case: str) -> None:
    """What the schema adds: the same wrong nodes pass the checker when the op is unknown."""
    edit, _ = WRONG_NODES[case]
    m = model()
    edit(m)
    with schema_absent():
        onnx.checker.check_model(m)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)


# ---------------------------------------------------------------------------------------------- ORT
@pytest.mark.parametrize("ranking", ["last", "random"])
def test_ort_runs_function_body_with_schema_registered(ranking: str) -> None:
    """ORT ignores the Python schema and runs the local function: same kept indices as the PyTorch
    reference, and output shapes equal to what the schema infers for the same static shapes."""
    b, n, m, d_model, h, hkv, head_dim = 2, 10, 6, 8, 4, 2, 16
    mod = model(ranking=ranking)
    session = ort.InferenceSession(mod.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, n, d_model, generator=g)
    query = torch.randn(b, h, 1, head_dim, generator=g)
    key = torch.randn(b, hkv, n, head_dim, generator=g)
    mask = torch.ones(b, n, dtype=torch.int64)
    positions = torch.arange(n).expand(b, n).contiguous()
    candidates = torch.stack([torch.arange(1, 1 + m), torch.arange(3, 3 + m)])
    feeds = dict(zip(ts.INPUTS, (hidden, query, key, mask, positions, candidates)))
    selected, sel_pos, kept = session.run(list(ts.OUTPUTS), {k: v.numpy() for k, v in feeds.items()})

    scores = ref.candidate_scores(ranking, candidates, query=query, key=key, key_valid=mask.bool(), scale=SCALE)
    expected = ref.select_kept(scores, candidates, n, op.keep_count(m, NUM, DEN)).numpy()
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(selected, np.take_along_axis(hidden.numpy(), expected[:, :, None], axis=1))
    np.testing.assert_array_equal(sel_pos, expected)

    static = model(ranking=ranking)
    for name, value in feeds.items():
        for axis, size in enumerate(value.shape):
            set_dim(static, name, axis, size)
    outputs = inferred_outputs(static)
    for name, array in zip(ts.OUTPUTS, (selected, sel_pos, kept)):
        assert outputs[name][1] == list(array.shape), name


# (b) ---------------------------------------------------------------------------------- exported pre_k
@pytest.fixture(scope="session")
def pre_k(exported_bundle) -> Path:
    return exported_bundle("tiny-llava", 2, "1/2") / "pre_k.onnx"


@pytest.mark.slow
def test_exported_pre_k_checked_and_inferred(pre_k: Path) -> None:
    """Cleared pre_k outputs get back the shapes of the bundle's I/O contract (graphs/spec.py)."""
    m = onnx.load(str(pre_k))
    onnx.checker.check_model(m, full_check=True)
    assert_imports_schema_version(m)
    assert sc.KEPT_DIM in spec.DYNAMIC_DIMS
    embeds = next(v for v in m.graph.input if v.name == spec.INPUTS_EMBEDS)
    contract = spec.pre_k_graph(2, position_rank=2)
    sizes = {"hidden_size": dims(embeds)[-1]}
    outputs = inferred_outputs(m)
    for name in PRE_K_SELECT_OUTPUTS:
        assert outputs[name][1] == contract.tensor(name).shape(sizes), name
        assert outputs[name][1] == dims(next(v for v in m.graph.output if v.name == name)), name
    assert outputs[spec.HIDDEN_STATES][0] == embeds.type.tensor_type.elem_type
    assert outputs[spec.KEPT_INDICES][0] == outputs[spec.SELECTED_POSITION_IDS][0] == TensorProto.INT64


@pytest.mark.slow
def test_exported_pre_k_runs_in_ort_with_schema_registered(pre_k: Path) -> None:
    m = onnx.load(str(pre_k))
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    b, n, num_candidates = 2, 9, 4
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for value in session.get_inputs():
        if value.name == spec.INPUTS_EMBEDS:
            feeds[value.name] = rng.standard_normal((b, n, value.shape[-1]), dtype=np.float32)
        elif value.name == spec.ATTENTION_MASK:
            feeds[value.name] = np.ones((b, n), dtype=np.int64)
        elif value.name == spec.POSITION_IDS:
            feeds[value.name] = np.broadcast_to(np.arange(n), (b, n)).astype(np.int64)
        elif value.name == spec.CANDIDATE_POSITIONS:
            feeds[value.name] = np.broadcast_to(np.arange(2, 2 + num_candidates), (b, num_candidates)).astype(np.int64)
        else:  # empty past
            feeds[value.name] = np.zeros((b, value.shape[1], 0, value.shape[3]), dtype=np.float32)
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    kept = op.kept_length(n, num_candidates, NUM, DEN)
    assert results[spec.HIDDEN_STATES].shape == (b, kept, feeds[spec.INPUTS_EMBEDS].shape[-1])
    assert results[spec.SELECTED_POSITION_IDS].shape == results[spec.KEPT_INDICES].shape == (b, kept)
