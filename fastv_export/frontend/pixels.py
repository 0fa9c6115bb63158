"""Pixel arithmetic of video frames, where transformers' video processors (torchvision-based, not available
here) cannot run: the Qwen smart resize, resizing with PIL, rescale and normalize, and the Qwen patch layout
of several frames. Images always go through the checkpoint's own image processor class."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from fastv_export.errors import FastVError

BICUBIC = 3     # PIL.Image.Resampling.BICUBIC, the video processors' default


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen-VL processors' resize target: both sides multiples of ``factor``, the area within [min_pixels,
    max_pixels], the aspect ratio kept as closely as the rounding allows."""
    if max(height, width) / min(height, width) > 200:
        raise FastVError(f"a {width}x{height} px image or frame is too elongated (aspect ratio over 200)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def resize(frames: Sequence, size: tuple[int, int], config: Mapping) -> list:
    """RGB PIL frames resized to ``size`` (height, width) with the config's resampling filter."""
    resample = int(config.get("resample", BICUBIC))
    h, w = size
    return [f.convert("RGB").resize((w, h), resample=resample) for f in frames]


def resize_normalize(frames: Sequence, size: tuple[int, int], config: Mapping) -> np.ndarray:
    """[F, 3, height, width] float32: resized (PIL), rescaled and normalized as the config says."""
    x = np.stack([np.asarray(f, dtype=np.float32) for f in resize(frames, size, config)])   # [F, h, w, 3]
    if config.get("do_rescale", True):
        x = x * np.float32(config.get("rescale_factor", 1 / 255))
    if config.get("do_normalize", True):
        mean = np.asarray(config.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        std = np.asarray(config.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).astype(np.float32))


def qwen_video_patches(image_processor, frames: Sequence, size: tuple[int, int], temporal_patch_size: int,
                       config: Mapping) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A video's pixel values [t * h * w, C * tp * p * p] and grid (t, h, w), as the Qwen video processor lays
    them out: the frames resized to ``size`` (PIL), then rescaled and normalized by the checkpoint's image
    processor itself (one frame at a time), the frame count padded to a multiple of the temporal patch by
    repeating the last frame, each patch holding ``tp`` consecutive frames."""
    frames = resize(frames, size, config)
    frames += [frames[-1]] * (-len(frames) % temporal_patch_size)
    out = image_processor(images=frames, do_resize=False, return_tensors="np")
    grids = out["image_grid_thw"]
    _, gh, gw = (int(x) for x in grids[0])
    rows, dim = gh * gw, out["pixel_values"].shape[1]
    p = int(image_processor.patch_size)
    tp_image = int(image_processor.temporal_patch_size)
    channels = dim // (tp_image * p * p)
    # each image's patches repeat the frame over the image processor's temporal patch: keep one copy
    per_frame = out["pixel_values"].reshape(len(frames), rows, channels, tp_image, p, p)[:, :, :, 0]
    t = len(frames) // temporal_patch_size
    video = per_frame.reshape(t, temporal_patch_size, rows, channels, p, p).transpose(0, 2, 3, 1, 4, 5)
    return np.ascontiguousarray(video.reshape(t * rows, channels * temporal_patch_size * p * p)), (t, gh, gw)
