"""FLOPs and KV-cache model of a FastV prefill (paper §4.2, Eq. 5), with an exact count beside it.

Two estimates of the same prefill of ``n = M + T_txt`` prompt tokens (M image, T_txt text) through
a decoder of ``L`` layers, where FastV drops ``floor(M * p / q)`` image tokens at layer ``K`` so
that layers ``>= K`` see ``n_hat = n - dropped`` tokens:

* **Eq. 5** (the paper's): one layer costs ``4 n d^2 + 2 n^2 d + 2 n d m`` (d hidden size,
  m FFN intermediate size). We report the per-layer average
  ``(K f(n) + (L - K) f(n_hat)) / L`` in units of 1e9, which is how Table 1's "Flops(B)" column
  is defined (LLaVA-1.5-13B, 576 image + 36 text tokens: baseline 154.6).
* **Exact** (multiply-add = 2 FLOPs), summed over the whole prefill:

  - projections with GQA: q ``2 n d H hd``, k and v ``2 n d Hkv hd`` each, o ``2 n H hd d``;
  - attention with causal masking: ``Q K^T`` and ``P V`` each ``2 hd H * n (n + 1) / 2``
    (query i sees i keys; the kept tokens keep their order, so layers >= K use ``n_hat``);
  - gated MLP (gate, up, down): ``3 * 2 n d m``;
  - lm_head on the last prompt token only: ``2 d V``.

  Ignored: norms, softmax, rotary embeddings, residual adds, activation functions, embedding
  lookup, the vision tower and projector, and FastV's own ranking (a top-k over M scores).

The KV cache holds ``2 Hkv hd n`` elements per layer: ``n`` for layers < K, ``n_hat`` for layers
>= K (pruning happens once, in prefill). Bytes per element come from ``dtype``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from fastv_export.config import FastVConfig
from fastv_export.decoder_shape import DecoderShape
from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

GIGA = 10**9
DTYPE_BYTES: dict[str, int] = {"fp16": 2, "bf16": 2, "fp32": 4}
DEFAULT_MODEL_CONFIG = "tiny-llava"


PAPER_PRESETS: dict[str, DecoderShape] = {
    # LLaMA/Vicuna language models of LLaVA-1.5 (vocab as in the llava-hf checkpoints)
    "llava-1.5-7b": DecoderShape(4096, 11008, 32, 32, 32, 128, 32064),
    "llava-1.5-13b": DecoderShape(5120, 13824, 40, 40, 40, 128, 32064),
}


def resolve_shape(spec: str | Path) -> DecoderShape:
    """A config.json path or checkpoint directory, a paper preset (:data:`PAPER_PRESETS`) or a
    built-in model preset (``fastv_export.presets.PRESETS``, e.g. ``tiny-llava``)."""
    from fastv_export.presets import PRESETS, build_preset_config

    text = str(spec)
    if Path(text).exists():
        return DecoderShape.from_json(text)
    if text in PAPER_PRESETS:
        return PAPER_PRESETS[text]
    if text in PRESETS:
        return DecoderShape.from_config(build_preset_config(text))
    if text.endswith(".json") or "/" in text or "\\" in text:
        raise FastVError(f"model config file {text!r} not found")
    known = ", ".join([*PAPER_PRESETS, *PRESETS])
    raise FastVError(f"unknown model config {text!r}: give a config.json path or one of the presets {known}")


# --------------------------------------------------------------------------------------- formulas

def eq5_layer_flops(n: int, d: int, m: int) -> int:
    """Paper Eq. 5, one layer: ``4 n d^2 + 2 n^2 d + 2 n d m``."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def exact_layer_flops(shape: DecoderShape, n: int) -> int:
    """Exact FLOPs of one decoder layer over ``n`` causal tokens (see the module docstring)."""
    d, hd = shape.hidden_size, shape.head_dim
    q_width, kv_width = shape.num_heads * hd, shape.num_kv_heads * hd
    projections = 2 * n * d * q_width + 2 * (2 * n * d * kv_width) + 2 * n * q_width * d
    attention = 2 * (2 * hd * shape.num_heads * (n * (n + 1) // 2))   # Q K^T and P V, causal
    mlp = 3 * 2 * n * d * shape.intermediate_size
    return projections + attention + mlp


def kv_cache_layer_elems(shape: DecoderShape, n: int) -> int:
    """Elements of one layer's KV cache (keys and values) over ``n`` tokens."""
    return 2 * shape.num_kv_heads * shape.head_dim * n


def decode_read_bytes(shape: DecoderShape, k: int, n: int, n_kept: int, steps: int,
                      dtype: str = "fp16") -> tuple[int, int, int]:
    """Bytes read over ``steps`` decode steps: (KV unpruned, KV FastV, weights). Step t attends over
    n + t cached tokens in every layer (unpruned) or n + t below K and n' + t from K on (FastV).
    Weights: the q/k/v/o projections, the gated MLP and the lm_head, read once per step (batch 1);
    elements of ``dtype`` (:data:`DTYPE_BYTES`)."""
    L = shape.num_layers
    kv_base = kv_fastv = 0
    for t in range(steps):
        kv_base += L * kv_cache_layer_elems(shape, n + t)
        kv_fastv += k * kv_cache_layer_elems(shape, n + t) + (L - k) * kv_cache_layer_elems(shape, n_kept + t)
    d, hd = shape.hidden_size, shape.head_dim
    layer = 2 * d * shape.num_heads * hd + 2 * d * shape.num_kv_heads * hd + 3 * d * shape.intermediate_size
    weights = steps * (L * layer + d * shape.vocab_size)
    elem = DTYPE_BYTES[dtype]
    return kv_base * elem, kv_fastv * elem, weights * elem


def _fastv_config(k: int, ratio: Fraction | float | str | None, keep: int | None) -> FastVConfig:
    # the ranking does not change the cost; K = 0 only admits "random"
    if keep is None and ratio is None:
        ratio = "1/2"
    return FastVConfig(k=k, ratio=ratio, keep=keep, ranking="random" if k == 0 else "last")


# ---------------------------------------------------------------------------------------- report

@dataclass(frozen=True)
class FlopsReport:
    """Baseline vs FastV cost of one prefill. FLOPs and bytes are exact integers (Eq. 5's per-layer
    average is an exact Fraction); the ``*_gflops`` values of :meth:`to_dict` are in units of 1e9."""

    shape: DecoderShape
    k: int
    r: Fraction                    # the given R, or the effective dropped fraction with ``keep``
    keep: int | None
    image_tokens: int
    text_tokens: int
    kept_image_tokens: int
    dtype: str
    eq5_baseline_per_layer: Fraction
    eq5_fastv_per_layer: Fraction
    exact_baseline: int
    exact_fastv: int
    kv_baseline_bytes: int
    kv_fastv_bytes: int
    model: str | None = None

    @property
    def n(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def n_hat(self) -> int:
        return self.kept_image_tokens + self.text_tokens

    @property
    def eq5_ratio(self) -> float:
        return float(self.eq5_fastv_per_layer / self.eq5_baseline_per_layer)

    @property
    def exact_ratio(self) -> float:
        return float(Fraction(self.exact_fastv, self.exact_baseline))

    @property
    def kv_cache_ratio(self) -> float:
        return float(Fraction(self.kv_fastv_bytes, self.kv_baseline_bytes))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (inputs, Eq. 5, exact count, KV cache, speedups = baseline / FastV)."""
        return {
            "model": self.model,
            "decoder": asdict(self.shape),
            "k": self.k,
            "r": f"{self.r.numerator}/{self.r.denominator}",
            "keep": self.keep,
            "image_tokens": self.image_tokens,
            "text_tokens": self.text_tokens,
            "kept_image_tokens": self.kept_image_tokens,
            "dropped_image_tokens": self.image_tokens - self.kept_image_tokens,
            "n": self.n,
            "n_hat": self.n_hat,
            "eq5_baseline_gflops_per_layer": float(self.eq5_baseline_per_layer / GIGA),
            "eq5_gflops_per_layer": float(self.eq5_fastv_per_layer / GIGA),
            "eq5_ratio": self.eq5_ratio,
            "eq5_speedup": 1 / self.eq5_ratio,
            "exact_baseline_gflops": self.exact_baseline / GIGA,
            "exact_gflops": self.exact_fastv / GIGA,
            "exact_ratio": self.exact_ratio,
            "exact_speedup": 1 / self.exact_ratio,
            "dtype": self.dtype,
            "dtype_bytes": DTYPE_BYTES[self.dtype],
            "kv_cache_baseline_bytes": self.kv_baseline_bytes,
            "kv_cache_bytes": self.kv_fastv_bytes,
            "kv_cache_ratio": self.kv_cache_ratio,
        }


def estimate(shape: DecoderShape, image_tokens: int = 576, text_tokens: int = 36, k: int = 2,
             ratio: Fraction | float | str | None = None, keep: int | None = None, dtype: str = "fp16",
             model: str | None = None) -> FlopsReport:
    """Baseline vs FastV (K, R or keep) cost of a prefill of ``image_tokens + text_tokens`` tokens.

    ``ratio`` defaults to 1/2 when ``keep`` is not given. Raises :class:`FastVError` for K >= the
    number of layers, R outside [0, 1), keep > image_tokens, negative token counts, unknown dtype.
    """
    for name, value in (("image_tokens", image_tokens), ("text_tokens", text_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FastVError(f"{name} must be an integer >= 0, got {value!r}")
    if image_tokens + text_tokens == 0:
        raise FastVError("the prompt is empty: give image_tokens + text_tokens >= 1")
    if dtype not in DTYPE_BYTES:
        raise FastVError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    cfg = _fastv_config(k, ratio, keep)
    cfg.check_layers(shape.num_layers)
    kept = cfg.keep_count(image_tokens)
    n, n_hat = image_tokens + text_tokens, kept + text_tokens
    if n_hat == 0:
        raise FastVError("FastV would drop every prompt token (keep=0 and no text tokens)")
    r = cfg.r if keep is None else Fraction(image_tokens - kept, image_tokens or 1)
    L, K = shape.num_layers, cfg.k
    d, m = shape.hidden_size, shape.intermediate_size
    lm_head = 2 * d * shape.vocab_size
    elem = DTYPE_BYTES[dtype]
    report = FlopsReport(
        shape=shape, k=K, r=r, keep=keep, image_tokens=image_tokens, text_tokens=text_tokens,
        kept_image_tokens=kept, dtype=dtype, model=model,
        eq5_baseline_per_layer=Fraction(eq5_layer_flops(n, d, m)),
        eq5_fastv_per_layer=Fraction(K * eq5_layer_flops(n, d, m) + (L - K) * eq5_layer_flops(n_hat, d, m), L),
        exact_baseline=L * exact_layer_flops(shape, n) + lm_head,
        exact_fastv=K * exact_layer_flops(shape, n) + (L - K) * exact_layer_flops(shape, n_hat) + lm_head,
        kv_baseline_bytes=L * kv_cache_layer_elems(shape, n) * elem,
        kv_fastv_bytes=(K * kv_cache_layer_elems(shape, n) + (L - K) * kv_cache_layer_elems(shape, n_hat)) * elem,
    )
    log.debug("flops: %s n=%d n_hat=%d -> eq5 ratio %.4f exact ratio %.4f", shape, n, n_hat,
              report.eq5_ratio, report.exact_ratio)
    return report


def eq5_speedup(shape: DecoderShape, image_tokens: int = 576, text_tokens: int = 36, k: int = 2,
                ratio: Fraction | float | str | None = None, keep: int | None = None) -> float:
    """Theoretical prefill speedup baseline / FastV by Eq. 5 (1 / FLOPs ratio; 1.0 for R = 0)."""
    return 1 / estimate(shape, image_tokens, text_tokens, k, ratio, keep).eq5_ratio


def exact_speedup(shape: DecoderShape, image_tokens: int = 576, text_tokens: int = 36, k: int = 2,
                  ratio: Fraction | float | str | None = None, keep: int | None = None) -> float:
    """Prefill speedup baseline / FastV by the exact count (GQA, causal attention, lm_head)."""
    return 1 / estimate(shape, image_tokens, text_tokens, k, ratio, keep).exact_ratio


# ---------------------------------------------------------------------------------------- text

def format_report(rep: FlopsReport) -> str:
    """A short human-readable table of baseline vs FastV."""
    d = rep.to_dict()
    s = rep.shape
    what = f"keep={rep.keep}" if rep.keep is not None else f"R={d['r']}"
    mb = 1024 * 1024
    rows = [
        ("Eq.5 GFLOPs/layer", d["eq5_baseline_gflops_per_layer"], d["eq5_gflops_per_layer"], d["eq5_ratio"]),
        ("exact prefill GFLOPs", d["exact_baseline_gflops"], d["exact_gflops"], d["exact_ratio"]),
        (f"KV cache MiB ({rep.dtype})", rep.kv_baseline_bytes / mb, rep.kv_fastv_bytes / mb, d["kv_cache_ratio"]),
    ]
    lines = [
        f"model: {rep.model or '?'} ({s.num_layers} layers, hidden {s.hidden_size}, intermediate {s.intermediate_size}, "
        f"heads {s.num_heads}/{s.num_kv_heads} kv, head_dim {s.head_dim}, vocab {s.vocab_size})",
        f"prompt: n={rep.n} ({rep.image_tokens} image + {rep.text_tokens} text); FastV K={rep.k} {what}: "
        f"keeps {rep.kept_image_tokens} image tokens, n_hat={rep.n_hat} in layers >= {rep.k}",
        "",
        f"{'':24}{'baseline':>14}{'FastV':>14}{'ratio':>9}{'speedup':>9}",
    ]
    for name, base, fast, ratio in rows:
        speed = f"{1 / ratio:.2f}x" if ratio else "inf"
        lines.append(f"{name:24}{base:14.3f}{fast:14.3f}{ratio:9.3f}{speed:>9}")
    return "\n".join(lines)
