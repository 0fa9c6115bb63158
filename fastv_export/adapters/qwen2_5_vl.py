"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): Qwen2-VL's M-RoPE and candidate pool; the vision
tower adds window attention. The vision graph takes one image or one temporal patch of a video of any
size the patch grid divides (layout ``patch_grid``): the host computes the grid-derived inputs the tower
would derive in Python (each patch's grid position, the window layout), and attention within each
window, or over the whole call, is one masked attention over the call's patches."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from fastv_export.adapters.base import register
from fastv_export.adapters.qwen2_vl import Qwen2VLAdapter

#: the vision attention used while the tower runs as the graph does: one masked attention per call
MASKED_VARLEN = "fastv_export_masked_varlen_flash"   # "flash" routes HF to its packed-sequence call


def masked_varlen_attention(module, query, key, value, attention_mask=None, scaling=None, cu_seq_lens_q=None,
                            **kwargs):
    """Attention over packed sequences [1, heads, n, d] whose boundaries are ``cu_seq_lens_q`` (0, ends...):
    a query sees the keys of its own sequence. The same result as HF's per-sequence loop, as one masked
    product whose shapes follow n (traceable with a dynamic patch count)."""
    n = query.shape[2]
    seq = (torch.arange(n, device=query.device)[:, None] >= cu_seq_lens_q[None, 1:]).sum(-1)
    same = seq[:, None] == seq[None, :]
    bias = torch.zeros(same.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~same, torch.finfo(query.dtype).min)
    weights = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling + bias, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def _register() -> None:
    """Register :func:`masked_varlen_attention` with transformers (idempotent; when first used, not at import)."""
    from transformers import AttentionInterface

    AttentionInterface.register(MASKED_VARLEN, masked_varlen_attention)


@contextmanager
def _masked_vision_attention(visual):
    _register()
    config = visual.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = MASKED_VARLEN
    try:
        yield
    finally:
        config._attn_implementation_internal = before


@register
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    timed_video_positions = True
    vision_layout = "patch_grid"
    vision_tracer = "dynamo"    # the grid-derived inputs come in as tensors: nothing left to unroll

    def vision_grid_kwargs(self, grid: torch.Tensor) -> dict:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import get_vision_window_index

        visual = self.model.model.visual
        index, cu_window = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                   window_size=visual.window_size, patch_size=visual.patch_size)
        return {"window_index": index, "cu_window_seqlens": cu_window,
                "max_window_seqlen": get_max_seqlen(cu_window, visual.config)}

    # --- the vision graph: one image or temporal patch of any size per call ----------------------------
    def vision_layout_params(self) -> dict:
        v = self.config.vision_config
        return {"patch_size": int(v.patch_size), "temporal_patch_size": int(v.temporal_patch_size),
                "spatial_merge_size": int(v.spatial_merge_size), "window_size": int(v.window_size)}

    def vision_example(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The default image's pixels with its grid-derived inputs, from the model's own helpers."""
        from transformers.vision_utils import get_vision_position_ids

        grid = torch.tensor([self.image_grid])
        extra = self.vision_grid_kwargs(grid)
        return (pixels, get_vision_position_ids(grid, self.config.vision_config.spatial_merge_size),
                extra["window_index"].to(torch.int64), extra["cu_window_seqlens"].to(torch.int64))

    def encode_unit(self, pixels, position_ids, window_index, cu_window_seqlens):
        """The tower + merger on one call's patches (graphs/spec.py, layout ``patch_grid``)."""
        visual = self.model.model.visual
        n = pixels.shape[0]
        whole = torch.cat([cu_window_seqlens.new_zeros(1), cu_window_seqlens.new_ones(1) * n])
        with _masked_vision_attention(visual):
            # the max_*seqlen values only size flash kernels, which the masked attention does not use
            return visual(pixels, grid_thw=None, position_ids=position_ids, cu_seqlens=whole, max_seqlen=1,
                          window_index=window_index, cu_window_seqlens=cu_window_seqlens,
                          max_window_seqlen=1).pooler_output
