"""fastv_export.runtime.sampling (docs/design.md §8): the PRNG against its published values, parameter checks,
greedy limits, reproducibility, and the empirical distribution of seeded draws against the tempered,
truncated softmax computed here (chi-square at p = 0.001)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fastv_export.errors import FastVError
from fastv_export.runtime.sampling import Sampler, SamplingParams, SplitMix64, row_streams

#: the chi-square test's normal quantile: Phi^-1(0.999) (p = 0.001, one-sided)
Z_999 = 3.090232306167813


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Wilson-Hilferty: chi2_df quantile ~= df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    assert expected.min() >= 5, "every cell needs an expected count of at least 5"
    return float(((counts - expected) ** 2 / expected).sum())


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def draws(params: SamplingParams, logits: np.ndarray, rows: int, steps: int) -> np.ndarray:
    """rows x steps tokens from one sampler (every row the same logits)."""
    s = Sampler(params, rows)
    batch = np.repeat(logits[None].astype(np.float32), rows, axis=0)
    return np.stack([s(batch) for _ in range(steps)], axis=1)


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, 1.0, 1.5, -1.0], dtype=np.float32)


def test_splitmix64_matches_its_published_outputs():
    """Published reference outputs: seed 1234567 (Rosetta Code, "Pseudo-random numbers/Splitmix64") and seed 0
    (Vigna's splitmix64.c); a C++ port is checked against the same numbers."""
    g = SplitMix64(1234567)
    assert [g.next() for _ in range(5)] == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                            4593380528125082431, 16408922859458223821]
    g = SplitMix64(0)
    assert [g.next() for _ in range(4)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F,
                                            0xF88BB8A8724C81EC]
    # the uniforms: (x >> 11) * 2^-53, exactly
    g = SplitMix64(0)
    assert g.uniform() == (0xE220A8397B1DCDAF >> 11) / 2 ** 53
    # row streams: row r is seeded with the r-th output of SplitMix64(seed); values of a C run of the same rule
    rows = row_streams(42, 3)
    assert [r.uniform() for r in rows] == [0.34329192209867343, 0.9867112511075029, 0.00037612960331478984]
    assert [r.uniform() for r in rows] == [0.9557467261317436, 0.30866257268220887, 0.7936910819618254]


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"seed": -1}, "seed"), ({"seed": 2 ** 64}, "seed"),
])
def test_bad_parameters_are_one_line_errors_naming_the_field(kwargs, field):
    with pytest.raises(FastVError, match=rf"^sampling parameter {field} must [^\n]*$"):
        SamplingParams(**kwargs)


def test_sampler_checks_the_logits_shape():
    with pytest.raises(FastVError, match=r"takes logits \[2, vocab\], got shape \[3, 8\]"):
        Sampler(SamplingParams(temperature=1.0), 2)(np.zeros((3, 8), np.float32))
    with pytest.raises(FastVError, match="NaN"):
        Sampler(SamplingParams(temperature=1.0), 1)(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(FastVError, match="temperature 1e-320 is too small"):
        Sampler(SamplingParams(temperature=1e-320), 1)(np.array([[1.0, 2.0]], np.float32))


def test_temperature_zero_is_argmax_with_the_lowest_id_on_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    logits[1, [3, 17]] = 9.0                                     # a tie: the lower id wins
    out = Sampler(SamplingParams(temperature=0.0, seed=5), 4)(logits)
    assert out.dtype == np.int64
    expected = [max(range(50), key=lambda j: (logits[r, j], -j)) for r in range(4)]
    assert out.tolist() == expected and out[1] == 3


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.3, top_k=1, seed=7),
                                    SamplingParams(temperature=2.0, top_p=1e-9, seed=8)],
                         ids=["top_k=1", "top_p-tiny"])
def test_top_k_one_and_tiny_top_p_equal_greedy(params):
    rng = np.random.default_rng(1)
    s = Sampler(params, 6)
    for _ in range(20):
        logits = rng.normal(scale=3.0, size=(6, 100)).astype(np.float32)
        logits[0, [10, 20]] = logits.max() + 1                   # ties at the top: the lower id
        assert s(logits).tolist() == [int(np.flatnonzero(row == row.max())[0]) for row in logits]


def test_seeded_draws_are_reproducible_and_another_seed_differs():
    a = draws(SamplingParams(temperature=1.0, seed=123), LOGITS, 4, 50)
    b = draws(SamplingParams(temperature=1.0, seed=123), LOGITS, 4, 50)
    c = draws(SamplingParams(temperature=1.0, seed=124), LOGITS, 4, 50)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) == 4                       # rows draw from their own streams


def test_empirical_distribution_matches_the_tempered_softmax():
    """4,000 draws (8 rows x 500 steps) at temperature 0.7: chi-square against softmax(logits / 0.7) below
    the p = 0.001 critical value; the untempered softmax, a wrong distribution, is rejected by the same test."""
    t = 0.7
    tokens = draws(SamplingParams(temperature=t, seed=2024), LOGITS, 8, 500).ravel()
    counts = np.bincount(tokens, minlength=len(LOGITS))
    df = len(LOGITS) - 1
    crit = chi2_critical(df)
    assert 24.0 < crit < 24.6                                   # chi2_7 at 0.999 is 24.32
    assert chi2(counts, softmax64(LOGITS.astype(np.float64) / t)) < crit
    assert chi2(counts, softmax64(LOGITS.astype(np.float64))) > crit


@pytest.mark.parametrize("top_k,top_p,kept", [
    (3, 1.0, [0, 6, 1]),                # the three largest; 1 and 5 tie at 1.0: the lower id (1) is kept
    (0, 0.8, [0, 6, 1, 5]),             # the smallest prefix by probability whose sum reaches 0.8
    (5, 0.8, [0, 6, 1, 5]),             # top-k first (0, 6, 1, 5, 2), then top-p on the renormalised five
])
def test_top_k_and_top_p_keep_exactly_their_tokens_with_renormalised_probabilities(top_k, top_p, kept):
    t = 1.0
    p = softmax64(LOGITS.astype(np.float64) / t)
    order = sorted(range(len(LOGITS)), key=lambda j: (-LOGITS[j], j))
    k = top_k or len(LOGITS)
    first = np.array(order[:k])
    q = p[first] / p[first].sum()
    n = int(np.argmax(np.cumsum(q) >= top_p)) + 1 if top_p < 1 else k
    assert sorted(first[:n].tolist()) == sorted(kept)            # the rule computed here, on these logits
    tokens = draws(SamplingParams(temperature=t, top_k=top_k, top_p=top_p, seed=99), LOGITS, 10, 250).ravel()
    counts = np.bincount(tokens, minlength=len(LOGITS))
    assert set(np.flatnonzero(counts).tolist()) == set(kept)     # excluded tokens never appear
    expected = p[kept] / p[kept].sum()
    assert chi2(counts[kept], expected) < chi2_critical(len(kept) - 1)


def test_negative_infinity_logits_are_never_drawn():
    logits = np.array([[0.0, -np.inf, 0.5, -np.inf]], np.float32)
    s = Sampler(SamplingParams(temperature=1.0, seed=3), 1)
    assert set(int(s(logits)[0]) for _ in range(300)) == {0, 2}
