"""Synthetic prompts for the built-in models: system tokens, images, instruction, left padding.

Real deployments feed tokenizer output; tests, benchmarks and the analysis use these so that no
tokenizer or data set is ever downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastv_export.adapters import ModelAdapter

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

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.vision, **self.extra}

    def row(self, i: int, adapter: ModelAdapter, num_images: int) -> "Prompt":
        """Row ``i`` alone, padding stripped (for batch-vs-single comparisons)."""
        keep = self.attention_mask[i].bool()
        ids = self.input_ids[i][keep][None]
        vision = {k: v for k, v in self.vision.items()}
        if "image_grid_thw" in vision:
            per = int(vision["image_grid_thw"][:num_images].prod(-1).sum())
            vision = {"pixel_values": vision["pixel_values"][i * per:(i + 1) * per],
                      "image_grid_thw": vision["image_grid_thw"][i * num_images:(i + 1) * num_images]}
        else:
            vision = {"pixel_values": vision["pixel_values"][i * num_images:(i + 1) * num_images]}
        return Prompt(ids, torch.ones_like(ids), vision, adapter.text_inputs(ids))


def make_prompt(adapter: ModelAdapter, text_lengths: list[int] | int = 12, num_images: int = 1,
                system_tokens: int = 6, seed: int = 0, bos: bool = True) -> Prompt:
    """Prompts ``[bos] system image... instruction`` with instruction lengths ``text_lengths`` (one
    per batch row), left-padded with the pad token. Pass num_images=0 for a text-only prompt."""
    lengths = [text_lengths] if isinstance(text_lengths, int) else list(text_lengths)
    g = torch.Generator().manual_seed(seed)
    cfg = adapter.text_config
    lo, hi = TEXT_TOKEN_RANGE
    hi = min(hi, int(cfg.vocab_size))     # a small vocabulary (tiny-llava-shapes: 32 ids, specials below 10)
    rows, segs = [], []
    image_tokens = adapter.image_prompt_tokens()
    for length in lengths:
        ids = [int(cfg.bos_token_id)] if bos else []
        ids += torch.randint(lo, hi, (system_tokens,), generator=g).tolist()
        system = (0, len(ids))
        images = []
        for _ in range(num_images):
            images.append((len(ids), len(ids) + len(image_tokens)))
            ids += image_tokens
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
    vision = adapter.vision_inputs(num_images * len(rows), g) if num_images else {}
    return Prompt(input_ids, mask, vision, adapter.text_inputs(input_ids), segs)
