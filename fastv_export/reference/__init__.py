"""Stage 2 of the pipeline: the PyTorch reference FastV (ground truth for every later stage).

- :mod:`.selection`: scoring and selection, the normative semantics (docs/design.md §2);
- :mod:`.fastv`: :func:`apply_fastv`, the plug-and-play in-place pass on a Hugging Face VLM.
"""
from fastv_export.reference.fastv import FastVHandle, apply_fastv, original_attention

__all__ = ["FastVHandle", "apply_fastv", "original_attention"]
