"""InternVL (InternVLForConditionalGeneration), Qwen2 or Llama backbone, standard RoPE.

An image is cut into tiles of the vision tower's size (how many depends on its aspect ratio, plus a
thumbnail when there are several: the image processor's own rule), each tile pixel-shuffled into a
fixed number of tokens; a video is its frames, one tile each. The tower sees every tile on its own,
so ONE tile is the unit of the exported vision graph: a bundle takes images of any size and videos.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from fastv_export.adapters.base import Media, ModelAdapter, register
from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

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

    def image_delimiters(self) -> tuple[int, int] | None:
        """The ids of ``<img>`` / ``</img>``, which InternVL's processor writes around an image's context tokens:
        the config's ``start_image_token_id`` / ``end_image_token_id`` (the presets set them), else the
        checkpoint's tokenizer (``start_image_token`` / ``end_image_token``); None when neither names them."""
        if not hasattr(self, "_delimiters"):
            c = self.config
            start, end = getattr(c, "start_image_token_id", None), getattr(c, "end_image_token_id", None)
            self._delimiters = (int(start), int(end)) if start is not None and end is not None else \
                _tokenizer_delimiters(getattr(c, "_name_or_path", None))
        return self._delimiters

    def media_prompt_tokens(self, media: Media) -> list[int]:
        """An image: ``<img>``, the context tokens of all its tiles, ``</img>``; a video: that block per frame
        (one tile each; the processor's ``FrameN:`` label text between them is left out), as InternVL's
        processor writes them (no delimiters when :meth:`image_delimiters` finds none)."""
        if media.kind == "video" and media.size is not None:
            raise FastVError(f"{media}: InternVL video frames are one tile each; leave size unset")
        blocks = media.frames if media.kind == "video" else 1
        tokens = [int(self.config.image_token_id)] * (self.tiles(media) // blocks * self.tokens_per_tile())
        delimiters = self.image_delimiters()
        block = tokens if delimiters is None else [delimiters[0], *tokens, delimiters[1]]
        return block * blocks

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


def _tokenizer_delimiters(directory: str | None) -> tuple[int, int] | None:
    """``<img>`` / ``</img>`` ids of the tokenizer in checkpoint directory ``directory`` (None: none there)."""
    if not directory or not Path(directory).is_dir() or not (Path(directory) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the prompt then lacks the delimiters, as the config says nothing
        log.warning("%s: no tokenizer to find <img> / </img> in (%s)", directory, type(exc).__name__)
        return None
    ids = [tok.convert_tokens_to_ids(getattr(tok, attr, None) or default)
           for attr, default in (("start_image_token", "<img>"), ("end_image_token", "</img>"))]
    if any(i is None or i == tok.unk_token_id for i in ids):
        return None
    return int(ids[0]), int(ids[1])
