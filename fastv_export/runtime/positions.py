"""Position ids as the manifest's ``positions`` rules define them (numpy, no torch): what a runtime
feeds the graphs. RoPE: [B, n]; M-RoPE (Qwen2-VL): [3, B, n] (t, h, w) triples."""
from __future__ import annotations

import numpy as np


def prefill_positions(manifest: dict, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    rules = manifest["positions"]
    if rules["rank"] == 2:
        pos = np.cumsum(attention_mask, axis=1) - 1
        return np.where(attention_mask == 0, 1, pos).astype(np.int64)
    return _mrope_positions(manifest, input_ids, attention_mask)


def _mrope_positions(manifest: dict, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    image_ids = set(manifest["image_tokens"]["token_ids"])
    per_image = manifest["image_tokens"]["per_image"]
    merge = manifest["positions"]["spatial_merge_size"]
    grid = manifest["image_tokens"].get("grid_thw")
    t_g, h_g, w_g = grid[0], grid[1] // merge, grid[2] // merge
    assert t_g * h_g * w_g == per_image
    b, n = input_ids.shape
    out = np.zeros((3, b, n), dtype=np.int64)
    for r in range(b):
        real = np.nonzero(attention_mask[r])[0]
        ids = input_ids[r, real]
        pos = np.zeros((3, len(ids)), dtype=np.int64)
        i, nxt = 0, 0
        while i < len(ids):
            if int(ids[i]) in image_ids:
                t, h, w = np.meshgrid(np.arange(t_g), np.arange(h_g), np.arange(w_g), indexing="ij")
                block = np.stack([t.ravel(), h.ravel(), w.ravel()]) + nxt
                pos[:, i:i + per_image] = block
                nxt = int(block.max()) + 1
                i += per_image
            else:
                pos[:, i] = nxt
                nxt += 1
                i += 1
        out[:, r, real] = pos
    return out


def decode_positions(prompt_positions: np.ndarray, step: int) -> np.ndarray:
    """Positions of decode step ``step`` (0-based): max prompt position of the row + 1 + step."""
    if prompt_positions.ndim == 2:
        return (prompt_positions.max(axis=1, keepdims=True) + 1 + step).astype(np.int64)
    top = prompt_positions.max(axis=(0, 2))[:, None]                     # [B, 1]
    return np.broadcast_to(top + 1 + step, (3,) + top.shape).astype(np.int64).copy()
