"""Choosing the next token from the logits on the host: greedy, or seeded sampling with temperature,
top-k and top-p (nucleus), written so that another runtime (the C++ one) can reproduce the same draws.

The algorithm, its PRNG (SplitMix64) and the order of every operation are the contract of
docs/design.md §8; this module is its reference implementation (numpy only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastv_export.errors import FastVError

MASK64 = (1 << 64) - 1
#: SplitMix64 (Steele, Lea, Flood 2014; Vigna's splitmix64.c): the state's increment and the two multipliers
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB


def splitmix64_next(state: int) -> tuple[int, int]:
    """One SplitMix64 step: (new state, output), both unsigned 64-bit integers."""
    state = (state + GOLDEN_GAMMA) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * MIX_1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_2) & MASK64
    return state, z ^ (z >> 31)


class SplitMix64:
    """SplitMix64 over one 64-bit state; ``uniform()`` is (next() >> 11) * 2^-53, in [0, 1)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next(self) -> int:
        self.state, out = splitmix64_next(self.state)
        return out

    def uniform(self) -> float:
        return (self.next() >> 11) * 2.0 ** -53


def row_streams(seed: int, batch: int) -> list[SplitMix64]:
    """Row r's generator: SplitMix64 seeded with the r-th output (r = 0, 1, ...) of SplitMix64(seed)."""
    seeder = SplitMix64(seed)
    return [SplitMix64(seeder.next()) for _ in range(batch)]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature`` 0 is greedy (the others are then unused); ``top_k`` 0
    keeps every token; ``top_p`` 1 keeps every token; ``seed`` seeds the draws (docs/design.md §8)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def number(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FastVError(f"sampling parameter {name} must be a finite number, got {value!r}")
            return float(value)

        def integer(name: str, value, high: int, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < high:
                raise FastVError(f"sampling parameter {name} must be an integer in [0, {what}), got {value!r}")

        if number("temperature", self.temperature) < 0:
            raise FastVError(f"sampling parameter temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        integer("top_k", self.top_k, 2 ** 31, "2^31) (0 = every token")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise FastVError(f"sampling parameter top_p must be in (0, 1] (1 = every token), got {self.top_p!r}")
        integer("seed", self.seed, 2 ** 64, "2^64")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def kept_order(z: np.ndarray, top_k: int) -> np.ndarray:
    """The token ids that top-k keeps (all when ``top_k`` is 0 or >= V), by ``z`` descending, equal values
    by ascending id."""
    v = z.shape[0]
    ids = np.arange(v)
    if 0 < top_k < v:
        cut = np.partition(z, v - top_k)[v - top_k]              # the k-th largest value
        above = ids[z > cut]
        ids = np.concatenate([above, ids[z == cut][:top_k - len(above)]])
    return ids[np.lexsort((ids, -z[ids]))]


def sample_row(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    """The token of one row for the uniform draw ``u`` in [0, 1) (docs/design.md §8, steps 2-6)."""
    with np.errstate(over="ignore"):
        z = logits.astype(np.float64) / params.temperature
    order = kept_order(z, params.top_k)
    zs = z[order]
    if not np.isfinite(zs[0]):
        raise FastVError(f"sampling parameter temperature {params.temperature!r} is too small for logits up to "
                         f"{float(np.max(logits))!r} (they overflow); use temperature 0 for greedy")
    e = np.exp(zs - zs[0])
    p = e / np.cumsum(e)[-1]                                      # sequential sums, as a loop writes them
    n = len(p)
    if params.top_p < 1:
        reach = np.nonzero(np.cumsum(p) >= params.top_p)[0]
        n = int(reach[0]) + 1 if len(reach) else n
    q = p[:n] / np.cumsum(p[:n])[-1]
    above = np.nonzero(np.cumsum(q) > u)[0]
    if len(above):
        return int(order[above[0]])
    return int(order[np.nonzero(q > 0)[0][-1]])                  # u beyond the rounded total: the last one


class Sampler:
    """``sampler(logits [B, V]) -> ids [B] int64``: greedy (lowest id among equal maxima) when the
    temperature is 0; otherwise one draw per row per call from the row's own SplitMix64 stream."""

    def __init__(self, params: SamplingParams | None = None, batch: int = 1) -> None:
        if batch < 1:
            raise FastVError(f"a sampler needs a batch of at least 1 row, got {batch}")
        self.params = params or SamplingParams()
        self.batch = batch
        self.streams = row_streams(self.params.seed, batch)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != self.batch or logits.shape[1] < 1:
            raise FastVError(f"the sampler takes logits [{self.batch}, vocab], got shape {list(logits.shape)}")
        if self.params.greedy:
            return logits.argmax(-1).astype(np.int64)
        if not np.all(np.isfinite(logits) | (logits == -np.inf)) or np.any(np.all(logits == -np.inf, axis=1)):
            raise FastVError("the logits to sample from hold NaN or +inf, or a row is all -inf")
        return np.array([sample_row(row, self.params, s.uniform()) for row, s in zip(logits, self.streams)],
                        dtype=np.int64)
