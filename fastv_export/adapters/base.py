"""Model adapters: where a VLM keeps its decoder layers, image-token ids and vision path.

One small adapter per architecture; everything else (reference FastV, export) talks to the model
through this interface only.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from fastv_export.decoder_shape import DecoderShape
from fastv_export.errors import FastVError
from fastv_export.media import Media


class ModelAdapter:
    """Base adapter. Subclasses name the HF classes they serve and where things live."""

    name: ClassVar[str] = "base"
    architectures: ClassVar[tuple[str, ...]] = ()
    #: rank of position ids inside the text model: 2 ([B, n]) or 3 ([3, B, n], M-RoPE)
    position_rank: ClassVar[int] = 2
    #: how export traces the vision graph: "dynamo" (torch.export), or "jit" (TorchScript tracing, static
    #: shapes) for towers whose Python control flow on the fixed image size torch.export cannot trace
    vision_tracer: ClassVar[str] = "dynamo"
    #: what one call of the exported vision graph takes (graphs/spec.py VISION_LAYOUTS): "fixed" (one image
    #: of the exported size, the default) or a dynamic layout whose host-side feeds the runtime computes
    vision_layout: ClassVar[str] = "fixed"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- structure -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    def text_model(self) -> nn.Module:
        """The decoder stack: a module with ``.layers``, ``.norm`` and ``.rotary_emb``."""
        return self.model.model.language_model

    def layers(self) -> nn.ModuleList:
        return self.text_model().layers

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def decoder_shape(self) -> DecoderShape:
        return DecoderShape.from_config(self.config)

    # --- image tokens ------------------------------------------------------------------------
    def image_token_ids(self) -> tuple[int, ...]:
        """Token ids whose positions are FastV candidates (image and video placeholders)."""
        raise NotImplementedError

    def image_tokens_per_image(self) -> int:
        """Image tokens one default-sized image becomes in the language model."""
        raise NotImplementedError

    def image_prompt_tokens(self) -> list[int]:
        """Token ids that stand for one image inside a prompt (placeholders and delimiters)."""
        raise NotImplementedError

    def vision_inputs(self, num_images: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random pixel inputs for ``num_images`` default-sized images, as the model's forward takes them."""
        raise NotImplementedError

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Language-model features [M, D] of ONE default-sized image (what vision.onnx computes)."""
        raise NotImplementedError

    # --- media: images of other sizes and videos (families that support them override) ----------
    def media_prompt_tokens(self, media: Media) -> list[int]:
        """Token ids that stand for ``media`` inside a prompt; the default serves default-sized images."""
        self._default_image_only(media)
        return self.image_prompt_tokens()

    def media_inputs(self, media: list[Media], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random pixel inputs for ``media`` (in prompt order, all batch rows), as the model's forward takes them."""
        for m in media:
            self._default_image_only(m)
        return self.vision_inputs(len(media), generator)

    def vision_units(self, media: list[Media], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The pixel input of each call of the exported vision graph (one default-sized image each) that
        ``inputs`` (from :meth:`media_inputs`) stand for, in prompt order; the default: one per image."""
        px = inputs["pixel_values"]
        per = len(px) // max(1, len(media))
        return [px[i * per:(i + 1) * per] for i in range(len(media))]

    def _default_image_only(self, media: Media) -> None:
        if media.kind != "image" or media.size is not None:
            raise FastVError(f"{type(self.model).__name__} prompts take default-sized images only, got {media}; "
                             "use Media('image') or a family with dynamic resolution and video (Qwen2-VL, Qwen2.5-VL)")

    # --- the vision graph: what one call takes and computes ------------------------------------------
    def vision_layout_params(self) -> dict:
        """The numbers a runtime needs to compute a dynamic layout's feeds (the manifest's
        ``image_tokens.vision_layout`` beside ``kind``); none for the fixed layout."""
        return {}

    def vision_example(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The inputs of one vision-graph call for the default image ``pixels`` (the export's example)."""
        return (pixels,)

    def encode_unit(self, *inputs: torch.Tensor):
        """What the vision graph computes from the inputs of one call (graphs/spec.py ``vision_graph``):
        the features [tokens, D], and the DeepStack levels after them for DeepStack families."""
        if self.deepstack_layers():
            features, deepstack = self.encode_image_with_deepstack(*inputs)
            return (features, *deepstack)
        return self.encode_image(*inputs)

    def media_features(self, media: list[Media], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The model's own features of ``media`` (from :meth:`media_inputs`), in prompt order: the main
        features [F, D], then one [F, D] per DeepStack level (what the vision graph's calls, concatenated,
        must equal); the default encodes each unit of :meth:`vision_units`."""
        encoded = [self.encode_image_with_deepstack(u) for u in self.vision_units(media, inputs)]
        return [torch.cat([f for f, _ in encoded])] + [torch.cat([d[level] for _, d in encoded])
                                                       for level in range(self.deepstack_layers())]

    def text_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token inputs the model's forward needs beside input_ids (none by default)."""
        return {}

    # --- decoder inputs that follow token positions beyond hidden states, mask and positions ------
    def deepstack_layers(self) -> int:
        """How many first decoder layers add visual features to the hidden states at the visual
        positions after them (DeepStack, Qwen3-VL); 0 for families that do not."""
        return 0

    def encode_image_with_deepstack(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`encode_image` and the DeepStack features of the same image, one [M, D] set per DeepStack
        layer, from one run of the tower (what the vision graph of a DeepStack family computes)."""
        return self.encode_image(pixel_values), []

    def follow_kept_positions(self, kept_now: Callable[[], torch.Tensor | None]) -> Callable[[], None]:
        """Reference FastV: make per-position decoder inputs other than hidden states, mask and positions
        follow the kept positions in layers >= K. ``kept_now()`` gives the kept positions [B, n'] while
        layers >= K of a pruning prefill run (None otherwise). Returns the undo; the default has nothing to do."""
        return lambda: None

    def find_candidates(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions [B, M] (ascending) of all image/video tokens of each prompt: one pool."""
        ids = torch.tensor(self.image_token_ids(), device=input_ids.device)
        is_image = torch.isin(input_ids, ids)
        counts = is_image.sum(dim=1).tolist()
        if len(set(counts)) > 1:
            raise FastVError(f"the prompts of this batch hold different numbers of image tokens ({counts}); "
                             "FastV needs the same count in every row: batch prompts with the same images "
                             "layout, or run them separately")
        m = counts[0] if counts else 0
        return is_image.nonzero()[:, 1].view(input_ids.shape[0], m)


_REGISTRY: list[type[ModelAdapter]] = []


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _REGISTRY.append(cls)
    return cls


def supported_architectures() -> list[str]:
    return [a for cls in _REGISTRY for a in cls.architectures]


def adapter_class_for(architecture: str) -> type[ModelAdapter]:
    for cls in _REGISTRY:
        if architecture in cls.architectures:
            return cls
    raise FastVError(f"unsupported architecture {architecture!r}; fastv-export supports: "
                     f"{', '.join(supported_architectures())}")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a loaded HF model (raises FastVError naming the supported ones)."""
    return adapter_class_for(type(model).__name__)(model)
