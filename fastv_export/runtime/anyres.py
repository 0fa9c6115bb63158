"""LLaVA-OneVision anyres layout on the host (numpy, no torch): how many tiles the vision graph takes
for one image or video, and which rows of the graph's feature table make the medium's tokens.

The vision graph encodes T tiles of ``tile`` x ``tile`` pixels and builds one table of rows::

    table = concat(tile_features.reshape(T * p * p, D),   # tower + projector, row-major patches
                   pooled.reshape(T * q * q, D),          # the model's 2 x 2 pooling of each tile
                   image_newline[None])                   # the learned newline, last row

and returns ``table[rows]``. :func:`anyres_layout` computes T and ``rows`` so that the
result is what the model's own ``get_image_features`` / ``get_video_features`` place at the image
or video tokens: for an image, the base tile, then the grid tiles arranged into one feature map,
unpadded to the image's aspect ratio, with a newline after every row; for a video, the pooled rows
of every frame and one newline.

``params`` is a plain dict (kept in a bundle's manifest)::

    {"tile": S, "patches_per_side": p, "pinpoints": [[h, w], ...], "max_num_patches": 9,
     "pooled_side": q}
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from fastv_export.errors import FastVError

#: the anyres ratio above which the model resizes the unpadded feature map (not a row selection)
_INTERPOLATE_RATIO = 1.1


def _best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most of a height x width image and, among equals,
    wastes the least area (the model's ``select_best_resolution``)."""
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise FastVError(f"no anyres pinpoint fits a {height} x {width} image (pinpoints {list(pinpoints)}); "
                         "check the manifest's anyres pinpoints")
    return best


def _check_params(params: Mapping) -> tuple[int, int, list[list[int]], int, int]:
    """(tile, patches_per_side, pinpoints, max_num_patches, pooled_side) from ``params``, checked."""
    missing = [k for k in ("tile", "patches_per_side", "pinpoints", "max_num_patches", "pooled_side")
               if k not in params]
    if missing:
        raise FastVError(f"anyres params lack {missing}; rebuild them from the model config (the adapter's "
                         "anyres_params())")
    tile, p, q = int(params["tile"]), int(params["patches_per_side"]), int(params["pooled_side"])
    max_num = int(params["max_num_patches"])
    pinpoints = [[int(v) for v in pp] for pp in params["pinpoints"]]
    if tile <= 0 or p <= 0 or q <= 0 or max_num <= 0 or not pinpoints:
        raise FastVError(f"anyres params need positive tile, patches_per_side, pooled_side, max_num_patches and "
                         f"at least one pinpoint, got {dict(params)}")
    for ph, pw in pinpoints:
        if ph <= 0 or pw <= 0 or ph % tile or pw % tile:
            raise FastVError(f"anyres pinpoint {[ph, pw]} is not a positive multiple of the {tile} px tile; "
                             "every pinpoint must be whole tiles")
    return tile, p, pinpoints, max_num, q


def _check_int(name: str, value: int) -> int:
    """``value`` as a Python int, or FastVError when it is not a whole number."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FastVError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def anyres_layout(kind: str, height: int, width: int, frames: int, params: Mapping, *,
                  tiled: bool = True) -> tuple[int, np.ndarray]:
    """(T, rows) for one medium: T, the tiles of ``tile`` x ``tile`` pixels the vision graph
    encodes (an image: its base tile then its grid tiles row by row; a video: its frames), and
    ``rows`` (int64 [tokens], the graph input graphs/spec.py PACK_INDEX), the rows of the graph's feature
    table, in token order.

    ``height`` x ``width`` is the image's size in pixels (a video's frames are one tile); ``frames``
    is 1 for an image. ``tiled=False``: an image the processor does not tile (one of several images of
    one sample, its ``batch_num_images`` > 1): one tile, its features then one newline. Raises
    FastVError for bad input and for image sizes whose unpadded feature map the model would resize
    (more than ``max_num_patches`` tiles' worth of features, by over 10 %).
    """
    tile, p, pinpoints, max_num, q = _check_params(params)
    height, width, frames = _check_int("height", height), _check_int("width", width), _check_int("frames", frames)
    if height <= 0 or width <= 0:
        raise FastVError(f"a {kind} needs a positive size, got {height} x {width} pixels")
    if frames < 1:
        raise FastVError(f"a {kind} needs frames >= 1, got {frames}")
    if kind == "video":
        return _video_layout(height, width, frames, tile, p, q)
    if kind != "image":
        raise FastVError(f"medium kind must be 'image' or 'video', got {kind!r}")
    if frames != 1:
        raise FastVError(f"an image has one frame, got frames={frames}; pass kind 'video' for a video")
    if not tiled:
        newline = p * p + q * q                   # one tile: its p * p features, q * q pooled, newline
        return 1, np.concatenate([np.arange(p * p, dtype=np.int64), np.array([newline], np.int64)])
    return _image_layout(height, width, tile, p, pinpoints, max_num, q)


def _video_layout(height: int, width: int, frames: int, tile: int, p: int, q: int) -> tuple[int, np.ndarray]:
    """A video: one tile per frame; its tokens are the pooled rows of frame 0, 1, ... then one newline."""
    if (height, width) != (tile, tile):
        raise FastVError(f"video frames are one tile, {tile} x {tile} pixels, got {height} x {width}; resize "
                         f"the frames to {tile} x {tile}")
    pooled_start = frames * p * p
    newline = pooled_start + frames * q * q
    index = np.concatenate([np.arange(pooled_start, newline, dtype=np.int64), np.array([newline], np.int64)])
    return frames, index


def _image_layout(height: int, width: int, tile: int, p: int, pinpoints: list[list[int]], max_num: int,
                  q: int) -> tuple[int, np.ndarray]:
    """An image: base tile + the best pinpoint's grid of tiles; tokens as the model packs them."""
    best_h, best_w = _best_resolution(height, width, pinpoints)
    rows, cols = best_h // tile, best_w // tile
    tiles = 1 + rows * cols
    # tiles >= 2 always (pinpoints are whole tiles): the model's one-tile packing is tiled=False only
    newline = tiles * p * p + tiles * q * q       # the table's last row
    base = np.arange(p * p, dtype=np.int64)

    # the grid tiles as one (rows * p) x (cols * p) feature map: table row of every map cell
    r = np.arange(rows * p)[:, None]
    c = np.arange(cols * p)[None, :]
    grid_tile = 1 + (r // p) * cols + (c // p)
    feature_map = grid_tile * (p * p) + (r % p) * p + (c % p)

    # unpad to the image's aspect ratio (Python floats and rounding, as the model)
    cur_h, cur_w = rows * p, cols * p
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        feature_map = feature_map[pad:cur_h - pad, :]
    else:
        new_w = int(round(width * (cur_h / height), 7))
        pad = (cur_w - new_w) // 2
        feature_map = feature_map[:, pad:cur_w - pad]

    map_h, map_w = feature_map.shape
    ratio = math.sqrt(map_h * map_w / (max_num * p ** 2))
    if ratio > _INTERPOLATE_RATIO:
        raise FastVError(f"a {height} x {width} image is too large for the anyres limit of {max_num} tiles: its "
                         f"unpadded {map_h} x {map_w} feature map is {ratio:.3f} x the limit's side (the model "
                         f"resizes it above {_INTERPOLATE_RATIO}, the vision graph only selects rows); resize the "
                         f"image to at most {max_num} tiles of {tile} x {tile} px")
    with_newlines = np.concatenate([feature_map, np.full((map_h, 1), newline, np.int64)], axis=1)
    return tiles, np.concatenate([base, with_newlines.reshape(-1).astype(np.int64)])
