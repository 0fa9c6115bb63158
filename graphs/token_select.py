"""``fastv::TokenSelect``: the ONNX side of the op whose contract is ``docs/token_select.md``.

The op's identity, hash constants and integer rules (keep count, attribute limits) are defined once
in ``fastv_export.graphs.op``; this module only builds the ONNX pieces from them.

- ``token_select_function(ranking)``: the model-local ONNX function (domain ``fastv``, name
  ``TokenSelect``) whose body, made of standard opset-18 ops only, is the reference semantics that
  ONNX Runtime runs and that TensorRT's ONNX parser expands when the plugin library is not loaded.
- ``make_token_select_node(...)``: the one node that calls it, carrying ``plugin_namespace`` /
  ``plugin_version`` so that TensorRT uses the registered ``TokenSelect`` plugin when it is loaded.
- ``make_token_select_model(...)``: a standalone, checker-valid model with the six inputs and three
  outputs, for the ONNX Runtime tests, the TensorRT plugin tests and the kernel tests.

How the function is built: with ``onnx.helper`` through a tiny node builder (``_Body``), not with
onnxscript. The body differs per ranking (one model holds one ranking) and its scalar parameters
(``ratio_num``, ``ratio_den``, ``keep``, ``scale``, ``seed``) must stay *attribute references*
(``Constant`` nodes with ``ref_attr_name``) so that one FunctionProto serves every R / K / seed and
TensorRT's parser sees the same attributes as the plugin. onnx.helper gives exact control over
those references, over the declared attribute list (``ranking``, ``plugin_namespace`` and
``plugin_version`` are declared but unused by the body) and over value names, with no extra
dependency at export time and no translation layer between this file and the proto that ships.

Body, in the order it runs (all scores in float32 whatever T is):

1. keep count from SHAPES only: ``M = Shape(candidates)[1]``,
   ``keep(M) = Where(keep < 0, M - (M*num)//den, Min(keep, M))``, ``N' = N - M + keep(M)``.
2. scores ``[B, S]`` (``last``/``mean``): query reshaped to ``[B, Hkv, G*Nq, d]`` (G = H/Hkv, head
   h = hkv*G + g reads kv head hkv, i.e. h // G) and multiplied with key^T, so the key is never
   copied G times; logits * scale, invisible keys (padding; for ``mean`` also j > S-Nq+r) set to
   the lowest float32 (exp gives exactly 0, as with -inf, without NaN for rows that see nothing),
   Softmax over keys, then ``last``: mean over heads of the last row (0 where that row is padding); ``mean``: rows whose own token
   is padding zeroed (Where, so nothing leaks), summed over rows, divided by max(1, valid rows),
   mean over heads. Candidate scores = GatherElements(scores, P + c), P = S - N.
   ``random``: the int64 hash of the candidate index c (x mod p written as x - (x/p)*p, exact for
   x >= 0), floor(h2/128) * 2^-24 in float32 (exact).
3. selection, exact whatever the backend's TopK does with ties (TensorRT's promises nothing): NaN scores
   become +inf (NaN ranks highest); ``TopK(scores ++ [-inf], max(keep(M), 1))`` gives only the VALUE t of
   the keep(M)-th largest score (+inf when keep(M) = 0); a candidate is kept iff its score > t, or it
   equals t and is among the first ``keep(M) - #(> t)`` such in candidate (= position) order (CumSum).
   Kept positions are then put in ascending order without a sort: position p goes to slot
   ``#kept before p`` if kept, else ``N' + #dropped before p`` (a permutation of [0, N), one
   ScatterElements), and the first N' slots are the kept indices; GatherElements for hidden states and
   position ids. The only TopK has K = max(keep(M), 1) (TensorRT 10: K <= 3840).
   ``last``: a row whose last token is padding (right padding, all padding) gets every score 0.

The body is independent of the rank of ``position_ids``: they are viewed as ``[L, B, N]`` (L = 1
for ``[B, N]``, 3 for M-RoPE ``[3, B, N]``), gathered along the last axis and reshaped back to
``Shape(position_ids)[:-1] + [N']`` (Reshape with allowzero=1, so N' = 0 gives empty outputs). M = 0 gives
the identity (N' = N, kept = 0..N-1).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

# the op's identity, hash constants and integer rules live in graphs/op.py (pure Python)
from fastv_export.graphs import spec
from fastv_export.graphs.op import (HASH_A, HASH_B, HASH_C, HASH_D, HASH_PRIME, HASH_SHIFT, MIN_OPSET, OP_DOMAIN,
                                    OP_TYPE, OP_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION, RANDOM_SCORE_SCALE,
                                    RANKINGS, check_attributes)

# the formal inputs and outputs, named in graphs/spec.py
INPUTS = spec.TOKEN_SELECT_INPUTS
OUTPUTS = spec.TOKEN_SELECT_OUTPUTS
X_IN, Q_IN, K_IN, MASK_IN, POS_IN, CAND_IN = INPUTS
X_OUT, POS_OUT, KEPT_OUT = OUTPUTS
# every attribute the node carries; the body reads the first five through ref_attr_name
ATTRIBUTES = ("ratio_num", "ratio_den", "keep", "scale", "seed", "ranking", "plugin_namespace", "plugin_version")

_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


class _Body:
    """Appends nodes to a function body with readable, unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._used: set[str] = set(INPUTS) | set(OUTPUTS)

    def _name(self, base: str) -> str:
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int | Sequence[str] = 1,
           **attrs) -> str | list[str]:
        if isinstance(outputs, int):
            outs = [self._name(f"{name or op_type.lower()}" + (f"_{k}" if outputs > 1 else ""))
                    for k in range(outputs)]
        else:
            outs = list(outputs)
        # named TokenSelect/<output> so that profilers attribute the inlined body's time to the op
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"TokenSelect/{outs[0]}", **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64, name: str = "const") -> str:
        arr = np.asarray(value, dtype=dtype)
        out = self._name(name)
        self.nodes.append(helper.make_node("Constant", [], [out], name=f"TokenSelect/{out}",
                                           value=onnx.numpy_helper.from_array(arr, out)))
        return out

    def attr(self, attr_name: str, attr_type: int) -> str:
        """A scalar Constant whose value is the calling node's attribute ``attr_name``."""
        field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.FLOAT: "value_float"}[attr_type]
        out = self._name(f"attr_{attr_name}")
        node = helper.make_node("Constant", [], [out])
        # built by hand (older onnx.helper.make_attribute_ref has no ref_attr_name keyword)
        ref = onnx.AttributeProto()
        ref.name, ref.type, ref.ref_attr_name = field, attr_type, attr_name
        node.attribute.append(ref)
        self.nodes.append(node)
        return out


def _scores(b: _Body, ranking: str, dims: dict[str, str]) -> str:
    """Full attention scores [B, S] float32 for ``last`` / ``mean``."""
    zero, one = dims["0"], dims["1"]
    q = b.op("Cast", Q_IN, to=TensorProto.FLOAT, name="query_f32")
    k = b.op("Cast", K_IN, to=TensorProto.FLOAT, name="key_f32")
    q_shape = b.op("Shape", Q_IN, name="query_shape")                       # [B, H, Nq, d]
    k_shape = b.op("Shape", K_IN, name="key_shape")                           # [B, Hkv, S, d]
    bq = b.op("Slice", q_shape, zero, one, name="dim_B")
    h = b.op("Slice", q_shape, one, dims["2"], name="dim_H")
    d = b.op("Slice", q_shape, dims["3"], dims["4"], name="dim_d")
    hkv = b.op("Slice", k_shape, one, dims["2"], name="dim_Hkv")
    s_dim = b.op("Slice", k_shape, dims["2"], dims["3"], name="dim_S")         # [1]
    g = b.op("Div", h, hkv, name="dim_G")
    if ranking == "last":
        q = b.op("Slice", q, dims["-1"], dims["max"], dims["2"], name="query_last_row")   # [B, H, 1, d]
        nq = one
    else:
        nq = b.op("Slice", q_shape, dims["2"], dims["3"], name="dim_Nq")
    # GQA: [B, H, Nq, d] -> [B, Hkv, G*Nq, d] (head h = hkv*G + g), times key^T -> [B, Hkv, G*Nq, S]
    gnq = b.op("Mul", g, nq, name="dim_GNq")
    q_grouped = b.op("Reshape", q, b.op("Concat", bq, hkv, gnq, d, axis=0, name="grouped_shape"),
                     name="query_grouped")
    k_t = b.op("Transpose", k, perm=[0, 1, 3, 2], name="key_t")
    logits = b.op("MatMul", q_grouped, k_t, name="logits_grouped")
    logits = b.op("Reshape", logits, b.op("Concat", bq, h, nq, s_dim, axis=0, name="logits_shape"),
                  name="logits")                                              # [B, H, Nq, S]
    logits = b.op("Mul", logits, b.attr("scale", onnx.AttributeProto.FLOAT), name="logits_scaled")
    key_valid = b.op("Cast", MASK_IN, to=TensorProto.BOOL, name="key_valid")      # [B, S]
    allowed = b.op("Unsqueeze", key_valid, b.const([1, 2]), name="allowed_keys")           # [B, 1, 1, S]
    if ranking == "mean":
        s_scalar = b.op("Squeeze", s_dim, zero, name="S")
        nq_scalar = b.op("Squeeze", nq, zero, name="Nq")
        row_start = b.op("Sub", s_scalar, nq_scalar, name="row_start")        # S - Nq
        one_s = b.const(1, name="one")
        key_pos = b.op("Range", b.const(0, name="zero"), s_scalar, one_s, name="key_pos")        # [S]
        row_pos = b.op("Range", row_start, s_scalar, one_s, name="row_pos")                    # [Nq]
        causal = b.op("LessOrEqual", b.op("Unsqueeze", key_pos, zero, name="key_pos_row"),
                      b.op("Unsqueeze", row_pos, one, name="row_pos_col"), name="causal")      # [Nq, S]
        allowed = b.op("And", allowed, causal, name="allowed")                                 # [B, 1, Nq, S]
    lowest = b.const(np.finfo(np.float32).min, dtype=np.float32, name="lowest")
    masked = b.op("Where", allowed, logits, lowest, name="logits_masked")
    probs = b.op("Softmax", masked, axis=-1, name="probs")                    # [B, H, Nq, S]
    if ranking == "last":
        # a row whose last token (the query row read) is padding: every score 0 (right padding, all padding)
        last_ok = b.op("Slice", key_valid, dims["-1"], dims["max"], one, name="last_row_valid")    # [B, 1]
        scores = b.op("ReduceMean", probs, dims["1,2"], keepdims=0, name="scores_last_row")
        return b.op("Where", last_ok, scores, b.const(0.0, dtype=np.float32, name="zero_f"), name="scores")
    # mean: rows whose own token is padding add nothing; divide by max(1, valid rows)
    row_ok = b.op("Slice", key_valid, b.op("Sub", s_dim, nq, name="row_start_1d"), s_dim, one,
                  name="row_valid")                                           # [B, Nq]
    row_ok4 = b.op("Unsqueeze", row_ok, b.const([1, 3]), name="row_valid_4d")              # [B, 1, Nq, 1]
    probs = b.op("Where", row_ok4, probs, b.const(0.0, dtype=np.float32, name="zero_f"), name="probs_rows")
    total = b.op("ReduceSum", probs, dims["2"], keepdims=0, name="received")               # [B, H, S]
    n_rows = b.op("ReduceSum", b.op("Cast", row_ok, to=TensorProto.FLOAT, name="row_valid_f"), one,
                  keepdims=1, name="n_rows")                                  # [B, 1]
    n_rows = b.op("Max", n_rows, b.const(1.0, dtype=np.float32, name="one_f"), name="n_rows_min1")
    n_rows = b.op("Unsqueeze", n_rows, dims["2"], name="n_rows_3d")           # [B, 1, 1]
    per_head = b.op("Div", total, n_rows, name="received_mean_rows")
    return b.op("ReduceMean", per_head, one, keepdims=0, name="scores")      # [B, S]


def _random_scores(b: _Body) -> str:
    """floor(h2 / 128) * 2^-24 of the doc's int64 hash of the candidate index (exact in float32)."""
    prime = b.const(HASH_PRIME, name="hash_prime")

    def mod_p(x: str, name: str) -> str:       # x >= 0: x mod p = x - (x / p) * p
        return b.op("Sub", x, b.op("Mul", b.op("Div", x, prime, name=f"{name}_quot"), prime,
                                   name=f"{name}_floor"), name=name)

    c = CAND_IN
    seed_term = b.op("Mul", b.attr("seed", onnx.AttributeProto.INT), b.const(HASH_B, name="hash_b"),
                     name="seed_term")
    x1 = b.op("Add", b.op("Add", b.op("Mul", c, b.const(HASH_A, name="hash_a"), name="c_term"), seed_term,
                          name="h1_sum"), b.const(HASH_C, name="hash_c"), name="h1_pre")
    h1 = mod_p(x1, "h1")
    x2 = b.op("Add", b.op("Mul", h1, h1, name="h1_sq"), b.const(HASH_D, name="hash_d"), name="h2_pre")
    h2 = mod_p(x2, "h2")
    top = b.op("Div", h2, b.const(HASH_SHIFT, name="hash_shift"), name="h2_top")
    return b.op("Mul", b.op("Cast", top, to=TensorProto.FLOAT, name="h2_top_f"),
                b.const(RANDOM_SCORE_SCALE, dtype=np.float32, name="two_m24"), name="candidate_scores")


def token_select_function(ranking: str, opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The ``fastv::TokenSelect`` local function for ``ranking`` (standard ops of opset ``opset``).

    One function serves ``position_ids`` of rank 2 (``[B, N]``) and 3 (``[3, B, N]``) alike.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"TokenSelect's body needs opset >= {MIN_OPSET}, got {opset}")
    b = _Body()
    dims = {"0": b.const([0], name="i0"), "1": b.const([1], name="i1"), "2": b.const([2], name="i2"),
            "3": b.const([3], name="i3"), "4": b.const([4], name="i4"), "-1": b.const([-1], name="im1"),
            "max": b.const([np.iinfo(np.int64).max], name="imax"), "1,2": b.const([1, 2], name="i12")}
    zero, one = dims["0"], dims["1"]

    # 1. N' from shapes only
    x_shape = b.op("Shape", X_IN, name="hidden_shape")              # [B, N, D]
    bn = b.op("Slice", x_shape, zero, dims["2"], name="dim_BN")
    n = b.op("Slice", x_shape, one, dims["2"], name="dim_N")
    d_model = b.op("Slice", x_shape, dims["2"], dims["3"], name="dim_D")
    m = b.op("Shape", CAND_IN, start=1, end=2, name="dim_M")    # [1]
    num = b.attr("ratio_num", onnx.AttributeProto.INT)
    den = b.attr("ratio_den", onnx.AttributeProto.INT)
    keep = b.attr("keep", onnx.AttributeProto.INT)
    dropped = b.op("Div", b.op("Mul", m, num, name="m_num"), den, name="dropped")
    keep_ratio = b.op("Sub", m, dropped, name="keep_ratio")
    keep_abs = b.op("Min", b.op("Reshape", keep, one, name="keep_1d"), m, name="keep_abs")
    use_ratio = b.op("Less", keep, b.const(0, name="zero_i"), name="use_ratio")
    keep_m = b.op("Where", use_ratio, keep_ratio, keep_abs, name="keep_m")
    n_kept = b.op("Add", b.op("Sub", n, m, name="n_minus_m"), keep_m, name="n_kept")       # [1]

    # 2. candidate scores [B, M] float32
    if ranking == "random":
        cand = _random_scores(b)
    else:
        full = _scores(b, ranking, dims)                                      # [B, S]
        s_dim = b.op("Shape", K_IN, start=2, end=3, name="dim_S_key")
        past = b.op("Sub", s_dim, n, name="past_len")                         # P = S - N
        cand = b.op("GatherElements", full, b.op("Add", CAND_IN, past, name="cand_key_index"),
                    axis=1, name="candidate_scores")

    # 3. selection, exact and independent of TopK's tie order (TensorRT's TopK promises none): TopK only
    #    finds the VALUE t of the keep(M)-th largest score; candidates above t are kept, and of those equal
    #    to t the lowest positions (a running count in candidate order, which is ascending)
    inf = b.const([np.inf], dtype=np.float32, name="inf")
    cand = b.op("Where", b.op("IsNaN", cand, name="score_is_nan"), inf, cand, name="scores_nan_high")  # NaN first
    pad = b.op("Expand", b.const([[-np.inf]], dtype=np.float32, name="minus_inf"),
               b.op("Concat", b.op("Slice", bn, zero, one, name="dim_B_sel"), one, axis=0, name="pad_shape"),
               name="score_pad")                                                  # [B, 1]
    padded = b.op("Concat", cand, pad, axis=1, name="scores_padded")             # [B, M+1]: K >= 1 always fits
    k_top = b.op("Max", keep_m, one, name="k_top")
    top_vals, _ = b.op("TopK", padded, k_top, axis=1, largest=1, sorted=1, outputs=2, name="top")
    t_raw = b.op("ReduceMin", top_vals, one, keepdims=1, name="threshold_raw")    # [B, 1]
    some_kept = b.op("Greater", keep_m, b.const([0], name="zero_1d"), name="some_kept")
    t = b.op("Where", some_kept, t_raw, inf, name="threshold")                    # keep(M) = 0: nothing passes
    above = b.op("Greater", cand, t, name="above_threshold")                     # [B, M]
    at = b.op("Equal", cand, t, name="at_threshold")
    n_above = b.op("ReduceSum", b.op("Cast", above, to=TensorProto.INT64, name="above_i"), one, keepdims=1,
                   name="n_above")                                                # [B, 1]
    need = b.op("Sub", keep_m, n_above, name="ties_needed")
    axis1 = b.const(1, name="axis_1")
    tie_rank = b.op("CumSum", b.op("Cast", at, to=TensorProto.INT64, name="at_i"), axis1, name="tie_rank")
    chosen = b.op("Or", above, b.op("And", at, b.op("LessOrEqual", tie_rank, need, name="tie_in"),
                                    name="tie_kept"), name="chosen")               # [B, M]
    #    kept mask over [0, N) and the kept indices ascending without a sort: position p goes to slot
    #    (kept before p) if kept, else N' + (dropped before p); the slots are a permutation of [0, N)
    idx = b.op("Range", b.const(0, name="zero_s"), b.op("Squeeze", n, zero, name="N"), b.const(1, name="one_s"),
               name="positions")                                                  # [N]
    idx_bn = b.op("Expand", b.op("Unsqueeze", idx, zero, name="positions_row"), bn, name="positions_bn")
    keep_i = b.op("ScatterElements", b.op("Expand", b.const([1], name="one_i"), bn, name="keep_init"), CAND_IN,
                  b.op("Cast", chosen, to=TensorProto.INT64, name="chosen_i"), axis=1, name="keep_mask")   # [B, N]
    kept_before = b.op("CumSum", keep_i, axis1, exclusive=1, name="kept_before")
    dropped_before = b.op("Sub", idx_bn, kept_before, name="dropped_before")
    slot = b.op("Where", b.op("Cast", keep_i, to=TensorProto.BOOL, name="keep_b"), kept_before,
                b.op("Add", n_kept, dropped_before, name="dropped_slot"), name="slot")
    order = b.op("ScatterElements", idx_bn, slot, idx_bn, axis=1, name="kept_then_dropped")
    b.op("Slice", order, zero, n_kept, one, outputs=[KEPT_OUT])            # [B, N']

    bk = b.op("Shape", KEPT_OUT, name="kept_shape")                     # [B, N']
    gather_x = b.op("Expand", b.op("Unsqueeze", KEPT_OUT, dims["2"], name="kept_3d"),
                    b.op("Concat", bk, d_model, axis=0, name="gather_x_shape"), name="gather_x_index")
    b.op("GatherElements", X_IN, gather_x, axis=1, outputs=[X_OUT])

    pos_shape = b.op("Shape", POS_IN, name="pos_shape")               # [B, N] or [3, B, N]
    pos_lead = b.op("Slice", pos_shape, zero, dims["-1"], name="pos_lead")    # [B] or [3, B]
    pos3 = b.op("Reshape", POS_IN, b.op("Concat", dims["-1"], bn, axis=0, name="pos3_shape"),
                name="pos3")                                                  # [L, B, N]
    l_dim = b.op("Shape", pos3, start=0, end=1, name="dim_L")
    gather_p = b.op("Expand", b.op("Unsqueeze", KEPT_OUT, zero, name="kept_l"),
                    b.op("Concat", l_dim, bk, axis=0, name="gather_p_shape"), name="gather_p_index")
    sel_pos3 = b.op("GatherElements", pos3, gather_p, axis=2, name="selected_pos3")         # [L, B, N']
    # allowzero=1: N' = 0 is a real 0, not "copy the input's dim" (opset >= 14; MIN_OPSET is 18)
    b.op("Reshape", sel_pos3, b.op("Concat", pos_lead, n_kept, axis=0, name="selected_pos_shape"),
         outputs=[POS_OUT], allowzero=1)

    return helper.make_function(
        OP_DOMAIN, OP_TYPE, list(INPUTS), list(OUTPUTS), b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
        doc_string=f"fastv::TokenSelect, ranking={ranking!r} (docs/token_select.md); standard ops only.")


def _check_params(ranking: str, ratio_num: int, ratio_den: int, keep: int, scale: float, seed: int) -> None:
    check_attributes(ranking=ranking, ratio_num=ratio_num, ratio_den=ratio_den, keep=keep, seed=seed)
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def make_token_select_node(inputs: list[str], outputs: list[str], *, ranking: str, ratio_num: int, ratio_den: int,
                           keep: int = -1, scale: float, seed: int = 0,
                           name: str = "fastv_token_select") -> onnx.NodeProto:
    """The ``fastv::TokenSelect`` node (six inputs, three outputs, every attribute of the contract)."""
    _check_params(ranking, ratio_num, ratio_den, keep, scale, seed)
    if len(inputs) != len(INPUTS) or len(outputs) != len(OUTPUTS):
        raise ValueError(f"TokenSelect takes {len(INPUTS)} inputs {INPUTS} and gives {len(OUTPUTS)} outputs "
                         f"{OUTPUTS}; got {len(inputs)} and {len(outputs)}")
    return helper.make_node(
        OP_TYPE, list(inputs), list(outputs), name=name, domain=OP_DOMAIN,
        ranking=ranking, ratio_num=int(ratio_num), ratio_den=int(ratio_den), keep=int(keep),
        scale=float(scale), seed=int(seed), plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)


def make_token_select_model(*, ranking: str, ratio_num: int, ratio_den: int, keep: int = -1, scale: float,
                            seed: int = 0, dtype: int = TensorProto.FLOAT, position_rank: int = 2,
                            opset: int = MIN_OPSET) -> onnx.ModelProto:
    """A standalone model: the six inputs (symbolic dims B, N, D, H, Nq, d, Hkv, S, M), one
    TokenSelect node, its local function, and the three outputs (N' symbolic: ``N_kept``)."""
    if dtype not in _FLOAT_TYPES:
        raise ValueError(f"dtype must be FLOAT, FLOAT16 or BFLOAT16, got {dtype!r}")
    if position_rank not in (2, 3):
        raise ValueError(f"position_rank must be 2 ([B, N]) or 3 ([3, B, N]), got {position_rank!r}")
    i64 = TensorProto.INT64
    pos_in = ["B", "N"] if position_rank == 2 else [3, "B", "N"]
    pos_out = ["B", "N_kept"] if position_rank == 2 else [3, "B", "N_kept"]
    vi = helper.make_tensor_value_info
    graph_inputs = [vi(X_IN, dtype, ["B", "N", "D"]), vi(Q_IN, dtype, ["B", "H", "Nq", "d"]),
                    vi(K_IN, dtype, ["B", "Hkv", "S", "d"]), vi(MASK_IN, i64, ["B", "S"]),
                    vi(POS_IN, i64, pos_in), vi(CAND_IN, i64, ["B", "M"])]
    graph_outputs = [vi(X_OUT, dtype, ["B", "N_kept", "D"]),
                     vi(POS_OUT, i64, pos_out), vi(KEPT_OUT, i64, ["B", "N_kept"])]
    node = make_token_select_node(list(INPUTS), list(OUTPUTS), ranking=ranking, ratio_num=ratio_num,
                                  ratio_den=ratio_den, keep=keep, scale=scale, seed=seed)
    graph = helper.make_graph([node], f"token_select_{ranking}", graph_inputs, graph_outputs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(OP_DOMAIN, OP_VERSION)],
        functions=[token_select_function(ranking, opset)],
        producer_name="fastv-export")
    # the lowest IR version that holds this opset (make_model writes the newest, which ORT may not read)
    model.ir_version = max(8, helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True))
    return model
