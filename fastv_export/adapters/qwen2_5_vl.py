"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): Qwen2-VL's M-RoPE and candidate pool; the vision
tower adds window attention, whose window layout the adapter precomputes from the fixed grid."""
from __future__ import annotations

import torch

from fastv_export.adapters.base import register
from fastv_export.adapters.qwen2_vl import Qwen2VLAdapter


@register
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    timed_video_positions = True

    def vision_grid_kwargs(self, grid: torch.Tensor) -> dict:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import get_vision_window_index

        visual = self.model.model.visual
        index, cu_window = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                   window_size=visual.window_size, patch_size=visual.patch_size)
        return {"window_index": index, "cu_window_seqlens": cu_window,
                "max_window_seqlen": get_max_seqlen(cu_window, visual.config)}
