"""Greedy decoding that continues from a prefilled state: the reference's decode loop over a KV cache.

:func:`prefill` runs the model once on a prompt and keeps what decoding needs (:class:`Prefilled`:
the first generated token's logits, the KV cache, the prompt's position ids as the text model's
rotary embedding received them); :func:`greedy_decode` continues from such a state. The state may
come from elsewhere: the calibration sweep builds one per FastV configuration from a single
unpruned prefill, whose pruned cache holds n keys in layers < K and n' in layers >= K.

Hugging Face ``generate`` cannot continue from such a cache (it takes the cache length of layer 0
for the number of tokens seen, and builds one attention mask for every layer), so this loop runs the
decoder layers itself, one token per step, with no attention mask (an unpadded row attends to every
cached key of each layer, whatever that layer's length). Positions follow the project's rule
(docs/design.md): decode step t of a row uses (max prompt position of the row) + 1 + t, on every
M-RoPE axis alike -- what ``generate`` with :func:`~fastv_export.reference.fastv.apply_fastv`
computes on the same prompt (tests/test_calibrate.py compares the tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastv_export.adapters import get_adapter
from fastv_export.errors import FastVError
from fastv_export.runtime.positions import decode_positions


@dataclass
class Prefilled:
    """Where greedy decoding starts: the logits [B, V] of the last prompt position (they give the
    first generated token), the KV cache of the prompt (a ``transformers`` cache; its layers may hold
    different lengths) and the prompt's position ids [B, n] (RoPE) or [3, B, n] (M-RoPE)."""
    logits: torch.Tensor
    cache: Any
    positions: torch.Tensor


@torch.no_grad()
def prefill(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Prefilled:
    """Run ``model(**inputs)`` once with a cache and keep the state :func:`greedy_decode` continues from."""
    rotary = get_adapter(model).text_model().rotary_emb
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["position_ids"] if "position_ids" in kwargs else args[1])
    hook = rotary.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model(**inputs, use_cache=True)
    finally:
        hook.remove()
    return Prefilled(out.logits[:, -1].float(), out.past_key_values, seen[-1])


@torch.no_grad()
def greedy_decode(model: nn.Module, state: Prefilled, max_new_tokens: int, eos_token_id: int | None = None,
                  pad_token_id: int = 0) -> list[list[int]]:
    """Greedy tokens of every row, up to ``max_new_tokens`` (the first from ``state.logits``), each row
    cut after its end-of-sequence token; decoding stops when every row has ended. The rows must be
    unpadded prompts; ``state.cache`` grows by one token per step. Finished rows are fed
    ``pad_token_id`` (their tokens are not returned)."""
    if max_new_tokens < 1:
        raise FastVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if getattr(model, "_fastv_handle", None) is not None:
        raise FastVError("greedy_decode runs the decoder layers itself and cannot run under apply_fastv: "
                         "remove the handle first (or use model.generate under apply_fastv)")
    adapter = get_adapter(model)
    text_model, layers = adapter.text_model(), adapter.layers()
    embed, head = model.get_input_embeddings(), adapter.lm_head()
    m_rope = state.positions.dim() == 3
    nxt = state.logits.argmax(dim=-1)
    done = torch.zeros_like(nxt, dtype=torch.bool)
    tokens = [nxt]
    prompt_positions = state.positions.cpu().numpy()
    for step in range(max_new_tokens - 1):
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        if bool(done.all()):
            break
        h = embed(torch.where(done, torch.full_like(nxt, pad_token_id), nxt)[:, None])
        # the rule is written once, for every runtime (fastv_export/runtime/positions.py)
        pos = torch.from_numpy(decode_positions(prompt_positions, step)).to(h.device)
        pe = text_model.rotary_emb(h, position_ids=pos)
        # M-RoPE text models pass their layers no position ids for plain 3-axis positions; RoPE ones the [B, 1] ids
        layer_pos = None if m_rope else pos
        for layer in layers:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=layer_pos,
                      past_key_values=state.cache, use_cache=True)
            h = h[0] if isinstance(h, tuple) else h
        nxt = head(text_model.norm(h))[:, -1].float().argmax(dim=-1)
        tokens.append(nxt)
    rows = torch.stack(tokens, dim=1).tolist()
    return [_until_eos(row, eos_token_id) for row in rows]


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens
