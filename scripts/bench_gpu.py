#!/usr/bin/env python
"""The PyTorch reference FastV at real sizes on one GPU: LLaVA-1.5-7B and Qwen2.5-VL-7B shapes, random bf16
weights created on the device (nothing downloaded, no network), against the unpruned model in the same run.

For each prompt -- LLaVA-1.5-7B with 1, 4 and 8 images (576 tokens each), Qwen2.5-VL-7B with a ~3,000-token
video -- and each FastV configuration (K=2, R = 1/2, 3/4, 9/10; the unpruned model beside them, configurations
interleaved so that clock drift hits them alike), the medians of:
- prefill: the language model over the prompt, the last position's logits only (``logits_to_keep=1``); the media
  tokens enter as input ids with their real positions (M-RoPE grids for the video), the vision tower is not run
  in the prefill (FastV does not change it; LLaVA's CLIP ViT-L/14-336 is timed on its own, Qwen2.5-VL's vision
  tower is not run: its 12,288-patch video would cost about as much as the language model and is left out);
- decode: ms per token of greedy decoding from that prefill's KV cache (fastv_export/reference/decode.py: the
  decoder layers called one token at a time, as Hugging Face eager PyTorch runs them);
- the FastV prefill with layer K-1 scored as the FastV authors' code does it (eager attention, the n x n
  attention weights materialised and returned, ranked from their last row, mean over heads, top-k);
- peak GPU memory of prefill + decode.
Beside the measured ratios (FastV / unpruned time): Eq. 5's FLOPs ratio and the exact count
(fastv_export/analysis/flops.py), the KV-read ratio of the decode steps and the ratio of all bytes read per
decode step (weights + KV cache: what bounds a memory-bound decode). A second table times layer K-1 alone on
the prompt: SDPA (what the reference runs), eager with weights returned (the authors' way), the reference's
ranking + selection + gather, and the TokenSelect CUDA kernels (the plugin's C API, libfastv_ts_kernels.so:
--kernels-lib or $FASTV_KERNELS_LIB, as scripts/gpu_check.sh builds it) on that layer's query, key and output.

Writes bench_gpu.md, bench_gpu.json and bench_gpu.png (matplotlib, if installed) into --out.
CUDA events time the GPU work between synchronisations; on the CPU (--device cpu) the wall clock does.

usage: python scripts/bench_gpu.py [--out DIR] [--repeats 3] [--decode-tokens 32] [--budget-s 330]
       python scripts/bench_gpu.py --device cpu --tiny --out /tmp/b   # the same code path, tiny shapes (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _checkout_imports() -> None:
    """Make ``fastv_export`` importable from this checkout when it is not installed (a bare GPU machine): the
    checkout on sys.path, and its top-level graphs/ and calibrate/ folders found as ``fastv_export.graphs`` /
    ``fastv_export.calibrate`` (where pyproject.toml's package-dir puts them in an install)."""
    import importlib.abc
    import importlib.util

    if importlib.util.find_spec("fastv_export") is not None:
        return

    class CheckoutFolders(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            prefix, _, name = fullname.partition(".")
            if prefix != "fastv_export" or name not in ("graphs", "calibrate"):
                return None
            return importlib.util.spec_from_file_location(fullname, ROOT / name / "__init__.py",
                                                          submodule_search_locations=[str(ROOT / name)])
    sys.path.insert(0, str(ROOT))
    sys.meta_path.append(CheckoutFolders())


_checkout_imports()

from fastv_export.adapters import get_adapter  # noqa: E402
from fastv_export.analysis.flops import decode_read_bytes, estimate  # noqa: E402
from fastv_export.config import FastVConfig  # noqa: E402
from fastv_export.decoder_shape import DecoderShape  # noqa: E402
from fastv_export.errors import FastVError  # noqa: E402
from fastv_export.files import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from fastv_export.media import Media  # noqa: E402
from fastv_export.prompts import make_prompt  # noqa: E402
from fastv_export.reference import apply_fastv, capture_query_key  # noqa: E402
from fastv_export.reference.decode import greedy_decode, prefill  # noqa: E402
from fastv_export.reference.gather import gather_seq  # noqa: E402
from fastv_export.reference.selection import candidate_scores, select_kept  # noqa: E402

log = logging.getLogger("bench_gpu")

MODELS = ("llava-1.5-7b", "qwen2.5-vl-7b")
PIXEL_INPUTS = ("pixel_values", "pixel_values_videos", "image_sizes")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOPS_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
GIB = 1024 ** 3
TRANSFORMERS_PINNED = "5.23.0"


# ------------------------------------------------------------------------------------------ the models
def llava_config(tiny: bool):
    """LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336 px (576 tokens per image), Vicuna-7B;
    tiny: the same classes, 64 tokens per image, 4 layers of hidden 64."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=7, projection_dim=32)
        text = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=500, image_seq_length=64)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def qwen_config(tiny: bool):
    """Qwen2.5-VL-7B-Instruct (28 layers of hidden 3584, GQA 28/4, M-RoPE 16/24/24); tiny: 4 layers of hidden 64."""
    from transformers import Qwen2_5_VLConfig

    if tiny:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, use_sliding_window=False)
        ids = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
    else:
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    pad_token_id=151643, bos_token_id=151643, eos_token_id=151645, use_sliding_window=False)
        ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def model_class(name: str):
    import transformers

    return {"llava-1.5-7b": transformers.LlavaForConditionalGeneration,
            "qwen2.5-vl-7b": transformers.Qwen2_5_VLForConditionalGeneration}[name]


def build_model(name: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model with random weights (the config's own initialisation, seeded) created directly on ``device``."""
    config = llava_config(tiny) if name == "llava-1.5-7b" else qwen_config(tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(name)._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@dataclass(frozen=True)
class Case:
    """One prompt: a model and its media (every token of them a FastV candidate)."""
    model: str
    label: str
    media: tuple[Media, ...]


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    if "llava-1.5-7b" in args.models:
        for k in args.images:
            out.append(Case("llava-1.5-7b", f"{k} image{'s' if k > 1 else ''}", (Media("image"),) * k))
    if "qwen2.5-vl-7b" in args.models:
        h, w = args.video_size
        out.append(Case("qwen2.5-vl-7b", f"video {args.video_frames} frames {h}x{w}",
                        (Media("video", size=(h, w), frames=args.video_frames),)))
    return out


# ------------------------------------------------------------------------------------------ timing
class Clock:
    """Milliseconds of ``fn()``: CUDA events around it after a synchronisation on a GPU, the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop), out
        t = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t) * 1e3, out

    def median(self, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self.time(fn)[0] for _ in range(max(1, repeats)))

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else float("nan")


# ------------------------------------------------------------------------------------------ layer K-1 as the authors
@contextlib.contextmanager
def attention_implementation(attn: nn.Module, impl: str) -> Iterator[None]:
    """Run one attention module with ``impl`` (a private config copy, as reference/capture.py does)."""
    config = attn.config
    private = copy.copy(config)
    private._attn_implementation_internal = impl
    attn.config = private
    try:
        yield
    finally:
        attn.config = config


def _additive_causal_mask(kwargs: dict, hidden: torch.Tensor) -> torch.Tensor:
    """The mask eager attention adds: 0 where allowed, the dtype's minimum elsewhere ([B, 1, n, n]); causal,
    combined with a boolean mask the model built for SDPA (None when SDPA uses its causal flag)."""
    n = hidden.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()[None, None]
    given = kwargs.get("attention_mask")
    if isinstance(given, torch.Tensor):
        if given.dtype != torch.bool:
            return given                          # already additive
        allowed = allowed & given[..., :n, :n]
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    return torch.where(allowed, zero, torch.finfo(hidden.dtype).min)


@contextlib.contextmanager
def authors_layer(layer: nn.Module, candidates: torch.Tensor, keep: int) -> Iterator[dict]:
    """Layer ``layer`` (K-1) as the FastV authors' code runs it: eager attention with an explicit causal mask, the
    attention weights [B, H, n, n] returned and ranked (mean over heads, the last row, top-``keep`` of the image
    tokens). The ranking is kept in the yielded dict (``top``); the reference still selects with its own."""
    seen: dict = {}

    def mask_hook(mod: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs["attention_mask"] = _additive_causal_mask(kwargs, hidden)
        return args, kwargs

    def weights_hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        weights = out[1]
        if weights is None:
            raise FastVError("layer K-1 returned no attention weights with eager attention")
        last = weights.mean(dim=1)[:, -1]                       # [B, n], as their code reads it
        seen["top"] = torch.gather(last, 1, candidates).topk(keep, dim=1).indices
    with attention_implementation(layer.self_attn, "eager"):
        hooks = [layer.register_forward_pre_hook(mask_hook, with_kwargs=True),
                 layer.self_attn.register_forward_hook(weights_hook, with_kwargs=True)]
        try:
            yield seen
        finally:
            for h in hooks:
                h.remove()


# ------------------------------------------------------------------------------------------ the CUDA kernels
class TokenSelectKernels:
    """The plugin's C API (plugins/src/c_api.cpp, the kernels-only library): one whole TokenSelect op,
    ranking ``last``, on device tensors."""

    def __init__(self, path: str) -> None:
        i64 = ctypes.c_int64
        self.i64 = i64
        so = ctypes.CDLL(path)
        so.fastv_ts_last_error.restype = ctypes.c_char_p
        so.fastv_ts_kept_length.restype = i64
        so.fastv_ts_kept_length.argtypes = [i64, i64, ctypes.c_int32, i64, i64, i64]
        so.fastv_ts_workspace_size.restype = ctypes.c_uint64
        so.fastv_ts_workspace_size.argtypes = [ctypes.c_int32, i64, i64, i64, ctypes.POINTER(i64)]
        so.fastv_ts_run.restype = ctypes.c_int32
        so.fastv_ts_run.argtypes = [ctypes.c_int32, i64, i64, i64, ctypes.c_float, i64, ctypes.c_int32,
                                    ctypes.POINTER(i64)] + [ctypes.c_void_p] * 10 + [ctypes.c_uint64, ctypes.c_void_p]
        self.so = so

    def _error(self, what: str) -> FastVError:
        return FastVError(f"TokenSelect kernels: {what} failed: {(self.so.fastv_ts_last_error() or b'').decode()}")

    def launcher(self, hidden: torch.Tensor, query: torch.Tensor, key: torch.Tensor, candidates: torch.Tensor,
                 planes: int, scale: float, ratio: Fraction) -> Callable[[], None]:
        """A call of fastv_ts_run (ranking last, one query row) on these tensors; buffers allocated once here."""
        import numpy as np

        dev = hidden.device
        b, n, d_model = hidden.shape
        m = candidates.shape[1]
        dtype_code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[hidden.dtype]
        hidden, query, key = hidden.contiguous(), query[:, :, -1:].contiguous(), key.contiguous()
        mask = torch.ones(b, n, dtype=torch.int64, device=dev)
        pos = torch.arange(n, device=dev).repeat(b, 1)
        pos = pos.expand(3, b, n).contiguous() if planes == 3 else pos
        cand = candidates.to(torch.int64).contiguous()
        dims = np.array([b, n, d_model, query.shape[1], 1, query.shape[3], key.shape[1], key.shape[2], m, planes],
                        np.int64)
        dims_p = dims.ctypes.data_as(ctypes.POINTER(self.i64))
        num, den = ratio.numerator, ratio.denominator
        n_kept = self.so.fastv_ts_kept_length(n, m, 0, num, den, -1)
        ws_bytes = self.so.fastv_ts_workspace_size(0, num, den, -1, dims_p)
        if n_kept < 0 or ws_bytes == 0:
            raise self._error("sizing")
        out_x = torch.empty(b, n_kept, d_model, dtype=hidden.dtype, device=dev)
        out_pos = torch.empty(((3,) if planes == 3 else ()) + (b, n_kept), dtype=torch.int64, device=dev)
        out_kept = torch.empty(b, n_kept, dtype=torch.int64, device=dev)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
        keep_alive = (dims, hidden, query, key, mask, pos, cand, out_x, out_pos, out_kept, ws)

        def launch() -> None:
            rc = self.so.fastv_ts_run(0, num, den, -1, scale, 0, dtype_code, dims_p, hidden.data_ptr(),
                                      query.data_ptr(), key.data_ptr(), mask.data_ptr(), pos.data_ptr(),
                                      cand.data_ptr(), out_x.data_ptr(), out_pos.data_ptr(), out_kept.data_ptr(),
                                      ws.data_ptr(), ws_bytes, torch.cuda.current_stream(dev).cuda_stream)
            if rc != 0:
                raise self._error("fastv_ts_run")
        launch.keep_alive = keep_alive          # type: ignore[attr-defined]
        return launch


# ------------------------------------------------------------------------------------------ one prompt
@dataclass
class Row:
    """One configuration of one prompt (times in ms, medians; ratios = FastV / unpruned)."""
    model: str
    prompt: str
    n: int
    image_tokens: int
    config: str
    n_kept: int
    prefill_ms: float
    decode_ms_per_token: float
    peak_gib: float
    prefill_ratio: float = 1.0
    decode_ratio: float = 1.0
    eq5_ratio: float = 1.0
    exact_ratio: float = 1.0
    kv_read_ratio: float = 1.0
    bytes_ratio: float = 1.0
    authors_prefill_ms: float | None = None
    authors_prefill_ratio: float | None = None
    authors_overlap: float | None = None      # share of the authors' top-k image tokens the reference kept


@dataclass
class LayerRow:
    """Layer K-1 alone over the whole prompt (unpruned), ms."""
    model: str
    prompt: str
    n: int
    sdpa_ms: float
    authors_ms: float
    authors_max_abs_diff: float           # |eager layer output - SDPA layer output|, max: both causal, same layer
    reference_ranking_ms: float
    tokenselect_ms: float | None
    tokenselect_note: str
    vision_ms: float | None
    vision_note: str


@dataclass
class Samples:
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    authors: list[float] = field(default_factory=list)
    peak: list[float] = field(default_factory=list)
    kept: int = 0
    overlap: float | None = None


def _generation(model: nn.Module, inputs: dict, config: FastVConfig | None, steps: int,
                clock: Clock) -> tuple[float, float, float, torch.Tensor | None]:
    """(prefill ms, decode ms per token, peak GiB, kept positions [1, n'] or None) of one prefill + ``steps``
    decode steps."""
    clock.reset_peak()
    kept = None
    if config is None:
        pre_ms, state = clock.time(lambda: prefill(model, inputs))
    else:
        with apply_fastv(model, config) as handle:
            pre_ms, state = clock.time(lambda: prefill(model, inputs))
            kept = handle.kept_positions
    dec_ms, _ = clock.time(lambda: greedy_decode(model, state, steps + 1))
    peak = clock.peak_gib()
    del state
    return pre_ms, dec_ms / steps, peak, kept


def _authors_prefill(model: nn.Module, inputs: dict, config: FastVConfig, candidates: torch.Tensor,
                     clock: Clock) -> tuple[float, torch.Tensor]:
    """(ms, the image-token positions [1, keep] the authors' ranking keeps) of a FastV prefill whose layer K-1
    runs as the authors' code runs it."""
    layer = get_adapter(model).layers()[config.k - 1]
    keep = config.keep_count(candidates.shape[1])
    with authors_layer(layer, candidates, keep) as seen, apply_fastv(model, config):
        ms, state = clock.time(lambda: prefill(model, inputs))      # as the reference's prefill is timed
    del state
    return ms, torch.gather(candidates, 1, seen["top"])


def _overlap(top: torch.Tensor, kept: torch.Tensor) -> float:
    """Share of the positions ``top`` [1, keep] that ``kept`` [1, n'] holds (1.0 when keep = 0)."""
    if top.numel() == 0:
        return 1.0
    return float(torch.isin(top, kept).float().mean())


def _capture_layer(model: nn.Module, k: int, inputs: dict) -> dict:
    """Layer K-1's call in an unpruned prefill: its args and kwargs, post-rotary query and key, output hidden."""
    layer = get_adapter(model).layers()[k - 1]
    seen: dict = {}

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, dict(kwargs)

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        seen["out"] = out[0] if isinstance(out, tuple) else out

    def on_capture(query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        seen["query"], seen["key"], seen["scale"] = query, key, scale
    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True),
             layer.register_forward_hook(post, with_kwargs=True)]
    undo = capture_query_key(layer.self_attn, on_capture)
    try:
        with torch.no_grad():
            model(**{**inputs, "use_cache": False})
    finally:
        undo()
        for h in hooks:
            h.remove()
    seen["kwargs"]["past_key_values"] = None
    seen["kwargs"]["use_cache"] = False
    return seen


def _layer_row(model: nn.Module, case: Case, inputs: dict, pixels: dict, candidates: torch.Tensor,
               args: argparse.Namespace, clock: Clock, kernels: TokenSelectKernels | None,
               kernels_note: str) -> LayerRow:
    k = args.k
    layer = get_adapter(model).layers()[k - 1]
    cap = _capture_layer(model, k, inputs)
    n = inputs["input_ids"].shape[1]
    ratio = Fraction(args.ratios[0])
    keep = FastVConfig(k=k, ratio=ratio).keep_count(candidates.shape[1])
    reps = args.layer_repeats
    with torch.no_grad():
        sdpa = clock.median(lambda: layer(*cap["args"], **cap["kwargs"]), reps)
        with authors_layer(layer, candidates, keep):
            authors = clock.median(lambda: layer(*cap["args"], **cap["kwargs"]), reps)
            eager_out = layer(*cap["args"], **cap["kwargs"])
        eager_out = eager_out[0] if isinstance(eager_out, tuple) else eager_out
        diff = float((eager_out.float() - cap["out"].float()).abs().max())
        del eager_out
        valid = torch.ones(1, n, dtype=torch.bool, device=candidates.device)

        def reference_ranking() -> torch.Tensor:
            scores = candidate_scores("last", candidates, query=cap["query"], key=cap["key"], key_valid=valid,
                                      scale=cap["scale"])
            return gather_seq(cap["out"], select_kept(scores, candidates, n, keep))
        ranking = clock.median(reference_ranking, reps)
        ts_ms, ts_note = None, kernels_note
        if kernels is not None:
            try:
                planes = 3 if case.model.startswith("qwen") else 1
                launch = kernels.launcher(cap["out"], cap["query"], cap["key"], candidates, planes, cap["scale"],
                                          ratio)
                ts_ms = clock.median(launch, reps)
                ts_note = f"R={args.ratios[0]}, ranking last"
            except Exception as exc:              # noqa: BLE001 - reported in the table, the benchmark goes on
                ts_note = f"{type(exc).__name__}: {exc}"
                log.warning("TokenSelect kernels: %s", ts_note)
        vision_ms, vision_note = None, "not run (see the notes)"
        if "pixel_values" in pixels:
            vision_ms = clock.median(lambda: model.model.get_image_features(pixel_values=pixels["pixel_values"]),
                                     reps)
            vision_note = f"{pixels['pixel_values'].shape[0]} image(s)"
    del cap
    return LayerRow(case.model, case.label, n, sdpa, authors, diff, ranking, ts_ms, ts_note, vision_ms, vision_note)


def run_case(model: nn.Module, case: Case, args: argparse.Namespace, clock: Clock,
             kernels: TokenSelectKernels | None, kernels_note: str) -> tuple[list[Row], LayerRow]:
    device, dtype = clock.device, next(model.parameters()).dtype
    adapter = get_adapter(model)
    prompt = make_prompt(adapter, args.text_tokens, media=list(case.media), system_tokens=args.system_tokens, seed=0)
    raw = prompt.model_inputs()
    inputs = {k: v.to(device) for k, v in raw.items() if k not in PIXEL_INPUTS}
    inputs["logits_to_keep"] = 1
    pixels = {k: v.to(device, dtype) for k, v in raw.items() if k in ("pixel_values",)}
    candidates = adapter.find_candidates(inputs["input_ids"])
    n, m = inputs["input_ids"].shape[1], candidates.shape[1]
    shape = DecoderShape.from_config(model.config)
    configs: dict[str, FastVConfig | None] = {"unpruned": None}
    configs.update({f"K={args.k} R={r}": FastVConfig(k=args.k, ratio=r) for r in args.ratios})
    samples = {name: Samples() for name in configs}
    steps = args.decode_tokens
    with torch.no_grad():
        for rep in range(args.warmup + args.repeats):
            for name, config in configs.items():          # interleaved: drift hits every configuration alike
                pre_ms, dec_ms, peak, kept = _generation(model, inputs, config, steps, clock)
                s = samples[name]
                s.kept = n if kept is None else int(kept.shape[1])
                if config is not None:
                    authors, top = _authors_prefill(model, inputs, config, candidates, clock)
                    s.overlap = _overlap(top, kept)
                if rep >= args.warmup:
                    s.prefill.append(pre_ms)
                    s.decode.append(dec_ms)
                    s.peak.append(peak)
                    if config is not None:
                        s.authors.append(authors)
        layer_row = _layer_row(model, case, inputs, pixels, candidates, args, clock, kernels, kernels_note)
    base = samples["unpruned"]
    base_pre, base_dec = statistics.median(base.prefill), statistics.median(base.decode)
    rows = []
    for name, config in configs.items():
        s = samples[name]
        pre, dec = statistics.median(s.prefill), statistics.median(s.decode)
        row = Row(case.model, case.label, n, m, name, s.kept, pre, dec, max(s.peak))
        if config is not None:
            rep = estimate(shape, image_tokens=m, text_tokens=n - m, k=config.k, ratio=config.r,
                           dtype=FLOPS_DTYPE[args.dtype])
            kv_base, kv_fast, weights = decode_read_bytes(shape, config.k, n, s.kept, steps, FLOPS_DTYPE[args.dtype])
            authors = statistics.median(s.authors)
            row.prefill_ratio, row.decode_ratio = pre / base_pre, dec / base_dec
            row.eq5_ratio, row.exact_ratio = rep.eq5_ratio, rep.exact_ratio
            row.kv_read_ratio = kv_fast / kv_base
            row.bytes_ratio = (weights + kv_fast) / (weights + kv_base)
            row.authors_prefill_ms, row.authors_prefill_ratio = authors, authors / base_pre
            row.authors_overlap = s.overlap
        rows.append(row)
        log.info("%s %s %s: prefill %.2f ms, decode %.3f ms/token", case.model, case.label, name, pre, dec)
    return rows, layer_row


# ------------------------------------------------------------------------------------------ report
def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None or value != value else format(value, fmt)


def markdown(rows: list[Row], layer_rows: list[LayerRow], header: dict) -> str:
    lines = [f"FastV K={header['k']} in the PyTorch reference on {header['device_name']} ({header['dtype']}, random "
             f"weights, batch 1; torch {header['torch']}, transformers {header['transformers']}); medians of "
             f"{header['repeats']} after {header['warmup']} warm-up, decode over {header['decode_tokens']} tokens; "
             f"ratio = FastV / unpruned (lower is faster). {header['elapsed_s']:.0f} s in all.",
             "",
             "| model | prompt | n | config | n' | prefill ms | prefill ratio | Eq.5 FLOPs ratio | exact FLOPs ratio "
             "| authors' prefill ms (ratio; their top-k kept by the reference) | decode ms/token | decode ratio "
             "| KV-read ratio | bytes-read ratio | peak GiB |",
             "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        authors = "-" if r.authors_prefill_ms is None else \
            f"{r.authors_prefill_ms:.2f} ({r.authors_prefill_ratio:.3f}; same tokens {r.authors_overlap:.0%})"
        lines.append(f"| {r.model} | {r.prompt} | {r.n} | {r.config} | {r.n_kept} | {r.prefill_ms:.2f} "
                     f"| {r.prefill_ratio:.3f} | {r.eq5_ratio:.3f} | {r.exact_ratio:.3f} | {authors} "
                     f"| {r.decode_ms_per_token:.3f} | {r.decode_ratio:.3f} | {r.kv_read_ratio:.3f} "
                     f"| {r.bytes_ratio:.3f} | {_f(r.peak_gib)} |")
    lines += ["",
              f"Layer K-1 (layer {header['k'] - 1}) alone over the whole prompt, ms:",
              "",
              "| model | prompt | n | SDPA (reference) | eager + weights (authors; max abs diff of the outputs) "
              "| reference ranking + gather | TokenSelect kernels | TokenSelect / SDPA layer | vision tower |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in layer_rows:
        ts = "-" if r.tokenselect_ms is None else f"{r.tokenselect_ms:.3f}"
        ts_ratio = "-" if r.tokenselect_ms is None else f"{r.tokenselect_ms / r.sdpa_ms:.3f}"
        vision = "-" if r.vision_ms is None else f"{r.vision_ms:.2f} ({r.vision_note})"
        lines.append(f"| {r.model} | {r.prompt} | {r.n} | {r.sdpa_ms:.3f} "
                     f"| {r.authors_ms:.3f} ({r.authors_max_abs_diff:.2g}) "
                     f"| {r.reference_ranking_ms:.3f} | {ts} | {ts_ratio} | {vision} |")
    notes = sorted({r.tokenselect_note for r in layer_rows if r.tokenselect_ms is None})
    lines += ["", "Notes: prefill = the language model over the prompt (media tokens as ids, the vision tower not "
              "run; last logits only); decode = Hugging Face eager PyTorch, one token per step; authors' prefill = "
              "the FastV prefill with layer K-1 in eager attention returning its weights, ranked from them; "
              "bytes-read ratio = (weights + KV cache) read per decode step; Qwen2.5-VL's vision tower is not run."]
    lines += [f"TokenSelect kernels not timed: {note}" for note in notes]
    lines += [f"skipped: {s}" for s in header.get("skipped", [])]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> bool:
    """Measured vs predicted ratios, one point per FastV row (False when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return False
    fast = [r for r in rows if r.config != "unpruned"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for ax, measured, predicted, title in (
            (axes[0], "prefill_ratio", "eq5_ratio", "prefill: measured vs Eq. 5 FLOPs ratio"),
            (axes[1], "decode_ratio", "bytes_ratio", "decode: measured vs bytes-read ratio")):
        for r in fast:
            ax.scatter(getattr(r, predicted), getattr(r, measured), label=f"{r.model} {r.prompt} {r.config}", s=22,
                       marker="o" if r.model.startswith("llava") else "^")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.05 * max([1.1] + [getattr(r, measured) for r in fast]))
        ax.set_xlabel("predicted ratio (FastV / unpruned)")
        ax.set_ylabel("measured time ratio")
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.025 * ((len(fast) + 2) // 3), 1, 1))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ main
def _sizes(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes of the same model classes (the CPU check)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--images", default="1,4,8", help="LLaVA prompts: images per prompt (default 1,4,8)")
    ap.add_argument("--video-frames", type=int, default=None, help="Qwen2.5-VL video frames (default 24; tiny 8)")
    ap.add_argument("--video-size", type=_sizes, default=None, metavar="HxW",
                    help="video frame size (default 448x448: 12 x 16 x 16 = 3072 tokens; tiny 112x112)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--ratios", default="1/2,3/4,9/10")
    ap.add_argument("--system-tokens", type=int, default=35)
    ap.add_argument("--text-tokens", type=int, default=30, help="instruction tokens after the media")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layer-repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per generation")
    ap.add_argument("--kernels-lib", default=os.environ.get("FASTV_KERNELS_LIB"),
                    help="libfastv_ts_kernels.so (default $FASTV_KERNELS_LIB): the TokenSelect kernels timed")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="stop starting new prompts after this many seconds (default 330)")
    ap.add_argument("--out", default=None, help="folder for bench_gpu.md/json/png (default: print only)")
    ap.add_argument("--no-plot", action="store_true")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    args.images = [int(x) for x in args.images.split(",") if x]
    args.ratios = [r for r in args.ratios.split(",") if r]
    for r in args.ratios:
        try:
            FastVConfig(k=args.k, ratio=r)
        except (FastVError, ValueError, ZeroDivisionError) as exc:
            ap.error(f"--ratios: {r!r}: {exc}")
    if args.decode_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error("--decode-tokens and --repeats must be >= 1, --warmup >= 0")
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    args.video_frames = args.video_frames or (8 if args.tiny else 24)
    args.video_size = args.video_size or ((112, 112) if args.tiny else (448, 448))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    import transformers

    if transformers.__version__ != TRANSFORMERS_PINNED:
        log.warning("transformers %s: the reference hooks are tested with %s (pyproject.toml's pin)",
                    transformers.__version__, TRANSFORMERS_PINNED)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: torch sees no CUDA GPU: run on a GPU machine, or --device cpu --tiny")
    clock = Clock(device)
    kernels, kernels_note = None, "no kernels library (--kernels-lib / $FASTV_KERNELS_LIB)"
    if device.type != "cuda":
        kernels_note = "CUDA kernels need a GPU"
    elif args.kernels_lib:
        try:
            kernels = TokenSelectKernels(args.kernels_lib)
        except OSError as exc:
            kernels_note = f"cannot load {args.kernels_lib}: {exc}"
    start = time.perf_counter()
    rows: list[Row] = []
    layer_rows: list[LayerRow] = []
    skipped: list[str] = []
    model, model_name = None, None
    for case in cases(args):
        if time.perf_counter() - start > args.budget_s:
            skipped.append(f"{case.model} {case.label} (time budget of {args.budget_s:.0f} s spent)")
            log.warning("skipped %s %s: time budget spent", case.model, case.label)
            continue
        if case.model != model_name:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t = time.perf_counter()
            model, model_name = build_model(case.model, args.tiny, device, DTYPES[args.dtype]), case.model
            log.info("%s: built on %s in %.1f s", case.model, device, time.perf_counter() - t)
        case_rows, layer_row = run_case(model, case, args, clock, kernels, kernels_note)
        rows += case_rows
        layer_rows.append(layer_row)
    header = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or "CPU", "dtype": args.dtype, "k": args.k, "torch": torch.__version__,
              "transformers": transformers.__version__, "repeats": args.repeats, "warmup": args.warmup,
              "decode_tokens": args.decode_tokens, "tiny": args.tiny, "elapsed_s": time.perf_counter() - start,
              "skipped": skipped}
    result = {"header": header, "rows": [asdict(r) for r in rows], "layer_k_minus_1": [asdict(r) for r in layer_rows]}
    text = markdown(rows, layer_rows, header)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "bench_gpu.md", text)
        atomic_write_json(out / "bench_gpu.json", result)
        if not args.no_plot and rows:
            plot(rows, out / "bench_gpu.png")
    return result


if __name__ == "__main__":
    try:
        main()
    except FastVError as exc:
        print(f"bench_gpu.py: {exc}", file=sys.stderr)
        sys.exit(1)
