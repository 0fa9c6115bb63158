"""InternVL (InternVLForConditionalGeneration), Qwen2 or Llama backbone, standard RoPE.

An image is cut into tiles of the vision tower's size (how many depends on its aspect ratio, plus a
thumbnail when there are several: the image processor's own rule), each tile pixel-shuffled into a
fixed number of tokens; a video is its frames, one tile each. The tower sees every tile on its own,
so ONE tile is the unit of the exported vision graph: a bundle takes images of any size and videos.
"""
from __future__ import annotations

import torch

from fastv_export.adapters.base import Media, ModelAdapter, register
from fastv_export.errors import FastVError

MAX_TILES = 6   # tiles per image (min 1), as the processor's max_patches; the thumbnail comes on top


@register
class InternVLAdapter(ModelAdapter):
    name = "internvl"
    architectures = ("InternVLForConditionalGeneration",)

    @property
    def tile(self) -> int:
        size = self.config.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def _processor(self):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        s = self.tile
        return GotOcr2ImageProcessorPil(size={"height": s, "width": s}, crop_to_patches=True, min_patches=1,
                                        max_patches=MAX_TILES)

    def tiles(self, media: Media) -> int:
        """Vision-graph calls (tiles) of ``media``: the image processor's tiling of its size."""
        if media.kind == "video":
            return media.frames
        if media.size is None:
            return 1
        from PIL import Image

        h, w = media.size
        return int(self._processor()(images=Image.new("RGB", (w, h)), return_tensors="np")["pixel_values"].shape[0])

    def tokens_per_tile(self) -> int:
        v = self.config.vision_config
        patches = (self.tile // (v.patch_size[0] if isinstance(v.patch_size, (list, tuple)) else v.patch_size)) ** 2
        return int(patches * self.config.downsample_ratio ** 2)

    # --- the interface ---------------------------------------------------------------------------
    def image_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.image_token_id),)

    def image_tokens_per_image(self) -> int:
        return self.tokens_per_tile()

    def image_prompt_tokens(self) -> list[int]:
        return self.media_prompt_tokens(Media())

    def vision_inputs(self, num_images: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.media_inputs([Media()] * num_images, generator)

    def media_prompt_tokens(self, media: Media) -> list[int]:
        if media.kind == "video" and media.size is not None:
            raise FastVError(f"{media}: InternVL video frames are one tile each; leave size unset")
        return [int(self.config.image_token_id)] * (self.tiles(media) * self.tokens_per_tile())

    def media_inputs(self, media: list[Media], generator: torch.Generator) -> dict[str, torch.Tensor]:
        s, total = self.tile, sum(self.tiles(m) for m in media)
        return {"pixel_values": torch.randn(total, self.config.vision_config.num_channels, s, s, generator=generator)}

    def vision_units(self, media: list[Media], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        px = inputs["pixel_values"]
        return [px[i:i + 1] for i in range(len(px))]

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 3, tile, tile] of one tile -> [tokens_per_tile, D]."""
        feats = self.model.model.get_image_features(pixel_values=pixel_values).pooler_output
        return feats.reshape(-1, feats.shape[-1])

    def preprocess_image(self, image):
        """One tile: the image resized to the tile size (a bundle's image unit)."""
        s = self.tile
        proc = self._processor()
        return proc(images=image.convert("RGB").resize((s, s)), crop_to_patches=False,
                    return_tensors="np")["pixel_values"]
