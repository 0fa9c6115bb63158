"""Calibration sets: the prompts a sweep measures, one unpadded prompt at a time.

Three sources:

- ``demo``: the shapes task's held-out test split (:mod:`.shapes`), with reference answers;
- ``synthetic``: the project's synthetic prompts (:func:`fastv_export.prompts.make_prompt`) for any
  preset, without answers (quality is then agreement with the unpruned model only);
- a folder with ``prompts.jsonl`` and images: one JSON object per line,
  ``{"image": "cat.png", "prompt": "USER: <image>\\nWhat is it? ASSISTANT:", "answer": "a cat"}``
  (``prompt``/``answer`` text, sent as written) or
  ``{"image": "cat.png", "prompt_ids": [1, 32000, ...], "answer_ids": [...]}`` (token ids; one image
  placeholder is expanded to the image's tokens). ``answer`` is optional. Images and text go through the
  model's processing (fastv_export.frontend): a checkpoint's files (``--model DIR``), or a preset's, the ones
  its bundle carries.
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


def _frontend(model: str | Path | None, adapter):
    """The model's processing (fastv_export.frontend) for the loaded model: a checkpoint directory's files, or a
    built-in preset's (the ones its bundle carries)."""
    from fastv_export.frontend.processor import Frontend, has_serving_files, model_view
    from fastv_export.presets import PRESETS

    if model is not None and str(model) in PRESETS:
        from fastv_export.presets.serving import preset_frontend

        return preset_frontend(str(model), model_view(adapter))
    if model is None or not Path(model).is_dir() or not has_serving_files(model):
        raise FastVError(f"{PROMPTS_FILE}'s images and text go through the checkpoint's processor: pass --model DIR "
                         "with its tokenizer and image processor files")
    return Frontend.load(model, model_view(adapter))


def _expand_placeholder(ids: list[int], image_ids: set[int], count: int) -> list[int]:
    """The one image placeholder of ``ids`` repeated ``count`` times (ids already expanded are kept)."""
    at = [i for i, t in enumerate(ids) if t in image_ids]
    if len(at) != 1 or count == 1:
        return ids
    return ids[:at[0]] + [ids[at[0]]] * count + ids[at[0] + 1:]


def folder_items(folder: str | Path, adapter, model_dir: str | Path | None = None,
                 limit: int | None = None) -> list[CalibrationItem]:
    """Items of ``folder/prompts.jsonl`` (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    path = folder / PROMPTS_FILE
    if not path.is_file():
        raise FastVError(f"{folder} has no {PROMPTS_FILE}: a calibration folder holds images and a {PROMPTS_FILE} "
                         "with one {\"image\": ..., \"prompt\": ...} object per line")
    import numpy as np

    from fastv_export.frontend.processor import model_vision_inputs

    items: list[CalibrationItem] = []
    front = None
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
                im.load()                                                   # readable, before any model work
        except (OSError, UnidentifiedImageError) as exc:
            raise FastVError(f"{where}: cannot read image {image_path} ({exc.__class__.__name__}); "
                             "give a PNG or JPEG file inside the folder") from None
        if "prompt_ids" in rec:
            ids = [int(t) for t in rec["prompt_ids"]]
            front = front or _frontend(model_dir, adapter)                # the model's image processor
            medium = front.process_image(str(image_path))
            ids = _expand_placeholder(ids, image_ids, medium.count)
            vision = {k: torch.from_numpy(np.ascontiguousarray(v))
                      for k, v in model_vision_inputs([medium], front.family).items()}
            input_ids = torch.tensor([ids])
            answer = [int(t) for t in rec["answer_ids"]] if rec.get("answer_ids") is not None else None
        else:
            from fastv_export.frontend import from_cli

            front = front or _frontend(model_dir, adapter)
            prepared = front.prepare(from_cli(str(rec["prompt"]), [str(image_path)]), raw=True)
            input_ids = torch.from_numpy(prepared.input_ids[:1])
            vision = {k: torch.from_numpy(np.ascontiguousarray(v))
                      for k, v in model_vision_inputs(prepared.processed[0], front.family).items()}
            answer = None
            if rec.get("answer") is not None:
                answer = front.tokenizer(str(rec["answer"]), add_special_tokens=False)["input_ids"]
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
