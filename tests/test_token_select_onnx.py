"""fastv::TokenSelect's ONNX function body (graphs/token_select.py), run by ONNX Runtime on CPU,
against the PyTorch reference of the same semantics (fastv_export/selection.py).

The two are independent implementations: agreement of the kept indices (tie-aware: a swap is
only accepted between candidates whose reference scores lie within a tolerance of the cut-off),
of the gathered hidden states / position ids (bit-exact) and of the candidate scores themselves
(read from the inlined body) is the check."""
from __future__ import annotations

import math
import zlib
from fractions import Fraction

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from fastv_export.reference import selection as ref
from fastv_export.graphs import op
from fastv_export.graphs import token_select as ts

SCALE = 0.25
RATIOS = [(0, 1), (1, 2), (2, 3), (3, 4), (9, 10), (3, 7), (4, 9)]
NP_DTYPE = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
TORCH_DTYPE = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
               TensorProto.BFLOAT16: torch.bfloat16}


# ---------------------------------------------------------------------------------------------- helpers
def _model(ranking, num, den, keep, seed, dtype, position_rank, opset=18):
    return ts.make_token_select_model(ranking=ranking, ratio_num=num, ratio_den=den, keep=keep, scale=SCALE,
                                      seed=seed, dtype=dtype, position_rank=position_rank, opset=opset)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def session(ranking, num=1, den=2, keep=-1, seed=0, dtype=TensorProto.FLOAT, position_rank=2, opset=18):
    return _session(_model(ranking, num, den, keep, seed, dtype, position_rank, opset))


def scores_session(ranking, seed=0):
    """The body inlined, with its internal ``candidate_scores`` [B, M] exposed as an extra output."""
    model = onnx.inliner.inline_local_functions(_model(ranking, 1, 2, -1, seed, TensorProto.FLOAT, 2))
    name = next(o for n in model.graph.node for o in n.output if o.startswith("candidate_scores"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "M"]))
    return _session(model), name


def expected_keep(m: int, num: int, den: int, keep: int) -> int:
    """keep(M), written independently of the code under test: M - floor(M * R) or min(keep, M)."""
    if keep >= 0:
        return min(keep, m)
    return m - math.floor(Fraction(m) * Fraction(num, den))


def make_inputs(seed: int, *, ranking: str, b=2, n=23, m=11, d_model=8, h=4, hkv=2, head_dim=16, past=0,
                pads=None, position_rank=2, dtype=TensorProto.FLOAT, zero_key=False):
    """Random inputs (torch tensors). Candidates: ``m`` ascending positions per row, among the row's
    real (non-padding) new tokens; left padding of ``pads[i]`` tokens in row i (past and new)."""
    g = torch.Generator().manual_seed(seed)
    s = past + n
    nq = 1 if ranking == "last" else n
    tdt = TORCH_DTYPE[dtype]
    hidden = torch.randn(b, n, d_model, generator=g).to(tdt)
    query = torch.randn(b, h, nq, head_dim, generator=g).to(tdt)
    key = torch.randn(b, hkv, s, head_dim, generator=g).to(tdt)
    if zero_key:
        key = torch.zeros_like(key)
    mask = torch.ones(b, s, dtype=torch.int64)
    pads = pads or [0] * b
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    cand = []
    for i in range(b):
        first_real = max(0, pads[i] - past)                    # new-token index of the first real token
        pool = torch.arange(first_real, n)
        pick = torch.randperm(len(pool), generator=g)[:m]
        cand.append(torch.sort(pool[pick]).values)
    cand = torch.stack(cand) if m else torch.zeros(b, 0, dtype=torch.int64)
    pos = torch.cumsum(mask, 1)[:, past:] - 1 + 100 * torch.arange(b)[:, None]   # distinct per row
    pos = pos.clamp(min=0)
    if position_rank == 3:
        pos = torch.stack([pos, pos + 1000, pos + 2000])
    return dict(hidden_states=hidden, query=query, key=key, attention_mask=mask, position_ids=pos,
                candidate_positions=cand)


def to_feeds(inputs: dict) -> dict:
    return {k: v.numpy() for k, v in inputs.items()}


def run(sess: ort.InferenceSession, inputs: dict):
    return sess.run(None, to_feeds(inputs))


def reference(ranking: str, inputs: dict, keep_m: int, seed: int = 0):
    """Reference candidate scores [B, M] (float32) and kept indices [B, N'] from fastv_export.reference.selection."""
    cand = inputs["candidate_positions"]
    n = inputs["hidden_states"].shape[1]
    if ranking == "random":
        scores = ref.random_scores(cand, seed)
    else:
        q, k, valid = inputs["query"], inputs["key"], inputs["attention_mask"].bool()
        past = k.shape[2] - n
        if past == 0:
            scores = ref.candidate_scores(ranking, cand, query=q, key=k, key_valid=valid, scale=SCALE)
        else:
            full = (ref.score_last if ranking == "last" else ref.score_mean)(q, k, valid, SCALE)
            scores = torch.gather(full, 1, cand + past)
    return scores, ref.select_kept(scores, cand, n, keep_m)


def assert_selection(kept, kept_ref, scores_ref, cand, keep_m, tol):
    """Kept sets equal, except swaps between candidates whose reference scores are within ``tol`` of the
    cut-off (the keep_m-th best reference score of the row)."""
    kept_ref = kept_ref.numpy()
    assert kept.shape == kept_ref.shape
    for row in range(kept.shape[0]):
        assert np.all(np.diff(kept[row]) > 0), f"row {row}: kept indices not strictly ascending: {kept[row]}"
        if np.array_equal(kept[row], kept_ref[row]):
            continue
        got, want = set(kept[row].tolist()), set(kept_ref[row].tolist())
        by_pos = dict(zip(cand[row].tolist(), scores_ref[row].tolist()))
        cutoff = sorted(by_pos.values(), reverse=True)[keep_m - 1] if keep_m else None
        for p in got ^ want:
            assert p in by_pos, f"row {row}: non-candidate {p} differs"
            assert cutoff is not None and abs(by_pos[p] - cutoff) <= tol, (
                f"row {row}: position {p} (score {by_pos[p]}) swapped, cut-off {cutoff}, tol {tol}")


def check_outputs(outs, inputs, kept_ref, scores_ref, keep_m, tol=1e-6):
    sel_h, sel_p, kept = outs
    b, n, d_model = inputs["hidden_states"].shape
    m = inputs["candidate_positions"].shape[1]
    n_kept = n - m + keep_m
    assert kept.shape == (b, n_kept) and kept.dtype == np.int64
    assert sel_h.shape == (b, n_kept, d_model)
    assert_selection(kept, kept_ref, scores_ref, inputs["candidate_positions"], keep_m, tol)
    # gathered rows and positions are exactly the inputs at the kept indices (ORT's own indices)
    hid = inputs["hidden_states"].numpy()
    assert sel_h.dtype == hid.dtype
    np.testing.assert_array_equal(sel_h, np.take_along_axis(hid, kept[:, :, None], axis=1))
    pos = inputs["position_ids"].numpy()
    want_pos = (np.take_along_axis(pos, kept, axis=1) if pos.ndim == 2
                else np.take_along_axis(pos, np.broadcast_to(kept, (3,) + kept.shape), axis=2))
    assert sel_p.dtype == np.int64
    np.testing.assert_array_equal(sel_p, want_pos)
    # every non-candidate is kept
    for row in range(b):
        non_cand = set(range(n)) - set(inputs["candidate_positions"][row].tolist())
        assert non_cand <= set(kept[row].tolist())


def seed_for(*parts) -> int:
    """A fixed seed per parametrisation, stable across runs (crc32, not the salted hash())."""
    return zlib.crc32(repr(parts).encode()) % (2**31)


# ---------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("ranking", op.RANKINGS)
@pytest.mark.parametrize("position_rank", [2, 3])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_model_is_checker_valid_and_shape_inference_types_outputs(ranking, position_rank, dtype):
    model = ts.make_token_select_model(ranking=ranking, ratio_num=2, ratio_den=3, scale=SCALE, seed=7,
                                       dtype=dtype, position_rank=position_rank)
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), ("fastv", 1)}
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == (op.OP_DOMAIN, op.OP_TYPE) == ("fastv", "TokenSelect")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"ranking": ranking.encode(), "ratio_num": 2, "ratio_den": 3, "keep": -1,
                     "scale": pytest.approx(SCALE), "seed": 7, "plugin_namespace": b"fastv", "plugin_version": b"1"}
    (fn,) = model.functions
    assert (fn.domain, fn.name) == ("fastv", "TokenSelect")
    assert list(fn.input) == list(ts.INPUTS) and list(fn.output) == list(ts.OUTPUTS)
    assert set(fn.attribute) == set(attrs)
    refs = {a.ref_attr_name for nd in fn.node for a in nd.attribute if a.ref_attr_name}
    want_refs = {"ratio_num", "ratio_den", "keep"} | ({"seed"} if ranking == "random" else {"scale"})
    assert refs == want_refs
    assert {nd.domain for nd in fn.node} <= {""}                               # standard ops only
    assert [(o.domain, o.version) for o in fn.opset_import] == [("", 18)]
    if ranking == "random":
        assert not {"query", "key"} & {i for nd in fn.node for i in nd.input}
    # strict shape inference (through the function) agrees with the declared output types
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    outs = {o.name: o.type.tensor_type for o in inferred.graph.output}
    assert outs["selected_hidden_states"].elem_type == dtype
    assert outs["selected_position_ids"].elem_type == outs["kept_indices"].elem_type == TensorProto.INT64
    assert [len(outs[n].shape.dim) for n in ts.OUTPUTS] == [3, position_rank, 2]


def test_shape_inference_through_the_body_with_static_inputs():
    model = ts.make_token_select_model(ranking="mean", ratio_num=1, ratio_den=2, scale=SCALE, position_rank=3)
    dims = dict(B=2, N=30, D=8, H=4, Nq=30, d=16, Hkv=2, S=30, M=12)
    for vi in model.graph.input:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_value = dims[dim.dim_param]
    for vi in model.graph.output:
        vi.type.tensor_type.ClearField("shape")                 # what the body infers, nothing declared
    for m in (model, onnx.inliner.inline_local_functions(model)):
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
        outs = {o.name: o.type.tensor_type.shape.dim for o in inferred.graph.output}
        assert len(outs["selected_hidden_states"]) == 3 and outs["selected_hidden_states"][2].dim_value == 8
        assert len(outs["selected_position_ids"]) == 3 and outs["selected_position_ids"][0].dim_value == 3
        assert len(outs["kept_indices"]) == 2


def test_node_builder_and_constants():
    node = ts.make_token_select_node(list("abcdef"), list("xyz"), ranking="mean", ratio_num=3, ratio_den=7,
                                     keep=5, scale=0.125, seed=3, name="n0")
    assert (node.domain, node.op_type, node.name) == ("fastv", "TokenSelect", "n0")
    assert list(node.input) == list("abcdef") and list(node.output) == list("xyz")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"fastv" and attrs["plugin_version"] == b"1"
    assert (attrs["ratio_num"], attrs["ratio_den"], attrs["keep"], attrs["seed"]) == (3, 7, 5, 3)
    assert (op.OP_DOMAIN, op.OP_TYPE, op.OP_VERSION, op.PLUGIN_NAMESPACE, op.PLUGIN_VERSION) == \
        ("fastv", "TokenSelect", 1, "fastv", "1")
    bad = [dict(ranking="top"), dict(ratio_num=2, ratio_den=2), dict(ratio_num=-1), dict(ratio_den=0),
           dict(keep=-2), dict(seed=2**31), dict(seed=-1), dict(scale=float("nan"))]
    for change in bad:
        kw = dict(ranking="last", ratio_num=1, ratio_den=2, keep=-1, scale=0.125, seed=0) | change
        with pytest.raises(ValueError):
            ts.make_token_select_node(list("abcdef"), list("xyz"), **kw)
    with pytest.raises(ValueError):
        ts.make_token_select_node(list("abc"), list("xyz"), ranking="last", ratio_num=1, ratio_den=2, scale=1.0)
    with pytest.raises(ValueError):
        ts.token_select_function("last", opset=17)
    with pytest.raises(ValueError):
        ts.token_select_function("sum")


def test_one_function_serves_both_position_ranks():
    a, b = (ts.make_token_select_model(ranking="last", ratio_num=1, ratio_den=2, scale=SCALE, position_rank=r)
            for r in (2, 3))
    want = ts.token_select_function("last").SerializeToString()
    assert a.functions[0].SerializeToString() == b.functions[0].SerializeToString() == want


# ---------------------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("ranking", op.RANKINGS)
@pytest.mark.parametrize("num,den", RATIOS)
def test_ratios_match_reference(ranking, num, den):
    inputs = make_inputs(seed_for("ratio", ranking, num, den), ranking=ranking, n=23, m=13)
    keep_m = expected_keep(13, num, den, -1)
    outs = run(session(ranking, num, den), inputs)
    scores, kept_ref = reference(ranking, inputs, keep_m)
    check_outputs(outs, inputs, kept_ref, scores, keep_m)


@pytest.mark.parametrize("ranking", op.RANKINGS)
@pytest.mark.parametrize("keep", [0, 1, 5, 13, 40])
def test_keep_mode_matches_reference(ranking, keep):
    inputs = make_inputs(seed_for("keep", ranking, keep), ranking=ranking, n=23, m=13)
    keep_m = min(keep, 13)
    outs = run(session(ranking, 1, 2, keep), inputs)                # the ratio attributes are ignored
    scores, kept_ref = reference(ranking, inputs, keep_m)
    check_outputs(outs, inputs, kept_ref, scores, keep_m)


@pytest.mark.parametrize("ranking", op.RANKINGS)
@pytest.mark.parametrize("num,den,keep", [(0, 1, -1), (1, 2, -1), (9, 10, -1), (4, 9, -1), (1, 2, 0), (1, 2, 3)])
@pytest.mark.parametrize("position_rank", [2, 3])
def test_no_candidates_is_the_identity(ranking, num, den, keep, position_rank):
    inputs = make_inputs(seed_for("m0", ranking, num, den, keep, position_rank), ranking=ranking, n=9, m=0,
                         position_rank=position_rank)
    sel_h, sel_p, kept = run(session(ranking, num, den, keep, position_rank=position_rank), inputs)
    np.testing.assert_array_equal(kept, np.tile(np.arange(9), (2, 1)))
    np.testing.assert_array_equal(sel_h, inputs["hidden_states"].numpy())
    np.testing.assert_array_equal(sel_p, inputs["position_ids"].numpy())


@pytest.mark.parametrize("ranking", ["last", "mean"])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_gqa_matches_reference(ranking, h, hkv):
    inputs = make_inputs(seed_for("gqa", ranking, h, hkv), ranking=ranking, h=h, hkv=hkv, n=19, m=12)
    keep_m = expected_keep(12, 2, 3, -1)
    outs = run(session(ranking, 2, 3), inputs)
    scores, kept_ref = reference(ranking, inputs, keep_m)
    check_outputs(outs, inputs, kept_ref, scores, keep_m)


@pytest.mark.parametrize("ranking", op.RANKINGS)
@pytest.mark.parametrize("past", [0, 5])
def test_left_padding_matches_reference(ranking, past):
    pads = [0, 3 + past, 7 + past]                               # three rows, different pad lengths
    inputs = make_inputs(seed_for("pad", ranking, past), ranking=ranking, b=3, n=20, m=10, past=past, pads=pads)
    keep_m = expected_keep(10, 3, 4, -1)
    outs = run(session(ranking, 3, 4), inputs)
    scores, kept_ref = reference(ranking, inputs, keep_m)
    assert torch.isfinite(scores).all()
    check_outputs(outs, inputs, kept_ref, scores, keep_m)


@pytest.mark.parametrize("ranking", ["last", "mean"])
@pytest.mark.parametrize("past", [1, 7, 30])
def test_past_matches_reference(ranking, past):
    inputs = make_inputs(seed_for("past", ranking, past), ranking=ranking, n=16, m=9, past=past)
    keep_m = expected_keep(9, 1, 2, -1)
    outs = run(session(ranking, 1, 2), inputs)
    scores, kept_ref = reference(ranking, inputs, keep_m)
    check_outputs(outs, inputs, kept_ref, scores, keep_m)


@pytest.mark.parametrize("ranking", op.RANKINGS)
def test_mrope_position_ids(ranking):
    inputs = make_inputs(seed_for("mrope", ranking), ranking=ranking, n=21, m=12, position_rank=3)
    keep_m = expected_keep(12, 3, 7, -1)
    outs = run(session(ranking, 3, 7, position_rank=3), inputs)
    assert outs[1].shape == (3, 2, 21 - 12 + keep_m)
    scores, kept_ref = reference(ranking, inputs, keep_m)
    check_outputs(outs, inputs, kept_ref, scores, keep_m)


@pytest.mark.parametrize("ranking", ["last", "mean"])
def test_candidate_scores_agree_numerically(ranking):
    """The body's internal candidate scores (inlined model) against the reference's."""
    sess, name = scores_session(ranking)
    for past, pads in ((0, [0, 4]), (6, [2, 9])):
        inputs = make_inputs(seed_for("scores", ranking, past), ranking=ranking, n=24, m=14, past=past, pads=pads)
        got = sess.run([name], to_feeds(inputs))[0]
        want, _ = reference(ranking, inputs, 7)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)


def test_random_scores_are_bit_exact():
    """Large candidate indices and seeds near 2^31: the int64 hash must not overflow or round."""
    for seed in (0, 1, 12345, 2**31 - 1):
        sess, name = scores_session("random", seed)
        g = torch.Generator().manual_seed(seed % 1000)
        n = 50000
        cand = torch.sort(torch.randperm(n, generator=g)[:3000]).values[None]
        inputs = dict(hidden_states=torch.zeros(1, n, 1), query=torch.zeros(1, 1, 1, 1), key=torch.zeros(1, 1, n, 1),
                      attention_mask=torch.ones(1, n, dtype=torch.int64),
                      position_ids=torch.arange(n)[None], candidate_positions=cand)
        got = sess.run([name], to_feeds(inputs))[0]
        want = ref.random_scores(cand, seed).numpy()
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("ranking", ["last", "mean"])
@pytest.mark.parametrize("num,den,keep", [(1, 2, -1), (2, 3, -1), (0, 1, -1), (1, 2, 4)])
def test_exact_ties_keep_the_lowest_positions(ranking, num, den, keep):
    """key = 0: every visible key gets the same logit. For ``last`` all candidate scores are exactly
    equal (ties everywhere: the lowest positions must win); for ``mean`` earlier keys are seen by more
    rows, so scores decrease with position: again the lowest positions are kept."""
    inputs = make_inputs(seed_for("ties", ranking, num, den, keep), ranking=ranking, n=17, m=10, zero_key=True)
    keep_m = expected_keep(10, num, den, keep)
    sel_h, sel_p, kept = run(session(ranking, num, den, keep), inputs)
    for row in range(2):
        cand = inputs["candidate_positions"][row].tolist()
        chosen = set(cand[:keep_m])                               # ascending: the keep_m lowest
        want = [i for i in range(17) if i not in set(cand) or i in chosen]
        assert kept[row].tolist() == want
    scores, kept_ref = reference(ranking, inputs, keep_m)
    if ranking == "last":
        assert torch.all(scores == scores[:, :1])                 # truly tied in the reference too
    np.testing.assert_array_equal(kept, kept_ref.numpy())


def test_ties_between_equal_scores_only():
    """Candidates in pairs of identical keys (exactly equal scores, different from other pairs)."""
    g = torch.Generator().manual_seed(77)
    n, d = 16, 8
    inputs = make_inputs(78, ranking="last", b=1, n=n, m=8, h=2, hkv=1, head_dim=d)
    cand = torch.tensor([[1, 3, 4, 6, 9, 11, 12, 15]])
    inputs["candidate_positions"] = cand
    key = torch.randn(1, 1, n, d, generator=g)
    for a, b in ((1, 12), (3, 9), (4, 15), (6, 11)):            # position b gets position a's key
        key[0, 0, b] = key[0, 0, a]
    inputs["key"] = key
    for keep in range(0, 9):
        scores, kept_ref = reference("last", inputs, keep)
        outs = run(session("last", 1, 2, keep), inputs)
        np.testing.assert_array_equal(outs[2], kept_ref.numpy())
        check_outputs(outs, inputs, kept_ref, scores, keep)


@pytest.mark.parametrize("ranking", op.RANKINGS)
@pytest.mark.parametrize("position_rank", [2, 3])
def test_fp16_inputs(ranking, position_rank):
    """fp16 in, fp16 out; scores in float32 from the same fp16 values as the reference, so the
    selection agrees except at float32 near-ties."""
    inputs = make_inputs(seed_for("fp16", ranking, position_rank), ranking=ranking, n=22, m=14, pads=[0, 3],
                         dtype=TensorProto.FLOAT16, position_rank=position_rank)
    keep_m = expected_keep(14, 2, 3, -1)
    outs = run(session(ranking, 2, 3, dtype=TensorProto.FLOAT16, position_rank=position_rank), inputs)
    assert outs[0].dtype == np.float16
    scores, kept_ref = reference(ranking, inputs, keep_m)
    check_outputs(outs, inputs, kept_ref, scores, keep_m, tol=1e-5)


@pytest.mark.parametrize("ranking", op.RANKINGS)
def test_bf16_inputs(ranking):
    """bf16 through OrtValues (numpy has no bfloat16); the hidden-state output is read back through an
    appended exact Cast to float32."""
    model = ts.make_token_select_model(ranking=ranking, ratio_num=1, ratio_den=2, scale=SCALE,
                                       dtype=TensorProto.BFLOAT16)
    onnx.checker.check_model(model, full_check=True)
    model.graph.node.append(onnx.helper.make_node("Cast", ["selected_hidden_states"], ["selected_f32"],
                                                  to=TensorProto.FLOAT))
    model.graph.output.append(onnx.helper.make_tensor_value_info("selected_f32", TensorProto.FLOAT, None))
    try:
        sess = _session(model)
    except Exception as exc:  # pragma: no cover - depends on the ORT build
        pytest.skip(f"this onnxruntime has no bf16 kernels for the body: {exc}")
    inputs = make_inputs(seed_for("bf16", ranking), ranking=ranking, n=18, m=10, dtype=TensorProto.BFLOAT16)
    feeds = {}
    for k, v in inputs.items():
        if v.dtype == torch.bfloat16:
            feeds[k] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v.view(torch.int16).numpy().view(np.uint16),
                                                                        TensorProto.BFLOAT16)
        else:
            feeds[k] = ort.OrtValue.ortvalue_from_numpy(v.numpy())
    outs = sess.run_with_ort_values(None, feeds)
    kept, sel_f32 = outs[2].numpy(), outs[3].numpy()
    keep_m = expected_keep(10, 1, 2, -1)
    scores, kept_ref = reference(ranking, inputs, keep_m)
    assert_selection(kept, kept_ref, scores, inputs["candidate_positions"], keep_m, 1e-5)
    hid = inputs["hidden_states"].float().numpy()
    np.testing.assert_array_equal(sel_f32, np.take_along_axis(hid, kept[:, :, None], axis=1))


# ---------------------------------------------------------------------------------------------- N'
SHAPE_TABLE = [  # (N, M, num, den, keep)
    (10, 0, 1, 2, -1), (10, 0, 2, 3, -1), (10, 0, 0, 1, 4),
    (5, 1, 1, 2, -1), (5, 1, 9, 10, -1), (7, 2, 1, 2, -1), (8, 3, 2, 3, -1), (9, 5, 2, 3, -1),
    (12, 7, 3, 7, -1), (12, 6, 3, 7, -1), (20, 13, 4, 9, -1), (20, 9, 4, 9, -1), (20, 17, 8, 9, -1),
    (30, 29, 6, 7, -1), (11, 11, 1, 3, -1), (11, 11, 2, 3, -1), (15, 10, 9, 10, -1), (15, 10, 0, 1, -1),
    (612, 576, 2, 3, -1), (612, 576, 3, 4, -1), (612, 576, 9, 10, -1), (612, 576, 4, 9, -1),
    (612, 576, 1, 2, 64), (612, 576, 1, 2, 576), (612, 576, 1, 2, 1000), (12, 6, 1, 2, 0),
]


@pytest.mark.parametrize("n,m,num,den,keep", SHAPE_TABLE)
def test_output_length_is_a_function_of_shapes(n, m, num, den, keep):
    want = n - m + (min(keep, m) if keep >= 0 else m - (m * num) // den)
    assert want == n - m + expected_keep(m, num, den, keep)     # two independent integer formulas agree
    inputs = make_inputs(seed_for("shape", n, m), ranking="random", b=2, n=n, m=m, d_model=3)
    sel_h, sel_p, kept = run(session("random", num, den, keep), inputs)
    assert sel_h.shape == (2, want, 3) and sel_p.shape == (2, want) and kept.shape == (2, want)


def test_opset_21_body_runs_too():
    model = ts.make_token_select_model(ranking="mean", ratio_num=1, ratio_den=2, scale=SCALE, opset=21)
    onnx.checker.check_model(model, full_check=True)
    inputs = make_inputs(5, ranking="mean", n=12, m=6)
    outs = _session(model).run(None, to_feeds(inputs))
    scores, kept_ref = reference("mean", inputs, 3)
    check_outputs(outs, inputs, kept_ref, scores, 3)
