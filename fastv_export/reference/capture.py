"""Reading a decoder layer's post-rotary query and key without changing what the layer computes.

FastV ranks the image tokens with layer K-1's attention. The query and key it needs exist only
inside the attention module, after the rotary embedding: :func:`capture_query_key` gives that
module a private config copy whose attention implementation is ``fastv_capture``, a function that
hands the query and key to a callback and then calls the model's original implementation (SDPA,
FlashAttention or eager) unchanged. The implementation is registered with transformers' attention
interface the first time a capture is installed, never at import.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch
from torch import nn

from fastv_export.errors import FastVError

CAPTURE_IMPL = "fastv_capture"

#: ``on_capture(query, key, scale)``: post-rotary query [B, H, Nq, d] and key [B, Hkv, N, d] of one call
OnCapture = Callable[[torch.Tensor, torch.Tensor, float], None]


def original_attention(attn: nn.Module, impl: str | None):
    """The attention function a module's config names (the model's own eager one for "eager")."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in (None, "eager"):
        return sys.modules[type(attn).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, **kwargs):
    on_capture, original = module._fastv_capture
    on_capture(query, key, kwargs.get("scaling") or module.scaling)
    return original(module, query, key, value, attention_mask, **kwargs)


def register_capture() -> None:
    """Register ``fastv_capture`` with transformers' attention interface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)   # a mapping entry: the same one each time


def capture_query_key(attn: nn.Module, on_capture: OnCapture) -> Callable[[], None]:
    """Make every call of the attention module ``attn`` (a decoder layer's ``self_attn``) pass its
    post-rotary query and key, and the softmax scale, to ``on_capture`` before its original
    attention implementation runs unchanged. Returns the undo, which restores ``attn`` exactly."""
    if getattr(attn, "_fastv_capture", None) is not None:
        raise FastVError(f"{type(attn).__name__} is already captured (FastV applied twice?); undo the first capture")
    register_capture()
    config = attn.config
    private = copy.copy(config)
    private._attn_implementation_internal = CAPTURE_IMPL
    attn._fastv_capture = (on_capture, original_attention(attn, config._attn_implementation))
    attn.config = private

    def undo() -> None:
        attn.config = config
        del attn._fastv_capture
    return undo
