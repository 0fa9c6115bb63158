"""LLaVA-1.5 (LlavaForConditionalGeneration) with any Llama / Mistral / Qwen2 text backbone."""
from __future__ import annotations

import torch

from fastv_export.adapters.base import ModelAdapter, register


@register
class LlavaAdapter(ModelAdapter):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)

    def image_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.image_token_id),)

    def image_tokens_per_image(self) -> int:
        v = self.config.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        return patches if self.config.vision_feature_select_strategy == "default" else patches + 1

    def image_prompt_tokens(self) -> list[int]:
        return [int(self.config.image_token_id)] * self.image_tokens_per_image()

    def vision_inputs(self, num_images: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        v = self.config.vision_config
        pixels = torch.randn(num_images, v.num_channels, v.image_size, v.image_size, generator=generator)
        return {"pixel_values": pixels}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        feats = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(-1, feats.shape[-1])
