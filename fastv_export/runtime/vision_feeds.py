"""The feeds of each vision-graph call, from the pixels and the media of a prompt (numpy, no torch): what
a runtime computes on the host before it calls the vision graph. The manifest's
``image_tokens.vision_layout`` says which layout a bundle's vision graph has (graphs/spec.py
``VISION_LAYOUTS``) and holds the numbers the host-side layout needs:

- ``fixed``: one call per image of the exported size, ``pixel_values`` only;
- ``patch_grid`` (Qwen2.5-VL): one call per image and per temporal patch of a video, any size the patch
  grid divides; the host gives each patch its (row, column) in the grid (block-major over the
  ``spatial_merge_size`` blocks, as the processor orders the patches) and the window layout of the window
  attention blocks (merged patches in window order, window boundaries over the patches);
- ``tiles`` (LLaVA-OneVision): one call per image (its anyres tiles) and per video (its frames), with the
  rows of the features to return in prompt order (fastv_export/runtime/anyres.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from fastv_export.errors import FastVError
from fastv_export.graphs import spec
from fastv_export.media import Media, patch_grid
from fastv_export.runtime.anyres import anyres_layout

if TYPE_CHECKING:
    from fastv_export.bundle import Manifest

def media_grid(layout: Mapping, media: Media, default: Sequence[int]) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of ``media`` in a ``patch_grid`` layout; ``default``: the exported image's
    (t, h, w) grid (media without a size)."""
    return patch_grid(media, layout["patch_size"], layout["spatial_merge_size"], layout["temporal_patch_size"],
                      (default[1], default[2]))


def patch_positions(h: int, w: int, merge: int) -> np.ndarray:
    """[h * w, 2] (row, column) of each patch of an h x w grid, in the processor's order: merge x merge
    blocks row-major, the patches of a block row-major inside it."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return np.stack([rows.reshape(shape).transpose(0, 2, 1, 3).ravel(),
                     cols.reshape(shape).transpose(0, 2, 1, 3).ravel()], axis=-1).astype(np.int64)


def window_layout(h: int, w: int, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(window_index, cu_window_seqlens) of one temporal patch of an h x w patch grid: the merged patches
    (row-major over the (h/merge) x (w/merge) merged grid) in window order — windows of ``window`` merged
    patches per side, row-major, the grid's last windows cut short — and the windows' cumulative lengths
    in patches, from 0."""
    mh, mw = h // merge, w // merge
    index = np.arange(mh * mw).reshape(mh, mw)
    order, bounds = [], [0]
    for r in range(0, mh, window):
        for c in range(0, mw, window):
            block = index[r:r + window, c:c + window].ravel()
            order.append(block)
            bounds.append(bounds[-1] + len(block) * merge * merge)
    return np.concatenate(order).astype(np.int64), np.asarray(bounds, dtype=np.int64)


def patch_grid_feeds(pixels: np.ndarray, h: int, w: int, layout: Mapping) -> dict[str, np.ndarray]:
    """The feeds of one ``patch_grid`` call: one image or temporal patch of an h x w patch grid."""
    merge = layout["spatial_merge_size"]
    if pixels.shape[0] != h * w:
        raise FastVError(f"a vision call of a {h} x {w} patch grid takes {h * w} patch rows, got pixel values of "
                         f"shape {list(pixels.shape)}")
    window = layout["window_size"] // merge // layout["patch_size"]
    index, bounds = window_layout(h, w, merge, window)
    return {spec.PIXEL_VALUES: pixels, spec.VISION_POSITION_IDS: patch_positions(h, w, merge),
            spec.WINDOW_INDEX: index, spec.CU_WINDOW_SEQLENS: bounds}


def vision_calls(manifest: Manifest, pixels: Sequence[np.ndarray], media: Sequence[Media] | None,
                 float_dtype) -> list[dict[str, np.ndarray]]:
    """The feeds of every vision call of a batch, in prompt order (rows in order). ``pixels``: the pixel
    input of each call (:meth:`ModelAdapter.vision_units`); ``media``: every row's media, rows in order
    (None: images of the exported size, one call each)."""
    layout = manifest.vision_layout
    pixels = [np.asarray(p).astype(float_dtype) for p in pixels]
    kind = layout["kind"]
    if kind == "fixed":
        want = manifest.vision_input_shape
        for i, px in enumerate(pixels):
            if list(px.shape) != list(want):
                raise FastVError(f"image {i} has pixel values of shape {list(px.shape)}; this bundle's vision graph "
                                 f"takes {want} (one image of the exported size)")
        return [{spec.PIXEL_VALUES: px} for px in pixels]
    media = list(media) if media is not None else [Media()] * len(pixels)
    if kind == "patch_grid":
        default = manifest.grid_thw
        units = [(h, w) for t, h, w in (media_grid(layout, m, default) for m in media) for _ in range(t)]
        if len(units) != len(pixels):
            raise FastVError(f"the media of this batch make {len(units)} vision calls (one per image and per "
                             f"temporal patch of a video), got {len(pixels)} pixel inputs")
        return [patch_grid_feeds(px, h, w, layout) for px, (h, w) in zip(pixels, units)]
    if kind == "tiles":
        if len(media) != len(pixels):
            raise FastVError(f"the media of this batch make {len(media)} vision calls (one per image and per video), "
                             f"got {len(pixels)} pixel inputs")
        calls = []
        for px, m in zip(pixels, media):
            default = (layout["tile"], layout["tile"]) if m.kind == "video" else tuple(layout["default_size"])
            height, width = m.size or default
            tiles, index = anyres_layout(m.kind, height, width, m.frames, layout)
            if px.shape[0] != tiles:
                raise FastVError(f"{m} takes {tiles} tiles in one vision call, got pixel values of shape "
                                 f"{list(px.shape)}")
            calls.append({spec.PIXEL_VALUES: px, spec.PACK_INDEX: index})
        return calls
    raise FastVError(f"manifest field 'image_tokens.vision_layout.kind' is {kind!r}; this runtime knows "
                     f"{', '.join(spec.VISION_LAYOUTS)}: update fastv-export or re-export the bundle")
