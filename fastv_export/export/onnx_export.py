"""Export a HF VLM with FastV into a bundle: vision / embed / pre-K (+TokenSelect) / post-K ONNX
graphs and manifest.json, written atomically (temporary directory, then rename)."""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from fastv_export.adapters import ModelAdapter, get_adapter
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.export.modules import Embed, PostK, PreK, Vision
from fastv_export.presets import load_model

log = logging.getLogger(__name__)

OPSET = 18
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
GRAPH_FILES = ("vision.onnx", "embed.onnx", "pre_k.onnx", "post_k.onnx")


@dataclass(frozen=True)
class ExportOptions:
    model: str = "tiny-llava"
    dtype: str = "fp32"
    opset: int = OPSET
    force: bool = False


def kv_names(prefix: str, layers: range) -> list[str]:
    return [f"{prefix}.{i}.{t}" for i in layers for t in ("key", "value")]


def _position_dims(adapter: ModelAdapter, batch, seq) -> dict:
    return {0: batch, 1: seq} if adapter.position_rank == 2 else {1: batch, 2: seq}


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes, opset: int, tracer: str = "dynamo") -> None:
    """torch.onnx export; ``tracer="jit"`` (TorchScript tracing, static shapes) serves vision towers whose
    Python control flow on a fixed image grid torch.export cannot trace."""
    if tracer == "jit":
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamo=False, opset_version=opset)
        return
    from fastv_export.graphs.surgery import name_ir_dims

    with torch.no_grad():
        program = torch.onnx.export(module, args, None, input_names=input_names, output_names=output_names,
                                    dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
                                    verbose=False)
    name_ir_dims(program.model)   # readable dims (batch, seq, ...) for the manifest
    program.save(str(path))


def _example_decoder_inputs(adapter: ModelAdapter, dtype: torch.dtype, layers: int, n: int = 5, past: int = 3,
                            batch: int = 2):
    info = adapter.decoder_shape()
    hidden = torch.randn(batch, n, info.hidden_size, dtype=dtype)
    mask = torch.ones(batch, past + n, dtype=torch.int64)
    pos = torch.arange(past, past + n).expand(batch, n)
    if adapter.position_rank == 3:
        pos = pos.expand(3, batch, n)
    kv = [torch.randn(batch, info.num_kv_heads, past, info.head_dim, dtype=dtype) for _ in range(2 * layers)]
    return hidden, mask, pos.contiguous(), kv


def export_graphs(adapter: ModelAdapter, cfg: FastVConfig, dtype: torch.dtype, out: Path, opset: int) -> dict:
    """Write the four graphs into ``out``; returns their I/O description for the manifest."""
    from torch.export import Dim

    from fastv_export.graphs.surgery import insert_token_select

    info = adapter.decoder_shape()
    k, num_layers = cfg.k, info.num_layers
    dyn = Dim.DYNAMIC
    steps = tqdm(total=4, desc="export", unit="graph", leave=False)

    # vision: one default-sized image -> [M, D]
    from fastv_export.prompts import make_prompt
    pixel = {k_: v for k_, v in make_prompt(adapter, 1, num_images=1).vision.items() if k_ == "pixel_values"}
    vision = Vision(adapter).eval()
    _export(vision, (pixel["pixel_values"].to(dtype),), out / "vision.onnx", ["pixel_values"], ["image_features"],
            None, opset, tracer="jit" if adapter.position_rank == 3 else "dynamo")
    steps.update()

    # embed: token embedding + image features at the image-token positions
    ids = torch.randint(10, 400, (2, 6))
    ids[0, 2], ids[1, 3] = adapter.image_token_ids()[0], adapter.image_token_ids()[0]
    feats = torch.randn(2, info.hidden_size, dtype=dtype)
    _export(Embed(adapter).eval(), (ids, feats), out / "embed.onnx", ["input_ids", "image_features"],
            ["inputs_embeds"], {"input_ids": {0: dyn, 1: dyn}, "image_features": {0: dyn}}, opset)
    steps.update()

    # pre-K: layers < K, then TokenSelect (graph surgery)
    query_rows = "all" if cfg.ranking == "mean" else "last"
    pre = PreK(adapter, k, query_rows).eval()
    hidden, mask, pos, kv = _example_decoder_inputs(adapter, dtype, k)
    pre_in = ["inputs_embeds", "attention_mask", "position_ids"] + kv_names("past_key_values", range(k))
    pre_out = ["layer_hidden", "layer_query", "layer_key"] + kv_names("present", range(k))
    shapes = {"inputs_embeds": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn},
              "position_ids": _position_dims(adapter, dyn, dyn), "past": tuple({0: dyn, 2: dyn} for _ in kv)}
    raw = out / "pre_k.raw.onnx"
    _export(pre, (hidden, mask, pos, *kv), raw, pre_in, pre_out, shapes, opset)
    scale = float(adapter.layers()[k - 1].self_attn.scaling)
    model = insert_token_select(onnx.load(str(raw)), cfg, scale=scale, position_rank=adapter.position_rank)
    onnx.save(model, str(out / "pre_k.onnx"))
    raw.unlink()
    steps.update()

    # post-K: layers >= K, norm, lm_head
    post = PostK(adapter, k).eval()
    hidden, mask, pos, kv = _example_decoder_inputs(adapter, dtype, num_layers - k)
    post_in = ["hidden_states", "attention_mask", "position_ids"] + kv_names("past_key_values", range(k, num_layers))
    post_out = ["logits"] + kv_names("present", range(k, num_layers))
    shapes = {"hidden_states": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn},
              "position_ids": _position_dims(adapter, dyn, dyn), "past": tuple({0: dyn, 2: dyn} for _ in kv)}
    _export(post, (hidden, mask, pos, *kv), out / "post_k.onnx", post_in, post_out, shapes, opset)
    steps.update()
    steps.close()
    for name in GRAPH_FILES:
        onnx.checker.check_model(str(out / name), full_check=True)
    return {}


def export_bundle(out_dir: str | Path, cfg: FastVConfig, options: ExportOptions = ExportOptions()) -> Path:
    """Export ``options.model`` with FastV ``cfg`` into the bundle directory ``out_dir`` (atomic)."""
    from fastv_export.bundle import write_manifest

    out = Path(out_dir)
    if options.dtype not in DTYPES:
        raise FastVError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if out.exists() and not options.force:
        raise FastVError(f"{out} already exists; pass --force to overwrite it")
    if cfg.k == 0:
        raise FastVError("export needs K >= 1 (K = 0 prunes before any decoder layer; use the PyTorch "
                         "reference for that ablation)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise FastVError(f"the parent directory of {out} does not exist; create it first")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise FastVError(f"cannot write into {parent} ({exc.strerror}); choose a writable --out") from None
    try:
        dtype = DTYPES[options.dtype]
        model = load_model(options.model, attn_implementation="eager", dtype=dtype)
        adapter = get_adapter(model)
        cfg.check_layers(adapter.decoder_shape().num_layers)
        export_graphs(adapter, cfg, dtype, tmp, options.opset)
        write_manifest(tmp, adapter, cfg, options)
        if out.exists():
            old = parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundle written to %s", out)
    return out
