"""Calibration sets for calibrated quantization (``--quantize int4-awq``): the model's real inputs, one unpadded
prompt at a time.

- ``demo``: the trained demo preset's task (:mod:`fastv_export.presets.shapes`), prompts of its TRAIN split with
  their answers (teacher forced), so that the test split stays held out for measuring;
- ``synthetic``: the project's synthetic prompts of any preset (:func:`fastv_export.prompts.make_prompt`);
- a folder of images + ``prompts.jsonl`` (the format ``fastv-export calibrate`` takes, read by
  :func:`calibrate.dataset.folder_items`): images and text go through the checkpoint's processor
  (:mod:`fastv_export.frontend`).

An empty set, an unreadable image and a malformed JSONL line are refused in one line each.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

KINDS = ("demo", "synthetic", "folder")
DEMO_PRESET = "tiny-llava-shapes"
DEFAULT_SIZE = 64


@dataclass
class CalibrationSet:
    """``kind`` (demo / synthetic / folder), where it came from and its prompts
    (:class:`calibrate.dataset.CalibrationItem`: ``model_inputs()`` is what the model's forward takes)."""
    kind: str
    source: str
    items: list

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "count": len(self.items), "source": self.source}


def default_source(model: str | None) -> str:
    """``demo`` for the trained demo preset, ``synthetic`` otherwise."""
    return "demo" if str(model) == DEMO_PRESET else "synthetic"


def demo_train_items(size: int, start: int = 0) -> list:
    """The demo task's train split: ``<s> <image>*64 question answer </s>`` with the image's pixels."""
    import numpy as np

    from fastv_export.calibrate.dataset import CalibrationItem
    from fastv_export.presets import shapes

    return [CalibrationItem(f"shapes-train-{s.seed}", torch.tensor([s.prompt + s.answer]),
                            {"pixel_values": torch.from_numpy(np.ascontiguousarray(s.pixels[None]))}, list(s.answer))
            for s in shapes.split("train", size, start)]


def load_calibration(source: str | None, adapter, size: int = DEFAULT_SIZE,
                     model: str | Path | None = None) -> CalibrationSet:
    """The calibration set ``source`` (``demo``, ``synthetic`` or a folder; None: :func:`default_source`) of at
    most ``size`` prompts for ``adapter``'s model (``model``: the preset name or checkpoint directory, whose
    processor reads a folder's images and text)."""
    from fastv_export.calibrate import dataset

    source = source or default_source(model)
    if size < 1:
        raise FastVError(f"the calibration set is empty (--calibration-size {size}): ask for at least one prompt")
    if source == "demo":
        if str(model) != DEMO_PRESET:
            raise FastVError(f"--calibration demo is the {DEMO_PRESET} task's data; for {model} give a folder of "
                             "images + prompts.jsonl or 'synthetic'")
        items, kind = demo_train_items(size), "demo"
        where = f"{DEMO_PRESET} train split (samples 0-{size - 1})"
    elif source == "synthetic":
        items, kind, where = dataset.synthetic_items(adapter, size), "synthetic", f"synthetic prompts of {model}"
    elif Path(source).is_dir():
        items = dataset.folder_items(source, adapter, model_dir=model, limit=size)
        kind, where = "folder", str(Path(source).resolve())
    elif Path(source).exists():
        raise FastVError(f"calibration data {source} is a file: give the folder holding it and {dataset.PROMPTS_FILE}")
    else:
        raise FastVError(f"calibration data {source!r} is neither 'demo', 'synthetic' nor a folder of images and "
                         f"{dataset.PROMPTS_FILE}")
    if not items:
        raise FastVError(f"the calibration set {source} is empty: give at least one prompt")
    log.info("calibration set: %d prompts from %s", len(items), where)
    return CalibrationSet(kind, where, items)
