"""Gathering the kept tokens: what the decoder layers >= K receive in a pruning prefill.

Layers >= K run on the n' kept tokens at their ORIGINAL positions: their hidden states, the rows and
columns of the 4-D attention mask, the rotary cos / sin and the position ids are all gathered at the
kept positions [B, n'] (ascending). :func:`~fastv_export.reference.fastv.apply_fastv` does it in its
layer hooks; the calibration sweep does the same on the inputs of layer K it recorded once.
"""
from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Gather ``x`` along ``dim`` with per-batch-row indices ``idx`` [B, n']: row b of the result
    holds ``x``'s entries ``idx[b]`` of that axis; ``batch_dim`` is the axis of the batch rows (a
    size-1 batch broadcasts to B)."""
    b = idx.shape[0]
    if x.shape[batch_dim] != b:
        x = x.expand(*x.shape[:batch_dim], b, *x.shape[batch_dim + 1:])
    view = [1] * x.dim()
    view[batch_dim], view[dim] = b, idx.shape[1]
    target = list(x.shape)
    target[dim] = idx.shape[1]
    return torch.gather(x, dim, idx.view(view).expand(target))


def gather_seq(t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The kept positions ``kept`` [B, n'] of a per-token tensor: hidden states or rotary cos / sin
    [B, n, ...] (sequence axis 1), position ids [B, n], or M-RoPE position ids [P, B, n] (an integer
    tensor of rank 3: sequence axis 2, batch axis 1)."""
    if t.dim() == 3 and not t.is_floating_point():
        return gather_rows(t, kept, dim=2, batch_dim=1)
    return gather_rows(t, kept, dim=1)


def prefill_substitutions(layer_kwargs: dict, kept: torch.Tensor, n: int) -> dict:
    """The keyword arguments of a decoder layer >= K that change when it runs on the kept tokens
    ``kept`` [B, n'] of an n-token prefill: the 4-D attention mask (rows and columns), the rotary
    ``position_embeddings`` (cos, sin) and ``position_ids`` when they cover the n tokens. Arguments the
    layer was not given, or that do not follow token positions, are left out (the caller keeps them)."""
    out = {}
    mask = layer_kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        out["attention_mask"] = gather_rows(gather_rows(mask, kept, dim=3), kept, dim=2)
    pe = layer_kwargs.get("position_embeddings")
    if pe is not None:
        out["position_embeddings"] = tuple(gather_seq(t, kept) for t in pe)
    pid = layer_kwargs.get("position_ids")
    if isinstance(pid, torch.Tensor) and pid.shape[-1] == n:
        out["position_ids"] = gather_seq(pid, kept)
    return out
