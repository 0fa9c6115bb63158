"""Stage 2 of the pipeline: the PyTorch reference FastV (ground truth for every later stage).

- :mod:`.selection`: scoring and selection, the normative semantics (docs/design.md §2);
- :mod:`.fastv`: :func:`apply_fastv`, the plug-and-play in-place pass on a Hugging Face VLM;
- :mod:`.capture`: :func:`capture_query_key`, a layer's post-rotary query and key (what layer K-1 ranks with);
- :mod:`.gather`: the kept tokens' hidden states, mask, rotary embeddings and positions for layers >= K;
- :mod:`.decode`: :func:`greedy_decode`, greedy decoding that continues from a prefilled state (KV cache);
- :mod:`.rerank`: :func:`generate_rerank`, the authors' re-rank-every-step decode (comparison only).

Importing the package registers nothing: the attention capture is registered with transformers
when a capture is first installed.
"""
from fastv_export.reference.capture import capture_query_key, original_attention
from fastv_export.reference.decode import Prefilled, greedy_decode, prefill
from fastv_export.reference.fastv import FastVHandle, apply_fastv
from fastv_export.reference.gather import gather_rows, gather_seq, prefill_substitutions
from fastv_export.reference.rerank import RerankResult, generate_rerank

__all__ = ["FastVHandle", "Prefilled", "RerankResult", "apply_fastv", "capture_query_key",
           "gather_rows", "gather_seq", "generate_rerank", "greedy_decode", "original_attention", "prefill",
           "prefill_substitutions"]
