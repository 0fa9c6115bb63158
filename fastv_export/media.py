"""What one image or video of a prompt is, in pixels: the description that the adapters (random inputs
for the tiny models, token counts), the prompts and the runtime (vision-graph feeds and M-RoPE positions
of families with a dynamic vision input) share. No torch here: a runtime without PyTorch reads it."""
from __future__ import annotations

from dataclasses import dataclass

from fastv_export.errors import FastVError


@dataclass(frozen=True)
class Media:
    """One image or video of a prompt. ``size`` (height, width) in pixels, None for the family's default
    image size; ``frames`` for a video (a multiple of the family's temporal patch); ``fps`` sets the time
    between frames (families whose temporal positions follow time: Qwen2.5-VL)."""
    kind: str = "image"                  # "image" | "video"
    size: tuple[int, int] | None = None
    frames: int = 1
    fps: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("image", "video"):
            raise FastVError(f"media kind must be 'image' or 'video', got {self.kind!r}")
        if self.kind == "image" and self.frames != 1:
            raise FastVError(f"an image has one frame, got frames={self.frames}; use Media('video', frames=...)")
        if self.frames < 1 or self.fps <= 0:
            raise FastVError(f"media needs frames >= 1 and fps > 0, got frames={self.frames}, fps={self.fps}")


def parse_media(text: str) -> list[Media]:
    """A prompt's media from the command line: ``image``, ``image@HxW``, ``video:FRAMES`` or
    ``video:FRAMES@HxW``, comma-separated, in prompt order (``video:8@112x168`` = 8 frames of 112 x 168 px)."""
    media = []
    for item in text.split(","):
        kind, _, size = item.strip().partition("@")
        kind, _, frames = kind.partition(":")
        try:
            hw = tuple(int(x) for x in size.split("x")) if size else None
            if hw is not None and len(hw) != 2:
                raise ValueError
            media.append(Media(kind, hw, frames=int(frames) if frames else 1))
        except ValueError:
            raise FastVError(f"--media {item!r}: expected image, image@HxW, video:FRAMES or video:FRAMES@HxW") from None
    return media


def patch_grid(media: Media, patch_size: int, merge_size: int, temporal_patch_size: int,
               default_grid: tuple[int, int]) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of ``media`` for a Qwen-VL vision tower (the model's ``image_grid_thw`` /
    ``video_grid_thw``); ``default_grid``: the (h, w) grid of an image without a size."""
    height, width = media.size or (default_grid[0] * patch_size, default_grid[1] * patch_size)
    unit = patch_size * merge_size
    if height % unit or width % unit or height < unit or width < unit:
        raise FastVError(f"{media}: height and width must be positive multiples of {unit} pixels "
                         f"(patch {patch_size} x merge {merge_size}); resize the image")
    if media.kind == "video" and media.frames % temporal_patch_size:
        raise FastVError(f"{media}: a video needs a multiple of {temporal_patch_size} frames (the temporal patch); "
                         "drop or repeat frames")
    t = media.frames // temporal_patch_size if media.kind == "video" else 1
    return t, height // patch_size, width // patch_size
