"""The FastV authors' decode semantics, as a comparison mode of the PyTorch reference.

The authors' main evaluation code (a transformers-4.31 fork, ``use_cache=False``) re-runs the whole
sequence -- prompt plus the tokens generated so far -- for every generated token, and prunes inside
each of those forwards: the image tokens are re-ranked at layer K-1 with the NEWEST token's
attention row (ranking ``last``; ``mean`` averages over all rows of the current sequence), so the
kept set may change from one generated token to the next. Only their later KV-cache variant prunes
once, in prefill, as this project (and every exported graph) does.

This mode cannot use a KV cache (the kept set of layers >= K changes every step), so it exists
only here, never in the graphs. Each step is exactly one no-cache prefill of
:func:`~fastv_export.reference.fastv.apply_fastv` on the current sequence.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fastv_export.adapters import get_adapter
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.reference.fastv import apply_fastv

log = logging.getLogger(__name__)


@dataclass
class RerankResult:
    """Greedy tokens [B, T] (T <= max_new_tokens; a finished row is padded with ``pad_token_id``)
    and, per step, the kept positions [B, n'_t] of that step's forward (None when nothing was pruned)."""
    tokens: torch.Tensor
    kept_per_step: list[torch.Tensor | None] = field(default_factory=list)


@torch.no_grad()
def generate_rerank(model: nn.Module, config: FastVConfig, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, max_new_tokens: int = 16,
                    eos_token_id: int | None = None, pad_token_id: int = 0, **vision) -> RerankResult:
    """Greedy generation with the authors' re-rank-every-step semantics: for each new token, run the
    whole current sequence without a cache under FastV (ranked afresh with its newest row) and take
    the argmax of the last position. ``vision``: the model's pixel inputs (``pixel_values``, ...) and
    per-token inputs beside ``input_ids`` (the adapter's ``text_inputs``, e.g. Qwen2-VL's
    ``mm_token_type_ids``: recomputed for the grown sequence at each step). Rows that emitted
    ``eos_token_id`` are finished (padded with ``pad_token_id``); generation ends when every row is."""
    if max_new_tokens < 1:
        raise FastVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = input_ids
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    adapter = get_adapter(model)
    per_token = [name for name in adapter.text_inputs(ids) if name in vision]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, kept = [], []
    with apply_fastv(model, config) as handle:
        for _ in range(max_new_tokens):
            grown = {name: value for name, value in adapter.text_inputs(ids).items() if name in per_token}
            inputs = {**vision, **grown}
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **inputs).logits[:, -1]
            kept.append(None if handle.kept_positions is None else handle.kept_positions.clone())
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            tokens.append(nxt)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)   # finished rows: ignored
            if bool(done.all()):
                break
    return RerankResult(torch.stack(tokens, dim=1), kept)
