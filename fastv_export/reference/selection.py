"""FastV scoring and selection in PyTorch: the normative semantics of docs/design.md §2.

Everything here works from layer K-1's post-rotary query and key (never a materialised n x n
attention map), in float32, so the same functions serve the plug-and-play reference, the
validation of the ONNX function body and the plugin's kernel tests.
"""
from __future__ import annotations

import torch

from fastv_export.graphs import op

MEAN_ROW_CHUNK = 256


def random_scores(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded pseudo-random scores in [0, 1) for token positions (same shape, float32).

    The integer hash of (seed, position) of ``fastv_export.graphs.op`` (``op.random_score_int``),
    vectorised: the ONNX function body and the CUDA plugin compute it bit-exactly too (int64
    arithmetic, result < 2^24 so float32 holds it exactly).
    """
    if not 0 <= seed < op.SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^31), got {seed}")
    p = positions.to(torch.int64)
    h1 = (p * op.HASH_A + seed * op.HASH_B + op.HASH_C) % op.HASH_PRIME
    h2 = (h1 * h1 + op.HASH_D) % op.HASH_PRIME
    return (h2 // op.HASH_SHIFT).to(torch.float32) * op.RANDOM_SCORE_SCALE


def _expand_kv_heads(key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, S, d] -> [B, H, S, d] for grouped-query attention (head h reads kv head h // (H/Hkv))."""
    hkv = key.shape[1]
    if num_heads % hkv:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key heads ({hkv})")
    return key.repeat_interleave(num_heads // hkv, dim=1)


def _masked_logits(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor) -> torch.Tensor:
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    return logits.masked_fill(~allowed, float("-inf"))


def score_last(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last query row over all S keys, softmax per head, mean over heads.

    query [B, H, Nq, d] (post-rotary), key [B, Hkv, S, d] (post-rotary, past included),
    key_valid [B, S] bool (False = padding). Returns [B, S] float32.

    A batch row whose last token (the query row read, at position S - 1) is padding (right padding, or a
    row that is all padding) gets every score 0, as in the ONNX function body and the plugin; the selection
    then keeps the lowest candidate positions. ``apply_fastv`` refuses such batches (FastVError).
    """
    q = query[:, :, -1:, :].float()
    k = _expand_kv_heads(key.float(), q.shape[1])
    valid = key_valid.bool()
    allowed = valid[:, None, None, :]
    probs = torch.softmax(_masked_logits(q, k, scale, allowed), dim=-1)
    scores = probs[:, :, 0, :].mean(dim=1)
    return torch.where(valid[:, -1:], scores, torch.zeros((), dtype=scores.dtype, device=scores.device))


def score_mean(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor, scale: float,
               row_chunk: int = MEAN_ROW_CHUNK) -> torch.Tensor:
    """Attention received by each key, summed over all valid causal query rows, divided by the
    number of valid rows n, averaged over heads. Rows that cannot see a key add zero.

    Query row i sits at absolute position S - Nq + i. Memory is O(row_chunk * S), never Nq x S.
    Returns [B, S] float32.
    """
    b, h, nq, _ = query.shape
    s = key.shape[2]
    k = _expand_kv_heads(key.float(), h)
    valid = key_valid.bool()
    total = torch.zeros(b, h, s, dtype=torch.float32, device=query.device)
    key_pos = torch.arange(s, device=query.device)
    for start in range(0, nq, row_chunk):
        stop = min(nq, start + row_chunk)
        q = query[:, :, start:stop, :].float()
        row_pos = torch.arange(start, stop, device=query.device) + (s - nq)
        causal = key_pos[None, :] <= row_pos[:, None]                      # [r, S]
        allowed = causal[None, None] & valid[:, None, None, :]              # [B, 1, r, S]
        probs = torch.softmax(_masked_logits(q, k, scale, allowed), dim=-1)
        row_ok = valid[:, row_pos]                                          # [B, r]
        probs = torch.nan_to_num(probs, nan=0.0) * row_ok[:, None, :, None]
        total += probs.sum(dim=2)
    n_rows = valid[:, s - nq:].sum(dim=1).clamp(min=1).to(torch.float32)
    return (total / n_rows[:, None, None]).mean(dim=1)


def select_kept(candidate_scores: torch.Tensor, candidates: torch.Tensor, seq_len: int,
                keep: int) -> torch.Tensor:
    """Kept positions [B, seq_len - M + keep], ascending: every non-candidate position plus the
    ``keep`` best-scoring candidates (ties go to the lower position).

    candidate_scores [B, M] float, candidates [B, M] int64 ascending.
    """
    b, m = candidates.shape
    if not 0 <= keep <= m:
        raise ValueError(f"keep={keep} must be within [0, {m}]")
    keep_mask = torch.ones(b, seq_len, dtype=torch.bool, device=candidates.device)
    if m:
        # stable sort on descending score: equal scores keep ascending position order
        order = torch.sort(candidate_scores.float(), dim=1, descending=True, stable=True).indices
        chosen = torch.gather(candidates, 1, order[:, :keep])
        keep_mask.scatter_(1, candidates, False)
        keep_mask.scatter_(1, chosen, True)
    n_kept = seq_len - m + keep
    return keep_mask.nonzero()[:, 1].view(b, n_kept)


def candidate_scores(ranking: str, candidates: torch.Tensor, *, seed: int = 0,
                     query: torch.Tensor | None = None, key: torch.Tensor | None = None,
                     key_valid: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """Scores [B, M] of the candidates under ``ranking`` (query/key from layer K-1, no past)."""
    if ranking == "random":
        return random_scores(candidates, seed)
    if query is None or key is None or key_valid is None:
        raise ValueError(f"ranking {ranking!r} needs layer K-1's query, key and padding mask")
    full = score_last(query, key, key_valid, scale) if ranking == "last" else score_mean(query, key, key_valid, scale)
    return torch.gather(full, 1, candidates)
