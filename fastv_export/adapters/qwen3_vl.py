"""Qwen3-VL (Qwen3VLForConditionalGeneration): Qwen2-VL's image tokens and M-RoPE positions (the
rotary embedding interleaves the t/h/w frequencies: the model's own, so nothing changes here), plus
DeepStack: after each of the first decoder layers the model adds features of an intermediate vision
layer to the hidden states at the visual positions. With FastV those layers >= K run on the kept
tokens, so their DeepStack rows must be the kept visual positions' rows, in kept order.

Videos follow the Qwen3-VL processor: each temporal patch is its own block (timestamp text, vision_start,
its video tokens, vision_end), positioned like an image; image and video DeepStack rows lie in position
order, as the model merges them."""
from __future__ import annotations

from typing import Callable

import torch

from fastv_export.adapters.base import Media, register
from fastv_export.adapters.qwen2_vl import Qwen2VLAdapter


def deepstack_at_kept(visual_mask: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepStack injection of one layer, restricted to the kept positions.

    ``visual_mask`` [B, n] bool (the visual positions), ``rows`` [F, D] (the features of the visual
    positions, batch rows in order, positions ascending; every row has F / B of them), ``kept`` [B, n']
    ascending -> (mask [B, n'], rows [F', D]) in the same layout for the pruned sequence."""
    visual_mask = visual_mask.to(kept.device)
    b = visual_mask.shape[0]
    per_row = rows.reshape(b, -1, rows.shape[-1])
    rank = torch.cumsum(visual_mask.to(torch.int64), dim=1) - 1          # row of each visual position
    kept_mask = torch.gather(visual_mask, 1, kept)
    kept_rank = torch.gather(rank, 1, kept).clamp(min=0)
    picked = torch.gather(per_row.to(kept.device), 1, kept_rank[..., None].expand(-1, -1, rows.shape[-1]))
    return kept_mask, picked[kept_mask]


def temporal_patch_seconds(index: int, temporal_patch_size: int, fps: float) -> float:
    """The time of temporal patch ``index`` of a video sampled at ``fps`` (frames 0, 1, ...): the mean of the
    times of its first and last frame, as the Qwen3-VL processor stamps it."""
    first = index * temporal_patch_size
    return (first + first + temporal_patch_size - 1) / 2 / fps


#: the synthetic timestamp text "<{seconds:.1f} seconds>": an opening id, one id for the value, a closing
#: id. Plain text ids of every preset's vocabulary (fastv_export.prompts.TEXT_TOKEN_RANGE, never image,
#: video or special ids); the value id is TIMESTAMP_VALUE_FIRST + tenths of a second modulo
#: TIMESTAMP_VALUES, so frames of different times get different ids.
TIMESTAMP_OPEN, TIMESTAMP_CLOSE, TIMESTAMP_VALUE_FIRST, TIMESTAMP_VALUES = 10, 11, 12, 300


def timestamp_tokens(seconds: float) -> list[int]:
    """The token ids that stand for the timestamp text of a temporal patch at ``seconds`` (no tokenizer: the
    prompts are synthetic; see TIMESTAMP_OPEN)."""
    tenths = int(round(seconds * 10))
    return [TIMESTAMP_OPEN, TIMESTAMP_VALUE_FIRST + tenths % TIMESTAMP_VALUES, TIMESTAMP_CLOSE]


@register
class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)

    def deepstack_layers(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    def encode_image_with_deepstack(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.run_vision_tower(pixel_values)
        return out.pooler_output, list(out.deepstack_features)

    def vision_grid_kwargs(self, grid: torch.Tensor) -> dict:
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        visual = self.model.model.visual
        index, weight = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
        return {"interp_indices": index, "interp_weights": weight}

    def follow_kept_positions(self, kept_now: Callable[[], torch.Tensor | None]) -> Callable[[], None]:
        text = self.text_model()
        original = text._deepstack_process          # the model's own injection, called with kept rows

        def process(hidden: torch.Tensor, visual_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            kept = kept_now()
            if kept is not None and hidden.shape[1] != visual_mask.shape[1]:
                visual_mask, rows = deepstack_at_kept(visual_mask, rows, kept.to(hidden.device))
            return original(hidden, visual_mask, rows)

        text._deepstack_process = process
        return lambda: text.__dict__.pop("_deepstack_process", None)

    # videos: the processor's layout, each temporal patch its own block after its timestamp text;
    # images of any size the merge unit divides, and the model's inputs, are Qwen2-VL's
    def media_prompt_tokens(self, media: Media) -> list[int]:
        """An image: Qwen2-VL's block. A video (``video_grid_thw`` row (t, h, w), one per video): per temporal
        patch i, its timestamp text (:func:`timestamp_tokens` of :func:`temporal_patch_seconds`), then
        vision_start, the h * w / merge^2 video tokens of that temporal patch, vision_end."""
        if media.kind != "video":
            return super().media_prompt_tokens(media)
        v = self.config.vision_config
        t, h, w = self.media_grid(media)
        frame = h * w // v.spatial_merge_size ** 2
        tokens: list[int] = []
        for i in range(t):
            tokens += timestamp_tokens(temporal_patch_seconds(i, v.temporal_patch_size, media.fps))
            tokens += self.vision_block("video", frame)
        return tokens
