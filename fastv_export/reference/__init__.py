"""Stage 2 of the pipeline: the PyTorch reference FastV (ground truth for every later stage).

- :mod:`.selection`: scoring and selection, the normative semantics (docs/design.md §2);
- :mod:`.fastv`: :func:`apply_fastv`, the plug-and-play in-place pass on a Hugging Face VLM;
- :mod:`.rerank`: :func:`generate_rerank`, the authors' re-rank-every-step decode (comparison only).
"""
from fastv_export.reference.fastv import FastVHandle, apply_fastv, original_attention
from fastv_export.reference.rerank import RerankResult, generate_rerank

__all__ = ["FastVHandle", "RerankResult", "apply_fastv", "generate_rerank", "original_attention"]
