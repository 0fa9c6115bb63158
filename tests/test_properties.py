"""Randomized property tests (seeded): TokenSelect's three implementations agree on random inputs.

Per case a random configuration: prompt length n, candidate count M and layout (ascending, among each
row's real tokens), an exact rational R or an absolute keep, the ranking (last / mean / random), query
heads and GQA ratio, head_dim, batch, LEFT padding, a past (cache) length and the position rank. Three
implementations run on the same inputs:

- the PyTorch reference (fastv_export/reference/selection.py),
- the ONNX function body (graphs/token_select.py) in ONNX Runtime, with its internal candidate scores
  exposed by inlining the function,
- the plugin's host math (plugins/include/fastv/token_select_math.h, plugins/src/token_select_host.cpp)
  through the host-only test library (plugins/tests/math_host.cpp), compiled here with g++.

They must agree on the kept positions (tie-aware: a swap is accepted only between candidates whose
reference scores lie within TIE_TOL of the row's cut-off) and, for last/mean, on the candidate scores
within tolerance; the seeded random ranking must be bit-exact. Right padding is not generated.

The end-to-end part (``slow``): random small configurations exported and validated (reference vs
ONNX Runtime tokens)."""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from fastv_export.graphs import op
from fastv_export.graphs import token_select as ts
from fastv_export.reference import selection as ref
from tests.helpers import c_pointer as _ptr

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
CASES = 320
SEED = 20261126
RANK = {"last": 0, "mean": 1, "random": 2}
SCORE_RTOL, SCORE_ATOL = 1e-4, 1e-6
TIE_TOL = 1e-5

i64, f32 = ctypes.c_int64, ctypes.c_float
P = ctypes.POINTER


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (several threads on a busy 2-core machine cost ~30x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def host_lib(host_math):
    """The plugin's host math (session fixture of conftest.py)."""
    return host_math




@functools.lru_cache(maxsize=256)
def _onnx_session(ranking: str, num: int, den: int, keep: int, seed: int, scale: float, position_rank: int):
    """The TokenSelect model with its function inlined and ``candidate_scores`` [B, M] as a 4th output."""
    model = ts.make_token_select_model(ranking=ranking, ratio_num=num, ratio_den=den, keep=keep, scale=scale,
                                       seed=seed, dtype=TensorProto.FLOAT, position_rank=position_rank)
    model = onnx.inliner.inline_local_functions(model)
    name = next(o for n in model.graph.node for o in n.output if o.startswith("candidate_scores"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "M"]))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- cases
RATIO_DENS = (1, 2, 3, 4, 5, 7, 9, 10, 16)


@dataclass
class Case:
    ranking: str
    b: int
    n: int
    m: int
    past: int
    pads: list[int]
    h: int
    hkv: int
    head_dim: int
    d_model: int
    num: int
    den: int
    keep: int           # -1: the ratio
    seed: int
    scale: float
    position_rank: int

    @property
    def nq(self) -> int:
        return self.n if self.ranking == "mean" else 1


def random_case(index: int) -> Case:
    rng = np.random.default_rng([SEED, index])
    ranking = op.RANKINGS[index % 3]
    b = int(rng.integers(1, 4))
    n = int(rng.integers(1, 41))
    m = 0 if rng.random() < 0.05 else int(rng.integers(1, n + 1))
    past = int(rng.integers(1, 7)) if rng.random() < 0.25 else 0
    pads = [0] * b
    for row in range(1, b):                          # LEFT padding; row 0 stays full
        # new tokens of a row that are real: n - max(0, pad - past) >= max(m, 1)
        most = past + n - max(m, 1)
        pads[row] = int(rng.integers(0, most + 1)) if most > 0 and rng.random() < 0.7 else 0
    hkv = int(rng.integers(1, 4))
    h = hkv * int(rng.integers(1, 4))
    head_dim = int(rng.choice([1, 2, 3, 4, 8, 16, 33]))
    if rng.random() < 0.3:
        num, den, keep = 0, 1, int(rng.integers(0, m + 4))
    else:
        den = int(rng.choice(RATIO_DENS))
        num, keep = int(rng.integers(0, den)), -1
        g = math.gcd(num, den)
        num, den = num // g, den // g
    seed = int(rng.choice([0, 1, 12345, 2**31 - 1]))
    scale = float(rng.choice([0.25, 1.0 / math.sqrt(head_dim), 1.0]))
    return Case(ranking, b, n, m, past, pads, h, hkv, head_dim, int(rng.integers(1, 9)), num, den, keep, seed,
                scale, int(rng.choice([2, 3])))


def make_inputs(c: Case, index: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + index)
    s = c.past + c.n
    hidden = torch.randn(c.b, c.n, c.d_model, generator=g)
    query = torch.randn(c.b, c.h, c.nq, c.head_dim, generator=g)
    key = torch.randn(c.b, c.hkv, s, c.head_dim, generator=g)
    mask = torch.ones(c.b, s, dtype=torch.int64)
    cand = []
    for row, p in enumerate(c.pads):
        mask[row, :p] = 0
        pool = torch.arange(max(0, p - c.past), c.n)             # the row's real new tokens
        cand.append(torch.sort(pool[torch.randperm(len(pool), generator=g)[:c.m]]).values)
    cand = torch.stack(cand) if c.m else torch.zeros(c.b, 0, dtype=torch.int64)
    pos = (torch.cumsum(mask, 1)[:, c.past:] - 1).clamp(min=0) + 100 * torch.arange(c.b)[:, None]
    if c.position_rank == 3:
        pos = torch.stack([pos, pos + 1000, pos + 2000])
    return dict(hidden_states=hidden, query=query, key=key, attention_mask=mask, position_ids=pos,
                candidate_positions=cand)


def expected_keep(m: int, num: int, den: int, keep: int) -> int:
    """keep(M) written independently of the code under test (exact rationals)."""
    return min(keep, m) if keep >= 0 else m - math.floor(Fraction(m) * Fraction(num, den))


def reference(c: Case, inputs: dict, keep_m: int) -> tuple[np.ndarray, np.ndarray]:
    cand = inputs["candidate_positions"]
    if c.ranking == "random":
        scores = ref.random_scores(cand, c.seed)
    else:
        fn = ref.score_last if c.ranking == "last" else ref.score_mean
        full = fn(inputs["query"], inputs["key"], inputs["attention_mask"].bool(), c.scale)
        scores = torch.gather(full, 1, cand + c.past)
    return scores.numpy(), ref.select_kept(scores, cand, c.n, keep_m).numpy()


def host(lib, c: Case, inputs: dict, keep_m: int) -> tuple[np.ndarray, np.ndarray, int]:
    q = np.ascontiguousarray(inputs["query"].numpy(), np.float32)
    k = np.ascontiguousarray(inputs["key"].numpy(), np.float32)
    mask = np.ascontiguousarray(inputs["attention_mask"].numpy())
    cand = np.ascontiguousarray(inputs["candidate_positions"].numpy())
    dims = np.array([c.b, c.n, c.h, c.nq, c.head_dim, c.hkv, c.past + c.n, c.m], np.int64)
    scores = np.zeros((c.b, c.m), np.float32)
    lib.fastv_host_scores(RANK[c.ranking], _ptr(q, f32), _ptr(k, f32), _ptr(mask, i64), _ptr(cand, i64),
                          _ptr(dims, i64), c.scale, c.seed, _ptr(scores, f32))
    kept = np.full((c.b, c.n - c.m + keep_m), -7, np.int64)
    bad = lib.fastv_host_select(_ptr(scores, f32), _ptr(cand, i64), c.b, c.n, c.m, keep_m, _ptr(kept, i64))
    return scores, kept, bad


def assert_same_selection(kept, kept_ref, scores_ref, cand, keep_m, what):
    """Equal kept sets, except swaps between candidates within TIE_TOL of the row's cut-off."""
    assert kept.shape == kept_ref.shape, (what, kept.shape, kept_ref.shape)
    for row in range(kept.shape[0]):
        assert np.all(np.diff(kept[row]) > 0), (what, row, kept[row])
        if np.array_equal(kept[row], kept_ref[row]):
            continue
        by_pos = dict(zip(cand[row].tolist(), scores_ref[row].tolist()))
        cutoff = sorted(by_pos.values(), reverse=True)[keep_m - 1] if keep_m else None
        for p in set(kept[row].tolist()) ^ set(kept_ref[row].tolist()):
            assert p in by_pos, f"{what} row {row}: non-candidate {p} differs"
            assert cutoff is not None and abs(by_pos[p] - cutoff) <= TIE_TOL, (
                f"{what} row {row}: candidate {p} (score {by_pos[p]}) swapped, cut-off {cutoff}")


# ---------------------------------------------------------------------------------------------- the property
@pytest.mark.parametrize("index", range(CASES))
def test_reference_onnx_body_and_plugin_host_agree(index, host_lib, one_thread):
    c = random_case(index)
    inputs = make_inputs(c, index)
    keep_m = expected_keep(c.m, c.num, c.den, c.keep)
    assert op.keep_count(c.m, c.num, c.den, c.keep) == keep_m == host_lib.fastv_host_keep_count(c.m, c.num, c.den,
                                                                                                 c.keep)
    n_kept = c.n - c.m + keep_m
    assert host_lib.fastv_host_kept_length(c.n, c.m, c.num, c.den, c.keep) == n_kept
    cand = inputs["candidate_positions"].numpy()
    scores_ref, kept_ref = reference(c, inputs, keep_m)
    assert np.isfinite(scores_ref).all(), c

    # ONNX function body in ONNX Runtime
    sess = _onnx_session(c.ranking, c.num, c.den, c.keep, c.seed, c.scale, c.position_rank)
    sel_h, sel_p, kept_onnx, scores_onnx = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert kept_onnx.shape == (c.b, n_kept) and kept_onnx.dtype == np.int64, c
    assert_same_selection(kept_onnx, kept_ref, scores_ref, cand, keep_m, f"onnx {c}")
    hid = inputs["hidden_states"].numpy()
    np.testing.assert_array_equal(sel_h, np.take_along_axis(hid, kept_onnx[:, :, None], axis=1))
    pos = inputs["position_ids"].numpy()
    want_pos = (np.take_along_axis(pos, kept_onnx, axis=1) if pos.ndim == 2
                else np.take_along_axis(pos, np.broadcast_to(kept_onnx, (3,) + kept_onnx.shape), axis=2))
    np.testing.assert_array_equal(sel_p, want_pos)

    # the plugin's host math
    scores_host, kept_host, bad = host(host_lib, c, inputs, keep_m)
    assert bad == 0, c
    assert_same_selection(kept_host, kept_ref, scores_ref, cand, keep_m, f"plugin host {c}")

    # every non-candidate kept, by all three
    for row in range(c.b):
        others = set(range(c.n)) - set(cand[row].tolist())
        for kept in (kept_ref, kept_onnx, kept_host):
            assert others <= set(kept[row].tolist()), c

    # scores: bit-exact for the seeded hash, within tolerance for attention
    if c.ranking == "random":
        np.testing.assert_array_equal(scores_onnx.view(np.uint32), scores_ref.view(np.uint32))
        np.testing.assert_array_equal(scores_host.view(np.uint32), scores_ref.view(np.uint32))
        np.testing.assert_array_equal(kept_onnx, kept_ref)
        np.testing.assert_array_equal(kept_host, kept_ref)
    else:
        np.testing.assert_allclose(scores_onnx, scores_ref, rtol=SCORE_RTOL, atol=SCORE_ATOL, err_msg=str(c))
        np.testing.assert_allclose(scores_host, scores_ref, rtol=SCORE_RTOL, atol=SCORE_ATOL, err_msg=str(c))


def test_the_cases_cover_the_space():
    """The seeded generator reaches every ranking, GQA, padding, past, keep and ratio mode, and both ranks."""
    cases = [random_case(i) for i in range(CASES)]
    assert {c.ranking for c in cases} == set(op.RANKINGS)
    assert any(c.h > c.hkv for c in cases) and any(c.h == c.hkv for c in cases)
    assert sum(any(c.pads) for c in cases) > CASES // 4
    assert any(c.past for c in cases) and any(c.m == 0 for c in cases)
    assert any(c.keep >= 0 for c in cases) and any(c.keep > c.m for c in cases)
    assert len({(c.num, c.den) for c in cases if c.keep < 0}) > 15
    assert {c.position_rank for c in cases} == {2, 3} and {c.b for c in cases} == {1, 2, 3}
    assert all(pad == 0 or c.b > 1 for c in cases for pad in c.pads[:1])             # row 0: never padded


# ---------------------------------------------------------------------------------------------- end to end
E2E_CASES = 20
E2E_RATIOS = ("0", "1/3", "1/2", "2/3", "3/4", "3/7", "4/9", "9/10")


def e2e_config(index: int) -> tuple[str, int, str, str]:
    rng = np.random.default_rng([SEED, 99, index])
    model = ("tiny-llava", "tiny-qwen2-vl")[index % 2]
    k = int(rng.integers(1, 4))                                   # the tiny models have 4 layers
    ratio = str(rng.choice(E2E_RATIOS))
    ranking = str(rng.choice(op.RANKINGS))
    return model, k, ratio, ranking


@pytest.mark.slow
@pytest.mark.parametrize("index", range(E2E_CASES))
def test_random_small_configurations_validate_end_to_end(index, exported_bundle, tmp_path):
    from fastv_export.validate import validate_bundle

    model, k, ratio, ranking = e2e_config(index)
    path = exported_bundle(model, k, ratio, ranking)
    report = validate_bundle(path, max_new_tokens=8, batch_sizes=(1,), report_dir=tmp_path)
    assert report["passed"], (model, k, ratio, ranking, str(report["cases"])[:2000])
    for case in report["cases"]:
        assert case["tokens_identical"], (model, k, ratio, ranking)


def test_e2e_configurations_are_distinct_and_varied():
    configs = [e2e_config(i) for i in range(E2E_CASES)]
    assert len(set(configs)) == E2E_CASES
    assert {c[0] for c in configs} == {"tiny-llava", "tiny-qwen2-vl"}
    assert {c[3] for c in configs} == set(op.RANKINGS) and len({c[1] for c in configs}) == 3
