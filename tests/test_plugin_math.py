"""The TokenSelect plugin's per-element arithmetic (plugins/include/fastv/token_select_math.h) and host code
(plugins/src/token_select_host.cpp), compiled with g++ into a host-only test library
(plugins/tests/math_host.cpp) and compared with the PyTorch reference (fastv_export/selection.py).

The test library also emulates the kernels' passes on the CPU with the same functions (streaming
log-sum-exp over 32-key tiles, column sums over candidate keys only, mean over heads, rank counting,
prefix-sum compaction), so the algorithm the CUDA code implements is checked here, without a GPU."""
from __future__ import annotations

import ctypes
import math
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from fastv_export.reference import selection as ref
from fastv_export.graphs import op
from tests.helpers import c_pointer as ptr

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
RANK = {"last": 0, "mean": 1, "random": 2}
SCALE = 0.25

# (num, den): denominators 3, 7 and 9 included, plus the usual ones
RATIOS = [(0, 1), (1, 2), (1, 3), (2, 3), (1, 4), (3, 4), (1, 7), (3, 7), (6, 7), (1, 9), (4, 9), (8, 9),
          (9, 10), (7, 16), (575, 576)]

i64, f32, u32 = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32
P = ctypes.POINTER


@pytest.fixture(scope="module")
def lib(host_math):
    return host_math




def expected_keep(m: int, num: int, den: int, keep: int = -1) -> int:
    """keep(M) written independently of the code under test (exact rationals)."""
    return min(keep, m) if keep >= 0 else m - math.floor(Fraction(m) * Fraction(num, den))


# ------------------------------------------------------------------------------------------ keep count
def test_keep_count_table(lib):
    ms = list(range(0, 130)) + [575, 576, 577, 1000, 2880, 4096, 100_000, 2**31 - 1]
    checked = 0
    for num, den in RATIOS:
        for m in ms:
            want = expected_keep(m, num, den)
            assert lib.fastv_host_keep_count(m, num, den, -1) == want == op.keep_count(m, num, den), (m, num, den)
            assert lib.fastv_host_kept_length(m + 17, m, num, den, -1) == 17 + want
            checked += 1
    for keep in (0, 1, 5, 576, 10**6):
        for m in (0, 1, 4, 5, 6, 576, 1000):
            assert lib.fastv_host_keep_count(m, 1, 2, keep) == min(keep, m)
    assert checked == len(RATIOS) * len(ms)


@pytest.mark.parametrize("num,den", RATIOS)
def test_m_zero_keeps_everything(lib, num, den):
    assert lib.fastv_host_keep_count(0, num, den, -1) == 0
    assert lib.fastv_host_kept_length(9, 0, num, den, -1) == 9
    assert lib.fastv_host_kept_length(9, 0, num, den, 4) == 9


def test_keep_count_disagrees_with_float_ceil_where_the_design_says():
    """docs/design.md §2: M = 576, R = 2/3 is where a float formula goes wrong; the integer one must not."""
    assert expected_keep(576, 2, 3) == 192


# ------------------------------------------------------------------------------------------ random hash
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**30 + 7, 2**31 - 1])
def test_random_scores_bit_exact(lib, seed):
    g = torch.Generator().manual_seed(seed % 977)
    c = torch.cat([torch.arange(0, 3000), torch.randint(0, 2**31 - 1, (5000,), generator=g),
                   torch.tensor([2**31 - 2, 2**31 - 1])]).numpy().astype(np.int64)
    out = np.empty(c.shape, np.float32)
    lib.fastv_host_random_scores(ptr(c, i64), c.size, seed, ptr(out, f32))
    want = ref.random_scores(torch.from_numpy(c), seed).numpy()
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    assert (out >= 0).all() and (out < 1).all()
    for ci in c[:50].tolist():                                   # the integer hash too
        h1 = (ci * op.HASH_A + seed * op.HASH_B + op.HASH_C) % op.HASH_PRIME
        assert lib.fastv_host_random_hash(ci, seed) == (h1 * h1 + op.HASH_D) % op.HASH_PRIME


# ------------------------------------------------------------------------------------------ order, softmax
def test_order_key_is_monotone_and_ties_go_to_the_lower_position(lib):
    vals = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-38, 1e-7, 0.25, 0.5, 1.0, 3e38, np.inf], np.float32)
    keys = [lib.fastv_host_order_key(float(v)) for v in vals]
    assert keys[3] == keys[4]                                    # -0 == +0
    assert all(a < b for a, b in zip(keys[:3] + keys[4:], keys[1:3] + keys[5:]))
    assert lib.fastv_host_order_key(float("nan")) > keys[-1]     # NaN ranks highest, as in torch.sort
    assert lib.fastv_host_ranks_before(0.5, 3, 0.25, 1) == 1
    assert lib.fastv_host_ranks_before(0.25, 1, 0.5, 3) == 0
    assert lib.fastv_host_ranks_before(0.5, 2, 0.5, 7) == 1     # equal scores: lower position first
    assert lib.fastv_host_ranks_before(0.5, 7, 0.5, 2) == 0
    assert lib.fastv_host_ranks_before(0.5, 7, 0.5, 7) == 0


@pytest.mark.parametrize("tile", [1, 32])
def test_online_softmax_lse(lib, tile):
    g = torch.Generator().manual_seed(tile)
    for n in (1, 5, 31, 32, 33, 200):
        x = (torch.randn(n, generator=g) * 8).numpy().astype(np.float32)
        x[::3] = -np.inf                                         # invisible keys
        if np.isinf(x).all():
            x[0] = 0.0
        got = lib.fastv_host_lse(ptr(x, f32), n, tile)
        want = torch.logsumexp(torch.from_numpy(x).double(), 0).item()
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    none = np.full(7, -np.inf, np.float32)
    assert lib.fastv_host_lse(ptr(none, f32), 7, tile) == np.inf  # a row that sees nothing: p = 0 everywhere


# ------------------------------------------------------------------------------------------ scores
def make_case(seed, *, b=2, n=40, m=17, h=4, hkv=2, d=16, past=0, pads=None, nq=None, zero_key=False):
    g = torch.Generator().manual_seed(seed)
    s = past + n
    nq = n if nq is None else nq
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.zeros(b, hkv, s, d) if zero_key else torch.randn(b, hkv, s, d, generator=g)
    mask = torch.ones(b, s, dtype=torch.int64)
    for i, p in enumerate(pads or [0] * b):
        mask[i, :p] = 0
    cand = []
    for i in range(b):
        first = max(0, (pads or [0] * b)[i] - past)
        pool = torch.arange(first, n)
        cand.append(torch.sort(pool[torch.randperm(len(pool), generator=g)[:m]]).values)
    cand = torch.stack(cand) if m else torch.zeros(b, 0, dtype=torch.int64)
    return dict(q=q, k=k, mask=mask, cand=cand, n=n)


def host_scores(lib, ranking, case, seed=0):
    q = case["q"].numpy().astype(np.float32)
    k = case["k"].numpy().astype(np.float32)
    mask = np.ascontiguousarray(case["mask"].numpy())
    cand = np.ascontiguousarray(case["cand"].numpy())
    b, h, nq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    m = cand.shape[1]
    dims = np.array([b, case["n"], h, nq, d, hkv, s, m], np.int64)
    out = np.zeros((b, m), np.float32)
    lib.fastv_host_scores(RANK[ranking], ptr(q, f32), ptr(k, f32), ptr(mask, i64), ptr(cand, i64), ptr(dims, i64),
                          SCALE, seed, ptr(out, f32))
    return out


def ref_scores(ranking, case, seed=0):
    cand, n = case["cand"], case["n"]
    if ranking == "random":
        return ref.random_scores(cand, seed)
    valid = case["mask"].bool()
    full = (ref.score_last if ranking == "last" else ref.score_mean)(case["q"], case["k"], valid, SCALE)
    past = case["k"].shape[2] - n
    return torch.gather(full, 1, cand + past)


def host_select(lib, scores, cand, n, keep_m):
    scores = np.ascontiguousarray(scores, np.float32)
    cand = np.ascontiguousarray(cand, np.int64)
    b, m = cand.shape
    kept = np.full((b, n - m + keep_m), -7, np.int64)
    bad = lib.fastv_host_select(ptr(scores, f32), ptr(cand, i64), b, n, m, keep_m, ptr(kept, i64))
    return kept, bad


def assert_selection(kept, kept_ref, scores_ref, cand, keep_m, tol):
    """Kept sets equal, except swaps between candidates whose reference scores lie within ``tol`` of the
    cut-off (the keep_m-th best reference score of the row)."""
    kept_ref = np.asarray(kept_ref)
    assert kept.shape == kept_ref.shape
    for row in range(kept.shape[0]):
        assert np.all(np.diff(kept[row]) > 0), kept[row]
        if np.array_equal(kept[row], kept_ref[row]):
            continue
        by_pos = dict(zip(cand[row].tolist(), np.asarray(scores_ref[row]).tolist()))
        cutoff = sorted(by_pos.values(), reverse=True)[keep_m - 1] if keep_m else None
        for p in set(kept[row].tolist()) ^ set(kept_ref[row].tolist()):
            assert p in by_pos, f"row {row}: non-candidate {p} differs"
            assert cutoff is not None and abs(by_pos[p] - cutoff) <= tol, (row, p, by_pos[p], cutoff)


CASES = {
    "plain": dict(),
    "gqa_4_1": dict(h=4, hkv=1),
    "mha": dict(h=3, hkv=3),
    "past": dict(past=9),
    "padding": dict(b=3, pads=[0, 5, 12]),
    "padding_past": dict(b=2, past=6, pads=[2, 10]),
    "odd_dims": dict(n=70, m=33, d=40, h=6, hkv=3),                # several key tiles, head_dim not /32
    "one_candidate": dict(m=1),
}


@pytest.mark.parametrize("ranking", ["last", "mean"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_scores_match_reference(lib, ranking, case_name):
    kw = dict(CASES[case_name])
    if ranking == "last":
        kw["nq"] = 1                                             # exporters pass Nq = 1 for `last`
    case = make_case(zlib.crc32(case_name.encode()) % 1000 + len(ranking), **kw)
    got = host_scores(lib, ranking, case)
    want = ref_scores(ranking, case).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_last_reads_only_the_last_query_row(lib):
    case = make_case(5, nq=7)
    got = host_scores(lib, "last", case)
    case1 = dict(case, q=case["q"][:, :, -1:].contiguous())
    np.testing.assert_array_equal(got, host_scores(lib, "last", case1))


@pytest.mark.parametrize("ranking", ["last", "mean", "random"])
@pytest.mark.parametrize("num,den", [(1, 2), (2, 3), (3, 7), (4, 9), (0, 1), (8, 9)])
def test_selection_matches_reference(lib, ranking, num, den):
    case = make_case(num * 31 + den, b=3, n=45, m=24, pads=[0, 4, 9], nq=1 if ranking == "last" else None)
    keep_m = expected_keep(24, num, den)
    scores = host_scores(lib, ranking, case, seed=11)
    kept, bad = host_select(lib, scores, case["cand"].numpy(), case["n"], keep_m)
    assert bad == 0
    want_scores = ref_scores(ranking, case, seed=11)
    kept_ref = ref.select_kept(want_scores, case["cand"], case["n"], keep_m).numpy()
    if ranking == "random":                                      # bit-exact scores: identical selection
        np.testing.assert_array_equal(kept, kept_ref)
    else:
        assert_selection(kept, kept_ref, want_scores.numpy(), case["cand"].numpy(), keep_m, tol=1e-6)
    # every non-candidate is kept
    for row in range(3):
        assert set(range(case["n"])) - set(case["cand"][row].tolist()) <= set(kept[row].tolist())


@pytest.mark.parametrize("ranking", ["last", "mean"])
@pytest.mark.parametrize("keep", [0, 1, 4, 10, 99])
def test_exact_ties_keep_the_lowest_positions(lib, ranking, keep):
    """key = 0: every visible key gets the same logit; `last` ties everywhere, `mean` decreases with
    position. Either way the lowest candidate positions are kept, exactly as the reference does."""
    case = make_case(keep + 3, n=30, m=10, zero_key=True, nq=1 if ranking == "last" else None)
    keep_m = min(keep, 10)
    scores = host_scores(lib, ranking, case)
    kept, bad = host_select(lib, scores, case["cand"].numpy(), 30, keep_m)
    kept_ref = ref.select_kept(ref_scores(ranking, case), case["cand"], 30, keep_m).numpy()
    np.testing.assert_array_equal(kept, kept_ref)
    for row in range(2):
        cand = case["cand"][row].tolist()
        assert kept[row].tolist() == [i for i in range(30) if i not in cand or i in cand[:keep_m]]


def test_selection_ties_in_pairs(lib):
    scores = np.array([[0.5, 0.25, 0.5, 0.25, 0.75, 0.75, 0.1, 0.5]], np.float32)
    cand = np.array([[1, 3, 4, 6, 9, 11, 12, 15]], np.int64)
    for keep_m in range(9):
        kept, _ = host_select(lib, scores, cand, 16, keep_m)
        want = ref.select_kept(torch.from_numpy(scores), torch.from_numpy(cand), 16, keep_m).numpy()
        np.testing.assert_array_equal(kept, want)


def test_no_candidates_is_the_identity(lib):
    kept, bad = host_select(lib, np.zeros((2, 0), np.float32), np.zeros((2, 0), np.int64), 11, 0)
    assert bad == 0
    np.testing.assert_array_equal(kept, np.tile(np.arange(11), (2, 1)))


@pytest.mark.parametrize("bad_cand", [[1, 1, 5], [5, 3, 7], [-1, 2, 3], [2, 4, 12]])
def test_malformed_candidates_poison_the_row(lib, bad_cand):
    cand = np.array([[0, 2, 4], bad_cand], np.int64)
    kept, bad = host_select(lib, np.array([[0.1, 0.2, 0.3]] * 2, np.float32), cand, 12, 2)
    assert bad == 1
    np.testing.assert_array_equal(kept[1], -1)
    np.testing.assert_array_equal(kept[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])


# ------------------------------------------------------------------------------------------ validation
def validate(lib, *, ranking="mean", num=1, den=2, keep=-1, scale=0.125, seed=0, shapes=None):
    shapes = shapes or {}
    base = dict(hidden=[2, 30, 8], query=[2, 4, 30, 16], key=[2, 2, 30, 16], mask=[2, 30], pos=[2, 30], cand=[2, 12])
    base.update(shapes)
    order = ["hidden", "query", "key", "mask", "pos", "cand"]
    ranks = np.array([len(base[k]) for k in order], np.int32)
    dims = np.zeros((6, 8), np.int64)
    for i, k in enumerate(order):
        dims[i, :len(base[k])] = base[k]
    buf = ctypes.create_string_buffer(512)
    rc = lib.fastv_host_validate(RANK.get(ranking, -1), num, den, keep, scale, seed, ptr(ranks, ctypes.c_int32),
                                 ptr(dims, i64), buf, 512)
    return rc, buf.value.decode()


@pytest.mark.parametrize("change,needle", [
    (dict(ranking="top"), "ranking"),
    (dict(num=2, den=2), "ratio_num"),
    (dict(den=0), "ratio_den"),
    (dict(keep=-2), "keep"),
    (dict(seed=2**31), "seed"),
    (dict(scale=float("inf")), "scale"),
    (dict(shapes=dict(hidden=[2, 30])), "rank 3"),
    (dict(shapes=dict(pos=[4, 2, 30])), "M-RoPE"),
    (dict(shapes=dict(key=[2, 3, 30, 16])), "multiple of key heads"),
    (dict(shapes=dict(cand=[2, 31])), "M = 31"),
    (dict(shapes=dict(key=[2, 2, 20, 16], mask=[2, 20])), "at least N"),
    (dict(shapes=dict(query=[2, 4, 30, 8])), "head_dim"),
    (dict(shapes=dict(mask=[3, 30])), "batch"),
    (dict(shapes=dict(pos=[2, 29])), "position_ids length"),
    (dict(shapes=dict(query=[2, 4, 31, 16])), "Nq"),
])
def test_validation_names_the_problem(lib, change, needle):
    rc, msg = validate(lib, **change)
    assert rc == 1 and needle in msg, msg


def test_validation_accepts_good_and_unknown_dims(lib):
    assert validate(lib) == (0, "")
    assert validate(lib, shapes=dict(pos=[3, 2, 30]))[0] == 0
    assert validate(lib, shapes=dict(cand=[2, 0]))[0] == 0
    assert validate(lib, shapes=dict(hidden=[-1, -1, 8], cand=[-1, -1]))[0] == 0     # dynamic at build time
    # random reads neither query nor key: any rank-4 tensors
    assert validate(lib, ranking="random", shapes=dict(query=[1, 1, 1, 1], key=[1, 1, 1, 1]))[0] == 0
    assert lib.fastv_host_ranking_from_name(b"mean") == 1 and lib.fastv_host_ranking_from_name(b"Mean") == -1


def test_workspace_is_monotone_and_covers_the_passes(lib):
    def ws(ranking, b, n, h, nq, hkv, s, m):
        return lib.fastv_host_workspace_size(RANK[ranking], ptr(np.array([b, n, h, nq, hkv, s, m], np.int64), i64))

    for ranking in RANK:
        small = ws(ranking, 1, 100, 8, 100, 2, 100, 50)
        for bigger in ([2, 100, 8, 100, 2, 100, 50], [1, 200, 8, 100, 2, 200, 50], [1, 100, 8, 100, 2, 100, 90]):
            assert ws(ranking, *bigger) >= small
    # mean keeps one lse per (b, h, row) and one column sum per (b, h, candidate)
    assert ws("mean", 1, 8192, 32, 8192, 8, 8192, 4096) >= 4 * 32 * (8192 + 4096)
    assert ws("random", 1, 8192, 32, 8192, 8, 8192, 4096) < ws("last", 1, 8192, 32, 8192, 8, 8192, 4096)
