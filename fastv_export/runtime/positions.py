"""Position ids as the manifest's ``positions`` rules define them (numpy, no torch): what a runtime
feeds the graphs. RoPE: [B, n]; M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): [3, B, n] (t, h, w) triples."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from fastv_export.errors import FastVError
from fastv_export.media import Media
from fastv_export.runtime.vision_feeds import media_grid

if TYPE_CHECKING:
    from fastv_export.bundle import Manifest


def prefill_positions(manifest: Manifest, input_ids: np.ndarray, attention_mask: np.ndarray,
                      video_seconds: Sequence[float] | None = None,
                      media: Sequence[Media] | None = None) -> np.ndarray:
    """``video_seconds``: seconds per temporal patch of each video of the batch, rows in order (the
    model's ``second_per_grid_ts``); only families whose video positions follow time use it. ``media``:
    every row's media, rows in order: the patch grid of each image and video (bundles whose vision
    layout is ``patch_grid``; None: images of the exported grid, videos of its frame size)."""
    if manifest.position_rank == 2:
        pos = np.cumsum(attention_mask, axis=1) - 1
        return np.where(attention_mask == 0, 1, pos).astype(np.int64)
    return _mrope_positions(manifest, input_ids, attention_mask, list(video_seconds or []), _row_grids(
        manifest, media, input_ids.shape[0]))


def _row_grids(manifest: Manifest, media: Sequence[Media] | None, batch: int) -> list[list] | None:
    """Each row's media as (t, h, w) patch grids, or None when the bundle's grid is fixed (or no media given)."""
    layout = manifest.vision_layout
    if media is None or layout["kind"] != "patch_grid":
        return None
    media = list(media)
    if len(media) % batch:
        raise FastVError(f"{len(media)} media for a batch of {batch} rows: every row holds the same media")
    per = len(media) // batch
    default = manifest.grid_thw
    return [[media_grid(layout, m, default) for m in media[r * per:(r + 1) * per]] for r in range(batch)]


def _mrope_positions(manifest: Manifest, input_ids: np.ndarray, attention_mask: np.ndarray,
                     video_seconds: list[float], row_grids: list[list] | None) -> np.ndarray:
    image_ids = set(manifest.image_token_ids)
    per_image = manifest.tokens_per_image
    merge = manifest.spatial_merge_size
    video_id = manifest.video_token_id
    per_second = manifest.video_tokens_per_second     # None: a video's temporal index is not scaled
    grid = manifest.grid_thw
    t_g, h_g, w_g = grid[0], grid[1] // merge, grid[2] // merge
    assert t_g * h_g * w_g == per_image
    seconds = iter(video_seconds)
    b, n = input_ids.shape
    out = np.zeros((3, b, n), dtype=np.int64)
    for r in range(b):
        real = np.nonzero(attention_mask[r])[0]
        ids = input_ids[r, real]
        pos = np.zeros((3, len(ids)), dtype=np.int64)
        grids = iter(row_grids[r]) if row_grids is not None else None
        i, nxt = 0, 0
        while i < len(ids):
            tok = int(ids[i])
            if tok not in image_ids:
                pos[:, i] = nxt
                nxt += 1
                i += 1
                continue
            h_m, w_m = h_g, w_g
            if grids is not None:   # this medium's own grid
                try:
                    t, h_m, w_m = next(grids)
                except StopIteration:
                    raise FastVError(f"row {r} holds more images and videos than the media given for it") from None
                h_m, w_m = h_m // merge, w_m // merge
            if tok == video_id:   # a video: its whole run, t temporal patches of its grid (Qwen3-VL: one per run)
                run = i
                while run < len(ids) and int(ids[run]) == tok:
                    run += 1
                t, length = (run - i) // (h_m * w_m), run - i
                interval = np.float32(1.0)
                if per_second is not None:
                    try:
                        interval = np.float32(per_second) * np.float32(next(seconds))
                    except StopIteration:
                        raise FastVError("the prompt holds more videos than seconds per temporal patch were "
                                         "given (video_seconds: one per video of the batch)") from None
                temporal = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)
            else:                  # an image: of its own grid, or of the exported one
                t = 1 if grids is not None else t_g
                length = t * h_m * w_m
                temporal = np.arange(t, dtype=np.int64)
            tt, hh, ww = np.meshgrid(temporal, np.arange(h_m), np.arange(w_m), indexing="ij")
            pos[:, i:i + length] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + nxt
            nxt += max(h_m, w_m)   # as the model: the next token follows the larger spatial side
            i += length
        out[:, r, real] = pos
    return out


def decode_positions(prompt_positions: np.ndarray, step: int) -> np.ndarray:
    """Positions of decode step ``step`` (0-based): max prompt position of the row + 1 + step."""
    if prompt_positions.ndim == 2:
        return (prompt_positions.max(axis=1, keepdims=True) + 1 + step).astype(np.int64)
    top = prompt_positions.max(axis=(0, 2))[:, None]                     # [B, 1]
    return np.broadcast_to(top + 1 + step, (3,) + top.shape).astype(np.int64).copy()
