"""torch modules that torch.onnx exports as the split graphs (vision, embed, pre-K, post-K).

They call the model's own decoder layers, rotary embedding, norm and head (nothing re-implemented)
with plain tensors in and out, in the order of the graph spec (fastv_export/graphs/spec.py): the
KV cache enters as one past key and value tensor per layer and leaves as the present ones; the
attention mask is the Optimum-style [B, past + n] 0/1 mask, turned into a causal additive mask
here. Layer K-1's post-rotary query and key leave pre-K as extra outputs that graph surgery
(graphs/surgery.py) wires into the TokenSelect node.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fastv_export.adapters import ModelAdapter
from fastv_export.reference.capture import capture_query_key



class _TensorCache:
    """The minimal cache interface HF attention layers call: ``update`` concatenates the past."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], first_layer: int) -> None:
        self.past = past
        self.first_layer = first_layer
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        pk, pv = self.past[layer_idx - self.first_layer]
        k = torch.cat([pk, key], dim=2)
        v = torch.cat([pv, value], dim=2)
        self.present.append((k, v))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[0][0].shape[2]


def causal_mask(attention_mask: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 0/1 mask (S = past + n) -> additive [B, 1, n, S]: query i sees key j iff
    j <= S - n + i and attention_mask[j] = 1. Padded query rows see themselves (finite rows)."""
    s = attention_mask.shape[1]
    q_pos = torch.arange(n, device=attention_mask.device)[:, None] + (s - n)
    k_pos = torch.arange(s, device=attention_mask.device)[None, :]
    visible = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()
    visible = visible | (k_pos == q_pos)[None, None]
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min)


class DecoderSlice(nn.Module):
    """Decoder layers [start, stop) with tensor KV cache I/O."""

    def __init__(self, adapter: ModelAdapter, start: int, stop: int) -> None:
        super().__init__()
        text = adapter.text_model()
        self.layers = nn.ModuleList(list(text.layers)[start:stop])
        self.rotary_emb = text.rotary_emb
        self.start = start

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            past: list[torch.Tensor], after: dict[int, torch.Tensor] | None = None):
        """``after``: {model layer index: [B, n, D]} added to that layer's output (DeepStack levels placed
        at the visual positions, zeros elsewhere: x + 0 leaves the other tokens exactly as they are)."""
        n = hidden.shape[1]
        mask = causal_mask(attention_mask, n, hidden.dtype)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        cache = _TensorCache([(past[2 * i], past[2 * i + 1]) for i in range(len(self.layers))], self.start)
        for i, layer in enumerate(self.layers, start=self.start):
            out = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=None,
                        past_key_values=cache, use_cache=True)
            hidden = out[0] if isinstance(out, tuple) else out
            if after and i in after:
                hidden = hidden + after[i].to(hidden.dtype)
        return hidden, [t for kv in cache.present for t in kv]


class PreK(DecoderSlice):
    """Layers < K. Returns (hidden, query of layer K-1 [last row or all rows], key of layer K-1
    with past, presents...)."""

    def __init__(self, adapter: ModelAdapter, k: int, query_rows: str) -> None:
        super().__init__(adapter, 0, k)
        self.stop = k
        self.query_rows = query_rows
        self.holder: dict[str, torch.Tensor] = {}
        # a private copy of layer K-1 whose attention reports its query and key; the model is untouched
        self.layers[k - 1] = copy.deepcopy(self.layers[k - 1])
        capture_query_key(self.layers[k - 1].self_attn, self._captured)

    def _captured(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        self.holder["query"], self.holder["key"] = query, key

    def forward(self, embeds, mask, positions, *rest):
        """``rest``: the past of layers < K, then the DeepStack levels (all L of them; those >= K are
        gathered at the kept positions by graph surgery, after TokenSelect)."""
        past, deepstack = list(rest[:2 * self.stop]), rest[2 * self.stop:]
        hidden, present = self.run(embeds, mask, positions, past,
                                   {i: d for i, d in enumerate(deepstack) if i < self.stop})
        q = self.holder.pop("query")
        k = self.holder.pop("key")
        if self.query_rows == "last":
            q = q[:, :, -1:, :]
        return (hidden, q, k, *present)


class PostK(DecoderSlice):
    """Layers >= K, final norm and lm_head on the last position only (logits [B, 1, V]): the next
    token needs no other row, and the head over every prompt row would cost 2*n'*D*V FLOPs and a
    [B, n', V] output for nothing (as TensorRT-LLM, which gathers context logits only on request)."""

    def __init__(self, adapter: ModelAdapter, k: int) -> None:
        num_layers = adapter.decoder_shape().num_layers
        super().__init__(adapter, k, num_layers)
        self.num_past = 2 * (num_layers - k)
        self.norm = adapter.text_model().norm
        self.lm_head = adapter.lm_head()

    def forward(self, hidden, mask, positions, *rest):
        """``rest``: the past of layers >= K, then the kept DeepStack levels K <= l < L."""
        past, deepstack = list(rest[:self.num_past]), rest[self.num_past:]
        hidden, present = self.run(hidden, mask, positions, past,
                                   {self.start + i: d for i, d in enumerate(deepstack)})
        return (self.lm_head(self.norm(hidden[:, -1:])), *present)


class Embed(nn.Module):
    """Token embedding with image features placed at the image-token positions, in order:
    ids [B, n], features [F, D] (F = image tokens of the whole batch) -> [B, n, D]."""

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self.embed_tokens = adapter.text_model().embed_tokens
        self.register_buffer("image_ids", torch.tensor(adapter.image_token_ids()), persistent=False)

    def forward(self, ids, features, *deepstack):
        """``deepstack``: the DeepStack levels' features [F, D] (DeepStack families), each placed like
        ``features`` on zeros: -> (embeddings, one [B, n, D] per level)."""
        emb = self.embed_tokens(ids)
        is_image = (ids[..., None] == self.image_ids).any(-1)
        order = torch.cumsum(is_image.reshape(-1).to(torch.int64), 0) - 1
        # image-token ids beyond the features given (e.g. generated during decode, F = 0) keep their
        # token embedding, as in the HF model; one zero row keeps the gather in bounds when F = 0
        is_image = is_image & (order < features.shape[0]).reshape(is_image.shape)
        index = order.clamp(min=0, max=features.shape[0])

        def place(rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
            table = torch.cat([rows.to(emb.dtype), emb.new_zeros(1, emb.shape[-1])], dim=0)
            return torch.where(is_image[..., None], table[index].reshape(emb.shape), base)

        placed = place(features, emb)
        if not deepstack:
            return placed
        zeros = torch.zeros_like(emb)
        return (placed, *(place(d, zeros) for d in deepstack))


class Vision(nn.Module):
    """Vision tower + projector: the inputs of one vision-graph call (one default-sized image, or one unit
    of the family's dynamic layout, see graphs/spec.py ``vision_graph``) -> its features [tokens, D] in
    prompt order (and the DeepStack levels of DeepStack families)."""

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def forward(self, pixels, *layout_inputs):
        return self.adapter.encode_unit(pixels, *layout_inputs)
