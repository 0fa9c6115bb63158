"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration), Qwen2 backbone, standard RoPE.

Images are tiled "anyres": a base tile of the whole image plus the tiles of the best grid
pinpoint, unpadded to the image's aspect ratio, with the learned ``image_newline`` feature after
every row of the tiled part; the token count depends on the image size. A video is its frames,
each pooled 2 x 2, followed by one newline. Candidates: every image and video placeholder, newline
positions included (they hold image features at image-token positions; see docs/adding_a_model.md).
Token counts come from the model's own feature code (run once per size on zeros), never re-derived.

A bundle's vision graph (layout ``tiles``) takes one image's anyres tiles or one video's frames, any
count, and the rows of its feature table to return in token order; the runtime computes those rows on
the host (fastv_export/runtime/anyres.py, tested against the model's packing code).
"""
from __future__ import annotations

import math

import torch

from fastv_export.adapters.base import Media, ModelAdapter, register
from fastv_export.errors import FastVError


@register
class LlavaOnevisionAdapter(ModelAdapter):
    name = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    vision_layout = "tiles"   # one call per image (its anyres tiles) and per video (its frames)

    def __init__(self, model) -> None:
        super().__init__(model)
        self._counts: dict[Media, int] = {}

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def tile(self) -> int:
        return int(self.config.vision_config.image_size)

    def default_size(self) -> tuple[int, int]:
        """The exported image size: 2 x 2 tiles when the pinpoints offer it, else one tile."""
        s = self.tile
        return (2 * s, 2 * s) if [2 * s, 2 * s] in [list(p) for p in self.config.image_grid_pinpoints] else (s, s)

    def _size(self, media: Media) -> tuple[int, int]:
        return media.size or self.default_size()

    def _num_tiles(self, size: tuple[int, int]) -> int:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        return int(image_size_to_num_patches(list(size), self.config.image_grid_pinpoints, self.tile))

    def _count(self, media: Media) -> int:
        """Language-model features of ``media``, from the model's own code on zero pixels."""
        key = Media(media.kind, self._size(media), media.frames)
        if key not in self._counts:
            s, (h, w) = self.tile, key.size
            with torch.no_grad():
                if media.kind == "image":
                    px = torch.zeros(1, self._num_tiles((h, w)), 3, s, s)
                    feats = self.model.model.get_image_features(pixel_values=px, image_sizes=torch.tensor([[h, w]]))
                    self._counts[key] = int(feats.pooler_output[0].shape[0])
                else:
                    px = torch.zeros(1, media.frames, 3, s, s)
                    self._counts[key] = int(self.model.model.get_video_features(pixel_values_videos=px).pooler_output
                                            .shape[1])
        return self._counts[key]

    # --- the interface ---------------------------------------------------------------------------
    def image_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.image_token_id), int(self.config.video_token_id))

    def image_tokens_per_image(self) -> int:
        return self._count(Media())

    def image_prompt_tokens(self) -> list[int]:
        return self.media_prompt_tokens(Media())

    def vision_inputs(self, num_images: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.media_inputs([Media()] * num_images, generator)

    def media_prompt_tokens(self, media: Media) -> list[int]:
        if media.kind == "video" and media.size not in (None, (self.tile, self.tile)):
            raise FastVError(f"{media}: LLaVA-OneVision video frames are one tile, {self.tile} x {self.tile} pixels; "
                             "leave size unset")
        token = self.config.video_token_id if media.kind == "video" else self.config.image_token_id
        return [int(token)] * self._count(media)

    def media_inputs(self, media: list[Media], generator: torch.Generator) -> dict[str, torch.Tensor]:
        s = self.tile
        out: dict[str, torch.Tensor] = {}
        images = [m for m in media if m.kind == "image"]
        if images:
            sizes = [self._size(m) for m in images]
            tiles = [self._num_tiles(sz) for sz in sizes]
            px = torch.zeros(len(images), max(tiles), 3, s, s)   # padded to the most tiles, as the processor
            for i, t in enumerate(tiles):
                px[i, :t] = torch.randn(t, 3, s, s, generator=generator)
            out["pixel_values"], out["image_sizes"] = px, torch.tensor(sizes)
        videos = [m for m in media if m.kind == "video"]
        if videos:
            if len({m.frames for m in videos}) > 1:
                raise FastVError(f"the videos of one batch must have the same number of frames, got "
                                 f"{[m.frames for m in videos]}; sample them to one length")
            out["pixel_values_videos"] = torch.randn(len(videos), videos[0].frames, 3, s, s, generator=generator)
        return out

    # --- dynamic anyres: tiles in, rows picked by a host-computed index ---------------------------
    def anyres_params(self) -> dict:
        """The anyres layout parameters of ``fastv_export.runtime.anyres.anyres_layout``, from the config:
        tile (px), patches_per_side (tile // patch size), pinpoints, max_num_patches (the N of the
        config's ``vision_aspect_ratio`` "anyres_max_N") and pooled_side (ceil(patches_per_side / 2))."""
        vision = self.config.vision_config
        p = int(vision.image_size) // int(vision.patch_size)
        aspect = getattr(self.config, "vision_aspect_ratio", None) or "anyres_max_9"
        try:
            max_num = int(aspect.strip("anyres_max_"))     # parsed as the model's pack_image_features does
        except ValueError:
            raise FastVError(f"vision_aspect_ratio {aspect!r} is not of the form 'anyres_max_N'") from None
        return {"tile": int(vision.image_size), "patches_per_side": p,
                "pinpoints": [[int(h), int(w)] for h, w in self.config.image_grid_pinpoints],
                "max_num_patches": max_num, "pooled_side": math.ceil(p / 2)}

    def encode_tiles(self, pixel_values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """pixel_values [T, 3, tile, tile] (any T), rows int64 [M] -> [M, D]: rows of the table
        concat(tile features [T * p * p, D], pooled tile features [T * q * q, D], image_newline [1, D]),
        where the tile features are the model's vision tower (the config's feature layer(s) and select
        strategy) and projector, and the pooled ones its ``apply_pooling`` of them. With
        ``anyres_layout``'s rows this is the model's image or video features of one medium."""
        inner = self.model.model
        layer = self.config.vision_feature_layer
        out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        if isinstance(layer, int):
            selected = out.hidden_states[layer]
        else:
            selected = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        feats = inner.multi_modal_projector(selected)                      # [T, p * p, D]
        pooled = inner.apply_pooling(feats)                                # [T, q * q, D]
        dim = feats.shape[-1]
        table = torch.cat((feats.reshape(-1, dim), pooled.reshape(-1, dim),
                           inner.image_newline[None].to(feats.dtype)), dim=0)
        return table[rows]

    def vision_layout_params(self) -> dict:
        """:meth:`anyres_params` and the exported image: its size and tile count (the engine's profile)."""
        return {**self.anyres_params(), "default_size": list(self.default_size()),
                "default_tiles": self._num_tiles(self.default_size())}

    def vision_example(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The default image's tiles [tiles, 3, tile, tile] and the rows of its features."""
        from fastv_export.runtime.anyres import anyres_layout

        h, w = self.default_size()
        tiles, index = anyres_layout("image", h, w, 1, self.anyres_params())
        return pixels[0, :tiles], torch.from_numpy(index)

    def encode_unit(self, pixel_values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.encode_tiles(pixel_values, rows)

    def media_features(self, media: list[Media], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The HF model's own image features (anyres tiling, unpadding, newlines) and video features
        (pooled frames, one newline), in prompt order."""
        model = self.model.model
        per_kind = {}
        if "pixel_values" in inputs:
            per_kind["image"] = iter(model.get_image_features(pixel_values=inputs["pixel_values"],
                                                              image_sizes=inputs["image_sizes"]).pooler_output)
        if "pixel_values_videos" in inputs:
            per_kind["video"] = iter(model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
                                     .pooler_output)
        return [torch.cat([next(per_kind[m.kind]) for m in media])]

    def vision_units(self, media: list[Media], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One pixel tensor per medium of ``media``, in prompt order: an image its tiles
        [tiles, 3, tile, tile] (its row of ``pixel_values`` without the batch padding), a video its
        frames [frames, 3, tile, tile]; images and videos are counted apart, as ``media_inputs`` stacks
        them."""
        units: list[torch.Tensor] = []
        image_i = video_i = 0
        for m in media:
            if m.kind == "image":
                units.append(inputs["pixel_values"][image_i, :self._num_tiles(self._size(m))])
                image_i += 1
            else:
                units.append(inputs["pixel_values_videos"][video_i])
                video_i += 1
        return units

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, tile, tile] of one image of the default size -> [M, D]."""
        return self.encode_unit(*self.vision_example(pixel_values[None]))
