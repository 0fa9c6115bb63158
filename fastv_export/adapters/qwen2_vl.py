"""Qwen2-VL (Qwen2VLForConditionalGeneration): M-RoPE gives every token a (t, h, w) position
triple; images and video frames share one candidate pool."""
from __future__ import annotations

import torch

from fastv_export.adapters.base import Media, ModelAdapter, register
from fastv_export.errors import FastVError
from fastv_export.media import patch_grid

# default image: a 12 x 12 patch grid (168 x 168 pixels at patch 14), one temporal patch
DEFAULT_GRID = (1, 12, 12)


@register
class Qwen2VLAdapter(ModelAdapter):
    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    position_rank = 3
    vision_tracer = "jit"      # the tower loops over the grid in Python
    image_grid = DEFAULT_GRID
    #: whether video temporal positions are scaled by time (tokens_per_second x seconds per temporal patch)
    timed_video_positions: bool = False

    def image_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.image_token_id), int(self.config.video_token_id))

    def image_tokens_per_image(self) -> int:
        t, h, w = self.image_grid
        return t * h * w // self.config.vision_config.spatial_merge_size ** 2

    def image_prompt_tokens(self) -> list[int]:
        c = self.config
        return [int(c.vision_start_token_id)] + [int(c.image_token_id)] * self.image_tokens_per_image() + \
            [int(c.vision_end_token_id)]

    def vision_inputs(self, num_images: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        v = self.config.vision_config
        t, h, w = self.image_grid
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        pixels = torch.randn(num_images * t * h * w, patch_dim, generator=generator)
        return {"pixel_values": pixels, "image_grid_thw": torch.tensor([self.image_grid] * num_images)}

    # --- media: any size that the patch grid divides, videos of several temporal patches -----------
    def media_grid(self, media: Media) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of ``media`` (``image_grid_thw`` / ``video_grid_thw`` of the model)."""
        v = self.config.vision_config
        return patch_grid(media, v.patch_size, v.spatial_merge_size, v.temporal_patch_size, self.image_grid[1:])

    def media_prompt_tokens(self, media: Media) -> list[int]:
        """One block for the whole medium: vision_start, its t * h * w / merge^2 placeholders, vision_end."""
        t, h, w = self.media_grid(media)
        return self.vision_block(media.kind, t * h * w // self.config.vision_config.spatial_merge_size ** 2)

    def vision_block(self, kind: str, count: int) -> list[int]:
        """vision_start, ``count`` image (``kind`` "image") or video placeholders, vision_end."""
        c = self.config
        token = c.video_token_id if kind == "video" else c.image_token_id
        return [int(c.vision_start_token_id)] + [int(token)] * count + [int(c.vision_end_token_id)]

    def media_inputs(self, media: list[Media], generator: torch.Generator) -> dict[str, torch.Tensor]:
        v = self.config.vision_config
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        out: dict[str, torch.Tensor] = {}
        for kind, px_name, grid_name in (("image", "pixel_values", "image_grid_thw"),
                                         ("video", "pixel_values_videos", "video_grid_thw")):
            chosen = [m for m in media if m.kind == kind]
            if not chosen:
                continue
            grids = [self.media_grid(m) for m in chosen]
            out[px_name] = torch.randn(sum(t * h * w for t, h, w in grids), patch_dim, generator=generator)
            out[grid_name] = torch.tensor(grids)
            if kind == "video" and self.timed_video_positions:
                out["second_per_grid_ts"] = torch.tensor([v.temporal_patch_size / m.fps for m in chosen])
        return out

    def vision_units(self, media: list[Media], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One vision-graph call per image and per temporal patch of a video: the tower attends within one
        temporal patch of one medium (its cu_seqlens), so a video is its temporal patches. With the fixed
        layout each must have the exported grid; with ``patch_grid`` (Qwen2.5-VL) any grid."""
        _, h0, w0 = self.image_grid
        taken = {"image": 0, "video": 0}
        units = []
        for m in media:
            t, h, w = self.media_grid(m)
            if self.vision_layout == "fixed" and (h, w) != (h0, w0):
                raise FastVError(f"{m}: the exported vision graph takes images (and video frames) of the exported "
                                 f"grid {h0} x {w0} patches ({h0 * self.config.vision_config.patch_size} px square)")
            px = inputs["pixel_values_videos" if m.kind == "video" else "pixel_values"]
            start = taken[m.kind]
            units += [px[start + i * h * w:start + (i + 1) * h * w] for i in range(t)]
            taken[m.kind] = start + t * h * w
        return units

    def media_features(self, media: list[Media], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The HF model's own image and video features (``get_image_features`` / ``get_video_features``: its
        tower on each whole medium, a video's temporal patches together), in prompt order: the main features
        [F, D], then one [F, D] per DeepStack level (Qwen3-VL)."""
        model = self.model.model
        per_kind = {}
        for kind, px_name, grid_name, encode in (
                ("image", "pixel_values", "image_grid_thw", model.get_image_features),
                ("video", "pixel_values_videos", "video_grid_thw", model.get_video_features)):
            if px_name in inputs:
                out = encode(inputs[px_name], inputs[grid_name])
                levels = list(out.deepstack_features)[:self.deepstack_layers()] if self.deepstack_layers() else []
                per_kind[kind] = zip(out.pooler_output, *levels)     # per medium: (features, level 0, ...)
        per_medium = [next(per_kind[m.kind]) for m in media]
        return [torch.cat([parts[i] for parts in per_medium]) for i in range(1 + self.deepstack_layers())]

    def text_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == c.image_token_id] = 1
        types[input_ids == c.video_token_id] = 2
        return {"mm_token_type_ids": types}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.run_vision_tower(pixel_values).pooler_output

    def run_vision_tower(self, pixel_values: torch.Tensor):
        """The HF tower's output for ONE default-sized image, grid-derived inputs precomputed."""
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        visual = self.model.model.visual
        grid = torch.tensor([self.image_grid])
        # the grid is fixed: precompute what the tower derives from it, so that tracing for export
        # sees constants instead of data-dependent loops
        with torch.no_grad():
            pos = get_vision_position_ids(grid, visual.spatial_merge_size)
            cu, max_len = get_vision_attention_seqlens(grid, visual.config)
            extra = self.vision_grid_kwargs(grid)
        dev = pixel_values.device
        extra = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        return visual(pixel_values, grid_thw=grid.to(dev), position_ids=pos.to(dev), cu_seqlens=cu.to(dev),
                      max_seqlen=max_len, **extra)

    def vision_grid_kwargs(self, grid: torch.Tensor) -> dict:
        """Further grid-derived inputs the vision tower takes precomputed (none for Qwen2-VL)."""
        return {}
