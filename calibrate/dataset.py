"""Calibration sets: the prompts a sweep measures, one unpadded prompt at a time.

Three sources:

- ``demo``: the shapes task's held-out test split (:mod:`.shapes`), with reference answers;
- ``synthetic``: the project's synthetic prompts (:func:`fastv_export.prompts.make_prompt`) for any
  preset, without answers (quality is then agreement with the unpruned model only);
- a folder with ``prompts.jsonl`` and images: one JSON object per line,
  ``{"image": "cat.png", "prompt": "USER: <image>\\nWhat is it? ASSISTANT:", "answer": "a cat"}``
  (``prompt``/``answer`` text needs the checkpoint's processor: ``--model DIR`` with tokenizer files) or
  ``{"image": "cat.png", "prompt_ids": [1, 32000, ...], "answer_ids": [...]}`` (token ids; one image
  placeholder is expanded to the image's tokens). ``answer`` is optional.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.jsonl"


@dataclass
class CalibrationItem:
    """One prompt: ``input_ids`` [1, n] (no padding), the vision inputs, and the reference answer ids
    (ending at the end-of-sequence token when the source gives one) or None."""
    name: str
    input_ids: torch.Tensor
    vision: dict[str, torch.Tensor]
    answer: list[int] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids),
                **self.vision, **self.extra}


def demo_items(size: int, start: int = 0) -> list[CalibrationItem]:
    """The shapes task's test split (samples ``start`` .. ``start + size - 1``)."""
    import numpy as np

    from fastv_export.presets import shapes

    items = []
    for s in shapes.split("test", size, start):
        items.append(CalibrationItem(f"shapes-{s.seed}", torch.tensor([s.prompt]),
                                     {"pixel_values": torch.from_numpy(np.ascontiguousarray(s.pixels[None]))},
                                     list(s.answer)))
    return items


def synthetic_items(adapter, size: int, text_tokens: int = 12, images: int = 1) -> list[CalibrationItem]:
    """Synthetic prompts of the preset (random vision inputs, instruction lengths vary with the index)."""
    from fastv_export.prompts import make_prompt

    items = []
    for i in range(size):
        p = make_prompt(adapter, text_tokens + (i % 5), num_images=images, seed=i)
        items.append(CalibrationItem(f"synthetic-{i}", p.input_ids, p.vision, None, p.extra))
    return items


def _processor(model_dir: Path | None):
    if model_dir is None or not Path(model_dir).is_dir():
        raise FastVError("prompts.jsonl gives text ('prompt'/'answer'), which needs the checkpoint's processor: "
                         "pass --model DIR with its tokenizer files, or give 'prompt_ids'/'answer_ids' instead")
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the same user problem
        raise FastVError(f"cannot load a processor from {model_dir} ({type(exc).__name__}: {exc}); "
                         "give 'prompt_ids'/'answer_ids' in prompts.jsonl instead of text") from None


def folder_items(folder: str | Path, adapter, model_dir: str | Path | None = None,
                 limit: int | None = None) -> list[CalibrationItem]:
    """Items of ``folder/prompts.jsonl`` (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    path = folder / PROMPTS_FILE
    if not path.is_file():
        raise FastVError(f"{folder} has no {PROMPTS_FILE}: a calibration folder holds images and a {PROMPTS_FILE} "
                         "with one {\"image\": ..., \"prompt\": ...} object per line")
    items: list[CalibrationItem] = []
    processor = None
    image_ids = set(adapter.image_token_ids())
    eos = adapter.text_config.eos_token_id
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FastVError(f"{where} is not valid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(rec, dict) or "image" not in rec or not ({"prompt", "prompt_ids"} & rec.keys()):
            raise FastVError(f"{where} needs an 'image' and a 'prompt' (or 'prompt_ids') field")
        image_path = folder / str(rec["image"])
        try:
            with Image.open(image_path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise FastVError(f"{where}: cannot read image {image_path} ({exc.__class__.__name__}); "
                             "give a PNG or JPEG file inside the folder") from None
        if "prompt_ids" in rec:
            ids = [int(t) for t in rec["prompt_ids"]]
            found = [t for t in ids if t in image_ids]
            if len(found) == 1 and adapter.image_tokens_per_image() > 1:
                at = next(i for i, t in enumerate(ids) if t in image_ids)
                ids = ids[:at] + adapter.image_prompt_tokens() + ids[at + 1:]
            pixels = torch.as_tensor(adapter.preprocess_image(image))
            vision = {"pixel_values": pixels}
            input_ids = torch.tensor([ids])
            answer = [int(t) for t in rec["answer_ids"]] if rec.get("answer_ids") is not None else None
        else:
            processor = processor or _processor(Path(model_dir) if model_dir else None)
            enc = processor(images=image, text=str(rec["prompt"]), return_tensors="pt")
            input_ids = enc["input_ids"][:1]
            vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            answer = None
            if rec.get("answer") is not None:
                answer = processor.tokenizer(str(rec["answer"]), add_special_tokens=False)["input_ids"]
                answer = list(answer) + ([int(eos)] if eos is not None else [])
        if not any(int(t) in image_ids for t in input_ids[0]):
            raise FastVError(f"{where}: the prompt holds no image token; put the image placeholder in it")
        items.append(CalibrationItem(f"{rec['image']}#{lineno}", input_ids, vision, answer,
                                     adapter.text_inputs(input_ids)))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise FastVError(f"{path} holds no prompts: add one JSON object per line")
    return items


def load_items(source: str, adapter, size: int, model: str | None = None) -> list[CalibrationItem]:
    """``demo``, ``synthetic`` or a folder (see the module docstring); at most ``size`` prompts."""
    if size < 1:
        raise FastVError(f"the calibration set is empty (size {size}): ask for at least one prompt")
    if source == "demo":
        return demo_items(size)
    if source == "synthetic":
        return synthetic_items(adapter, size)
    if Path(source).is_dir():
        return folder_items(source, adapter, model_dir=model, limit=size)
    raise FastVError(f"calibration data {source!r} is neither 'demo', 'synthetic' nor a folder with {PROMPTS_FILE}")
