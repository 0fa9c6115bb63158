"""Videos: a file decoded with PyAV, or a folder of frames, sampled as the checkpoint's video processor says.

Frame sampling follows transformers' video processors (5.23) exactly:

- Qwen2-VL family (``Qwen2VLVideoProcessor.sample_frames``), with the temporal patch ``tp``: ``num_frames``
  given -> ``round(num_frames / tp) * tp``; else with ``fps``: ``max_frames = floor(min(max_frames, total) /
  tp) * tp``, ``n = total / video_fps * fps`` clamped to ``[min_frames, min(max_frames, total)]`` and floored
  to a multiple of ``tp``; the indices are ``torch.arange(0, total, total / n).int()`` (a float32 ramp,
  truncated);
- the others (``default_sample_indices_fn``, e.g. LLaVA-OneVision): ``num_frames`` given, else with ``fps``
  ``n = max(1, int(total / video_fps * fps))``; the indices are ``arange(n) * total // n``.

``do_sample_frames`` false in the config (the processors' default): every frame is taken. A folder of frames
has no frame rate of its own: it counts as a video at the processor's ``fps`` (2 when unset), so every
frame is taken then too (up to the frame limits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from fastv_export.errors import FastVError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_FOLDER_FPS = 2.0


@dataclass(frozen=True)
class Sampling:
    """What a video processor config says about frame sampling (``video_preprocessor_config.json``)."""
    do_sample_frames: bool = False
    fps: float | None = None
    num_frames: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    temporal_patch_size: int | None = None     # set: the Qwen2-VL family's rule

    @classmethod
    def from_config(cls, config: Mapping, qwen_rule: bool) -> Sampling:
        tp = (config.get("temporal_patch_size") or 2) if qwen_rule else None
        return cls(bool(config.get("do_sample_frames", False)), config.get("fps"), config.get("num_frames"),
                   config.get("min_frames", 4 if qwen_rule else None),
                   config.get("max_frames", 768 if qwen_rule else None), int(tp) if tp else None)


def qwen_sample_indices(total: int, video_fps: float, *, fps: float | None, num_frames: int | None,
                        min_frames: int, max_frames: int, temporal_patch_size: int) -> np.ndarray:
    """Qwen2VLVideoProcessor.sample_frames: the indices of the frames to keep."""
    tp = temporal_patch_size
    if num_frames is not None:
        n = round(num_frames / tp) * tp
    elif fps is not None:
        max_frames = math.floor(min(max_frames, total) / tp) * tp
        n = total / video_fps * fps
        n = min(max(n, min_frames), max_frames, total)
        n = math.floor(n / tp) * tp
    else:
        n = None
    if n is not None and n > total:
        raise FastVError(f"the video has {total} frames, fewer than the {n} the video processor samples; "
                         "give a longer video or lower num_frames / fps in video_preprocessor_config.json")
    if n is None:
        return np.arange(total, dtype=np.int64)
    if n < 1:
        raise FastVError(f"the video has {total} frames: too few to sample whole temporal patches of {tp} frames; "
                         "give a longer video")
    step = total / n                                   # torch.arange(0, total, step): values in float32
    count = math.ceil(total / step)
    return np.array([int(np.float32(i * step)) for i in range(count)], dtype=np.int64)


def default_sample_indices(total: int, video_fps: float, *, fps: float | None,
                           num_frames: int | None) -> np.ndarray:
    """transformers.video_utils.default_sample_indices_fn: the indices of the frames to keep."""
    if num_frames is None and fps is not None:
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None:
        return np.arange(total, dtype=np.int64)
    if num_frames > total:
        raise FastVError(f"the video has {total} frames, fewer than the {num_frames} the video processor samples; "
                         "give a longer video or lower num_frames / fps in video_preprocessor_config.json")
    return np.arange(num_frames, dtype=np.int64) * total // num_frames


def sample_indices(total: int, video_fps: float, sampling: Sampling) -> np.ndarray:
    """The frames the checkpoint's video processor keeps of a video of ``total`` frames at ``video_fps``."""
    if total < 1:
        raise FastVError("the video holds no frames")
    if not sampling.do_sample_frames:
        return np.arange(total, dtype=np.int64)
    if sampling.temporal_patch_size is not None:
        return qwen_sample_indices(total, video_fps, fps=sampling.fps if sampling.num_frames is None else None,
                                   num_frames=sampling.num_frames, min_frames=sampling.min_frames or 4,
                                   max_frames=sampling.max_frames or 768,
                                   temporal_patch_size=sampling.temporal_patch_size)
    return default_sample_indices(total, video_fps, fps=sampling.fps if sampling.num_frames is None else None,
                                  num_frames=sampling.num_frames)


@dataclass
class Video:
    """Sampled frames (RGB PIL images), the source's frame rate and the rate of the frames kept."""
    frames: list
    source_fps: float
    sampled_fps: float
    total_frames: int


def read_video(path: str | Path, sampling: Sampling) -> Video:
    """A video file (any container and codec PyAV reads) or a folder of image files (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, sampling)
    if not path.is_file():
        raise FastVError(f"video {path} does not exist; give a video file or a folder of frames")
    return _read_file(path, sampling)


def _sampled_fps(source_fps: float, total: int, kept: np.ndarray) -> float:
    """The frame rate of the kept frames: as many frames over the same duration."""
    return source_fps * len(kept) / total


def _read_folder(path: Path, sampling: Sampling) -> Video:
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FastVError(f"video folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    fps = float(sampling.fps or DEFAULT_FOLDER_FPS)
    kept = sample_indices(len(files), fps, sampling)
    frames = []
    for i in kept:
        try:
            with Image.open(files[i]) as im:
                frames.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise FastVError(f"frame {files[i]} cannot be read as an image ({exc})") from None
    return Video(frames, fps, _sampled_fps(fps, len(files), kept), len(files))


def _read_file(path: Path, sampling: Sampling) -> Video:
    try:
        import av
    except ImportError:
        raise FastVError("reading video files needs PyAV: pip install av (or give a folder of frames)") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FastVError(f"video {path} holds no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            decoded = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
    except FastVError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise FastVError(f"video {path} cannot be decoded ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "give a video file PyAV reads (mp4, webm, avi, ...) or a folder of frames") from None
    if not decoded:
        raise FastVError(f"video {path} holds no frames")
    if not fps:
        raise FastVError(f"video {path} records no frame rate; give its frames as a folder instead")
    kept = sample_indices(len(decoded), fps, sampling)
    return Video([decoded[i] for i in kept], fps, _sampled_fps(fps, len(decoded), kept), len(decoded))
