"""Synthetic prompts for the built-in models: system tokens, images, instruction, left padding.

Real deployments feed tokenizer output; tests, benchmarks and the analysis use these so that no
tokenizer or data set is ever downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastv_export.adapters import Media, ModelAdapter

TEXT_TOKEN_RANGE = (10, 400)  # ids below the tiny presets' special tokens (>= 500)


@dataclass
class Segments:
    """Where the parts of one (unpadded) prompt lie: half-open [start, stop) ranges."""
    system: tuple[int, int]
    images: list[tuple[int, int]]
    instruction: tuple[int, int]


@dataclass
class Prompt:
    """A batch of prompts, left-padded, ready for ``model(**prompt.model_inputs())``."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    segments: list[Segments] = field(default_factory=list)  # per row, positions in the padded row
    media: list[Media] = field(default_factory=list)        # every row's media, rows in order

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.vision, **self.extra}

    def row(self, i: int, adapter: ModelAdapter, num_images: int | None = None) -> "Prompt":
        """Row ``i`` alone, padding stripped (for batch-vs-single comparisons). Every row holds the same
        media, so each vision input splits into equal per-row parts along its first axis."""
        keep = self.attention_mask[i].bool()
        ids = self.input_ids[i][keep][None]
        b = self.input_ids.shape[0]
        vision = {k: v.chunk(b, dim=0)[i] for k, v in self.vision.items()}
        per_row = len(self.media) // b
        return Prompt(ids, torch.ones_like(ids), vision, adapter.text_inputs(ids),
                      media=self.media[i * per_row:(i + 1) * per_row])

    def vision_units(self, adapter: ModelAdapter) -> list[torch.Tensor]:
        """The pixel input of each call of the bundle's vision graph, in prompt order (rows in order)."""
        return adapter.vision_units(self.media, self.vision) if self.media else []


def make_prompt(adapter: ModelAdapter, text_lengths: list[int] | int = 12, num_images: int = 1,
                system_tokens: int = 6, seed: int = 0, bos: bool = True,
                media: list[Media] | None = None) -> Prompt:
    """Prompts ``[bos] system media... instruction`` with instruction lengths ``text_lengths`` (one
    per batch row), left-padded with the pad token. ``media`` (the same in every row) lists images
    of any size the family takes and videos, e.g. ``[Media("image", (224, 168)), Media("video",
    frames=64)]``; without it, ``num_images`` default-sized images (0: a text-only prompt). All
    media of a prompt form one candidate pool."""
    lengths = [text_lengths] if isinstance(text_lengths, int) else list(text_lengths)
    media = [Media()] * num_images if media is None else list(media)
    g = torch.Generator().manual_seed(seed)
    cfg = adapter.text_config
    lo, hi = TEXT_TOKEN_RANGE
    hi = min(hi, int(cfg.vocab_size))     # a small vocabulary (tiny-llava-shapes: 32 ids, specials below 10)
    rows, segs = [], []
    media_tokens = [adapter.media_prompt_tokens(m) for m in media]
    for length in lengths:
        ids = [int(cfg.bos_token_id)] if bos else []
        ids += torch.randint(lo, hi, (system_tokens,), generator=g).tolist()
        system = (0, len(ids))
        images = []
        for tokens in media_tokens:
            images.append((len(ids), len(ids) + len(tokens)))
            ids += tokens
        start = len(ids)
        ids += torch.randint(lo, hi, (length,), generator=g).tolist()
        rows.append(ids)
        segs.append(Segments(system, images, (start, len(ids))))
    n = max(len(r) for r in rows)
    pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    input_ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
        off = n - len(r)
        s = segs[i]
        segs[i] = Segments((s.system[0] + off, s.system[1] + off), [(a + off, b + off) for a, b in s.images],
                           (s.instruction[0] + off, s.instruction[1] + off))
    all_media = media * len(rows)
    vision = adapter.media_inputs(all_media, g) if media else {}
    return Prompt(input_ids, mask, vision, adapter.text_inputs(input_ids), segs, all_media)
