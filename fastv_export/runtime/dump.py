"""The raw inputs of one generation, as the C++ runtime's ``fastv-run --inputs DIR`` reads them
(format: runtime/README.md). ``fastv-export run BUNDLE ... --dump-inputs DIR`` writes them.

``DIR/inputs.json`` lists the tensors by the names of the graph inputs they feed
(fastv_export/graphs/spec.py): the token ids [B, n] and attention mask [B, n] (int64), the candidate
positions [B, M] (int64), one pixel-values tensor per vision call, named ``<pixel values>.<i>``
(float32 or float16), and for video prompts of families whose video positions follow time the seconds per
temporal patch of each video, ``video_seconds`` [V] (float32)::

    {"format": "fastv-inputs", "version": 1, "num_images": N,
     "tensors": {NAME: {"file": "NAME.bin", "dtype": "int64", "shape": [B, n]}, ...}}

Every ``.bin`` file holds the tensor's elements, row-major (C order), little-endian, nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from fastv_export.errors import FastVError
from fastv_export.files import atomic_write_json
from fastv_export.graphs import spec

FORMAT, VERSION, INPUTS_JSON = "fastv-inputs", 1, "inputs.json"
#: not a graph input: what the M-RoPE positions of a timed video need (the model's second_per_grid_ts)
VIDEO_SECONDS = "video_seconds"
#: not a graph input: each medium's (t, h, w) patch grid, rows in order (bundles whose vision layout is patch_grid)
MEDIA_GRID_THW = "media_grid_thw"
_DTYPES = {"int64": "<i8", "float32": "<f4", "float16": "<f2"}


def _write(out: Path, name: str, array: np.ndarray) -> dict:
    dtype = np.dtype(array.dtype).name
    if dtype not in _DTYPES:
        raise FastVError(f"--dump-inputs: tensor {name!r} has dtype {dtype}; the format holds {', '.join(_DTYPES)}")
    file = f"{name}.bin"
    (out / file).write_bytes(np.ascontiguousarray(array, dtype=_DTYPES[dtype]).tobytes())
    return {"file": file, "dtype": dtype, "shape": [int(d) for d in array.shape]}


def dump_inputs(out: str | Path, input_ids: np.ndarray, attention_mask: np.ndarray, images: Sequence[np.ndarray],
                candidates: np.ndarray | None = None, video_seconds: Sequence[float] | None = None,
                media_grids: Sequence[Sequence[int]] | None = None) -> Path:
    """Write the inputs of one generation into ``out`` (created); returns ``out/inputs.json``.
    ``video_seconds``: seconds per temporal patch of each video of the batch, rows in order (bundles whose
    video positions follow time), written as the float32 tensor ``video_seconds``. ``media_grids``: the (t, h, w)
    patch grid of every medium, rows in order (patch_grid bundles), written as the int64 tensor
    ``media_grid_thw`` [media, 3]."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FastVError(f"--dump-inputs {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {spec.INPUT_IDS: _write(out, spec.INPUT_IDS, np.asarray(input_ids, dtype=np.int64)),
               spec.ATTENTION_MASK: _write(out, spec.ATTENTION_MASK, np.asarray(attention_mask, dtype=np.int64))}
    if candidates is not None:
        tensors[spec.CANDIDATE_POSITIONS] = _write(out, spec.CANDIDATE_POSITIONS,
                                                   np.asarray(candidates, dtype=np.int64))
    if video_seconds is not None:
        tensors[VIDEO_SECONDS] = _write(out, VIDEO_SECONDS, np.asarray(video_seconds, dtype=np.float32))
    if media_grids is not None:
        tensors[MEDIA_GRID_THW] = _write(out, MEDIA_GRID_THW, np.asarray(media_grids, dtype=np.int64).reshape(-1, 3))
    for i, px in enumerate(images):
        px = np.asarray(px)
        name = f"{spec.PIXEL_VALUES}.{i}"
        tensors[name] = _write(out, name, px if px.dtype == np.float16 else px.astype(np.float32))
    manifest = {"format": FORMAT, "version": VERSION, "num_images": len(images), "tensors": tensors}
    atomic_write_json(out / INPUTS_JSON, manifest)
    return out / INPUTS_JSON


def load_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a dumped inputs folder by name (for checks and tests)."""
    path = Path(path)
    meta = json.loads((path / INPUTS_JSON).read_text())
    return {name: np.fromfile(path / t["file"], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
            for name, t in meta["tensors"].items()}
