"""Real sizes on this machine: write a random-weight checkpoint of a real model's shape, then run the CLI's stages
on it (export, validate, the ahead-of-time TensorRT-RTX build), each as its own process, and report per stage the
wall time, the peak resident memory (RSS), the bytes of the weights the stage holds and peak / weights.

Checkpoints are written without materialising the model: it is built on the meta device (names and shapes only),
then each tensor is created alone with a seeded generator at the checkpoint's dtype (normal, std 0.02; norm
weights 1 + that noise, so activations stay finite) and streamed into its shard (safetensors, ``--shard-size``,
``model.safetensors.index.json``): the writer's peak is about one tensor. config.json, generation_config.json, a
byte-level tokenizer with the family's special tokens at the real checkpoint's ids, the chat template and the
image processor's config are written beside them (no download).

Shapes (``--shape``): ``llava-1.5-7b``, ``qwen2.5-vl-3b``, ``qwen2.5-vl-7b`` (the published config.json values), and
``small-llava`` / ``small-qwen2.5-vl`` (same families, real vocabularies, narrow and shallow: a few hundred MB;
used by tests/test_bench_scale.py).

Peak RSS: the stage's own record in BUNDLE/logs/stages.json (fastv_export/memory.py: the high-water mark reset at
the stage's start), else the child process's ru_maxrss. Weights: the record's ``weight_bytes`` (export: the
parameters at the export dtype; validate: the fp32 reference; build: the largest graph's files), else computed here.

usage:
  python scripts/bench_scale.py --shape llava-1.5-7b --workdir /data/bench          # export (fp16) + build
  python scripts/bench_scale.py --shape qwen2.5-vl-3b --stages export,validate      # fp32 export + validate
  python scripts/bench_scale.py --shape small-llava --stages export,validate,build --keep
  python scripts/bench_scale.py --shape qwen2.5-vl-3b --stages none --keep         # only write the checkpoint
Writes WORKDIR/bench_scale.json and WORKDIR/bench_scale.md (Markdown table rows with the machine) and prints them.
The checkpoint (LLaVA-1.5-7B: 14.1 GB) and the bundle are deleted after each shape unless --keep.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

GB = 10 ** 9
GiB = 1 << 30
STAGES = ("export", "validate", "build")
DEFAULT_SHARD_BYTES = 2 * GB
INIT_STD = 0.02
SEED = 23

# OpenAI CLIP's normalisation, as llava-hf/llava-1.5-7b-hf and Qwen/Qwen2.5-VL-*'s preprocessor_config.json give it
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    """A checkpoint shape: ``family`` "llava" or "qwen2_5_vl", the text and vision config values, the checkpoint's
    dtype and the export dtype of the acceptance run."""
    name: str
    family: str
    text: dict
    vision: dict
    dtype: str                   # checkpoint: "float16" / "bfloat16"
    export_dtype: str            # fastv-export export --dtype
    tie_word_embeddings: bool = False
    image_size: int = 336        # LLaVA: the CLIP tower's input size (processor crop)


# LLaVA-1.5-7B: llava-hf/llava-1.5-7b-hf config.json (text: Llama-2-7B; vision: openai/clip-vit-large-patch14-336;
# image token 32000, pad 32001, vocab 32064, vision_feature_layer -2, "default" feature selection, fp16)
_LLAVA_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)
# Qwen2.5-VL: Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct config.json (bf16; rope_theta 1e6,
# mrope_section [16, 24, 24]; the vision tower: depth 32, width 1280, MLP 3420, 16 heads, window 112, full attention
# in blocks 7, 15, 23, 31; its out_hidden_size is the decoder width)
_QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
_QWEN_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6)
_QWEN_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6)

SHAPES: dict[str, Shape] = {
    "llava-1.5-7b": Shape("llava-1.5-7b", "llava", _LLAVA_7B_TEXT, _CLIP_L_336, "float16", "fp16"),
    "qwen2.5-vl-3b": Shape("qwen2.5-vl-3b", "qwen2_5_vl", _QWEN_3B_TEXT, dict(_QWEN_VISION, out_hidden_size=2048),
                           "bfloat16", "fp32", tie_word_embeddings=True),
    "qwen2.5-vl-7b": Shape("qwen2.5-vl-7b", "qwen2_5_vl", _QWEN_7B_TEXT, dict(_QWEN_VISION, out_hidden_size=3584),
                           "bfloat16", "fp16"),
    # small shapes: the real vocabularies and towers' layouts, narrow and shallow (tests, quick checks); the decoder's
    # head width stays 128 (Qwen's mrope_section [16, 24, 24] covers half a head)
    "small-llava": Shape("small-llava", "llava",
                         dict(_LLAVA_7B_TEXT, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=4),
                         dict(_CLIP_L_336, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                              num_attention_heads=4, image_size=112, projection_dim=128),
                         "float16", "fp16", image_size=112),
    "small-qwen2.5-vl": Shape("small-qwen2.5-vl", "qwen2_5_vl",
                              dict(_QWEN_3B_TEXT, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096),
                              dict(_QWEN_VISION, depth=2, hidden_size=64, intermediate_size=172, num_heads=2,
                                   window_size=56, fullatt_block_indexes=[1], out_hidden_size=256),
                              "bfloat16", "fp32", tie_word_embeddings=True),
}

# special tokens at the real checkpoints' ids (llava-hf's added tokens; Qwen2's tokenizer.json added tokens)
LLAVA_SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}
QWEN_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
                "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
BYTE_OFFSET = 3              # byte b -> id 3 + b (as Llama's <0x00>.. tokens); Qwen's bytes sit at 0.. instead


def build_config(shape: Shape):
    """The transformers config of ``shape`` (its model class is ``config.architectures[0]``)."""
    import transformers

    if shape.family == "llava":
        s = LLAVA_SPECIAL
        text = transformers.LlamaConfig(**shape.text, bos_token_id=s["<s>"], eos_token_id=s["</s>"],
                                        pad_token_id=s["<pad>"], tie_word_embeddings=False)
        vision = transformers.CLIPVisionConfig(**shape.vision)
        config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=s["<image>"],
                                          image_seq_length=(shape.vision["image_size"] // 14) ** 2,
                                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                                          projector_hidden_act="gelu", pad_token_id=s["<pad>"],
                                          tie_word_embeddings=False)
        config.architectures = ["LlavaForConditionalGeneration"]
    elif shape.family == "qwen2_5_vl":
        s = QWEN_SPECIAL
        text = dict(shape.text, rope_parameters=dict(_QWEN_ROPE), use_sliding_window=False, sliding_window=32768,
                    bos_token_id=s["<|endoftext|>"], eos_token_id=s["<|im_end|>"], pad_token_id=s["<|endoftext|>"],
                    tie_word_embeddings=shape.tie_word_embeddings, hidden_act="silu")
        config = transformers.Qwen2_5_VLConfig(
            vision_config=dict(shape.vision), text_config=text, image_token_id=s["<|image_pad|>"],
            video_token_id=s["<|video_pad|>"], vision_start_token_id=s["<|vision_start|>"],
            vision_end_token_id=s["<|vision_end|>"], tie_word_embeddings=shape.tie_word_embeddings)
        config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    else:
        raise ValueError(f"unknown family {shape.family!r}")
    config.dtype = shape.dtype
    return config


def meta_model(config):
    """The model of ``config`` on the meta device: names and shapes, no storage."""
    import torch
    import transformers

    with torch.device("meta"):
        return getattr(transformers, config.architectures[0])(config)


def checkpoint_tensors(config) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, torch dtype name) of every tensor the checkpoint stores, in state_dict order; a tied tensor
    (the same parameter under two names, e.g. lm_head / embed_tokens) once, under its first name."""
    model = meta_model(config)
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = (tuple(t.shape), config.dtype)
    return out


# ------------------------------------------------------------------------------------------------ writing
_DTYPES = {"float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4)}


def _is_norm_weight(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and "norm" in parts[-2]


def make_tensor(name: str, shape: tuple[int, ...], dtype: str, index: int, std: float = INIT_STD):
    """Tensor ``index`` of the checkpoint: normal(0, std) (norm weights 1 + that), seeded by its index alone (a
    shard's content does not depend on the shard size)."""
    import torch

    g = torch.Generator().manual_seed(SEED * 1_000_003 + index)
    t = torch.empty(shape, dtype=getattr(torch, dtype))
    t.normal_(0.0, std, generator=g)
    if _is_norm_weight(name):
        t.add_(1.0)
    return t


def plan_shards(tensors: dict[str, tuple[tuple[int, ...], str]], shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most ``shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in tensors.items():
        n = math.prod(shape) * _DTYPES[dtype][1]
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_shard(path: Path, names: list[str], tensors: dict, index_of: dict[str, int]) -> int:
    """One safetensors file: the header (offsets known from the shapes), then each tensor created and written in
    turn, so only one tensor is held. Returns the data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape, dtype = tensors[name]
        n = math.prod(shape) * _DTYPES[dtype][1]
        header[name] = {"dtype": _DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    import torch

    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                          # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in names:
            shape, dtype = tensors[name]
            t = make_tensor(name, shape, dtype, index_of[name])
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
    return offset


def write_weights(config, out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write the checkpoint's weights into ``out`` as sharded safetensors with model.safetensors.index.json;
    returns the index."""
    tensors = checkpoint_tensors(config)
    index_of = {name: i for i, name in enumerate(tensors)}
    shards = plan_shards(tensors, shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(out / file, names, tensors, index_of)
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def _tokenizer(special: dict[str, int], bytes_at: int, bos: str | None):
    """A byte-level BPE (no merges: every text byte is a token) with ``special`` at their ids; ``bos`` (if any)
    added before every text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = {chars[b]: bytes_at + b for b in range(256)}
    vocab.update(special)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, special[bos])])
    return tok


def write_serving_files(shape: Shape, config, out: Path) -> None:
    """Tokenizer, chat template, image processor, processor and generation configs, as the family's checkpoints
    have them."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from fastv_export.presets.serving import FAMILIES

    text = config.text_config
    if shape.family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        backend = _tokenizer(LLAVA_SPECIAL, BYTE_OFFSET, "<s>")
        tokens = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        s = shape.image_size
        processor = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                          image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
        extra_files = {"processor_config.json": {"processor_class": "LlavaProcessor", "image_token": "<image>",
                                                 "num_additional_image_tokens": 1, "patch_size": 14,
                                                 "vision_feature_select_strategy": "default"}}
        generation = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                      pad_token_id=text.pad_token_id)
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        backend = _tokenizer(QWEN_SPECIAL, 0, None)
        tokens = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        v = shape.vision
        # Qwen2.5-VL's preprocessor_config.json: 4..16384 merged tokens an image
        processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=v["patch_size"],
                                             merge_size=v["spatial_merge_size"],
                                             temporal_patch_size=v["temporal_patch_size"],
                                             image_mean=CLIP_MEAN, image_std=CLIP_STD)
        extra_files = {"video_preprocessor_config.json": {
            "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "do_sample_frames": True, "fps": 2.0, "num_frames": None, "min_frames": 4, "max_frames": 768,
            "size": {"shortest_edge": 3136, "longest_edge": 12845056}, "resample": 3, "rescale_factor": 1 / 255,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "patch_size": v["patch_size"],
            "temporal_patch_size": v["temporal_patch_size"], "merge_size": v["spatial_merge_size"],
            "return_metadata": False, "default_to_square": True}}
        generation = GenerationConfig(bos_token_id=text.bos_token_id,
                                      eos_token_id=[QWEN_SPECIAL["<|im_end|>"], QWEN_SPECIAL["<|endoftext|>"]],
                                      pad_token_id=text.pad_token_id)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                        chat_template=FAMILIES[shape.family].template,
                                        model_max_length=int(text.max_position_embeddings), **tokens)
    tokenizer.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "LlamaTokenizer" if shape.family == "llava" else "Qwen2Tokenizer"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    processor.save_pretrained(out)
    generation.save_pretrained(out)
    for name, data in extra_files.items():
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_checkpoint(shape: Shape, out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """The whole checkpoint directory ``out`` (written into ``out.partial`` and renamed when complete); returns
    {"bytes": weight bytes, "shards": count, "seconds": time}."""
    start = time.perf_counter()
    out = Path(out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; remove it or choose another --workdir")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = build_config(shape)
    config.save_pretrained(tmp)
    index = write_weights(config, tmp, shard_bytes)
    write_serving_files(shape, config, tmp)
    tmp.rename(out)
    return {"bytes": index["metadata"]["total_size"], "shards": len(set(index["weight_map"].values())),
            "seconds": round(time.perf_counter() - start, 3)}


# ------------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    """Cores, CPU model and memory of this machine (/proc)."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            info["cpu"] = m.group(1).strip()
    except OSError:
        pass
    try:
        m = re.search(r"^MemTotal:\s+(\d+)\s*kB", Path("/proc/meminfo").read_text(), re.M)
        if m:
            info["memory_bytes"] = int(m.group(1)) * 1024
    except OSError:
        pass
    return info


def describe_machine(m: dict) -> str:
    mem = f", {m['memory_bytes'] / GiB:.1f} GiB" if "memory_bytes" in m else ""
    return f"{m['cores']} cores ({m['cpu']}){mem}"


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class StageResult:
    shape: str
    stage: str
    ok: bool
    seconds: float
    peak_rss_bytes: int | None = None
    peak_source: str = ""             # "stages.json" or "ru_maxrss"
    weight_bytes: int | None = None
    ratio: float | None = None        # peak / weights
    start_rss_bytes: int | None = None     # the stage's RSS when it started (the interpreter and imports)
    estimate_bytes: int | None = None      # what the stage's memory check estimated (fastv_export/memory.py)
    error: str = ""
    command: list[str] = field(default_factory=list)


def stage_command(stage: str, checkpoint: Path, bundle: Path, args: argparse.Namespace, dtype: str) -> list[str]:
    script = Path(sys.executable).with_name("fastv-export")        # the console script of this environment
    cli = ([str(script)] if script.exists() else [sys.executable, "-m", "fastv_export.cli"]) + ["-v"]
    if stage == "export":
        return cli + ["export", "--model", str(checkpoint), "--dtype", dtype, "--out", str(bundle), "--force",
                      *args.export_args]
    if stage == "validate":
        return cli + ["validate", str(bundle), "--max-new-tokens", str(args.max_new_tokens), "--batch-sizes", "1",
                      *args.validate_args]
    plugin = ["--plugin-lib", str(args.plugin_lib)] if args.plugin_lib else []
    return cli + ["build", str(bundle), "--backend", "tensorrt-rtx", "--compute-capability",
                  args.compute_capability, *plugin, *args.build_args]


def run_child(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run ``cmd`` with stdout and stderr into ``log``; (exit status, seconds, the child's ru_maxrss in bytes)."""
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024


def one_line_error(log: Path) -> str:
    """The stage's one-line error (``error: ...``), else the last line it wrote."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error:" in ln or ln.startswith("FAIL")]
    return (errors or lines or ["(no output)"])[-1][:400]


def stage_record(bundle: Path, stage: str) -> dict:
    try:
        data = json.loads((bundle / "logs" / "stages.json").read_text())
    except (OSError, ValueError):
        return {}
    rec = (data.get("stages") or {}).get(stage)
    return rec if isinstance(rec, dict) else {}


def fallback_weight_bytes(stage: str, checkpoint_params: int, export_dtype: str, bundle: Path) -> int | None:
    """The weights a stage holds when its record has none: export: the parameters at the export dtype; validate:
    the fp32 reference; build: the largest graph's files."""
    if stage == "export":
        return checkpoint_params * (2 if export_dtype == "fp16" else 4)
    if stage == "validate":
        return checkpoint_params * 4
    sizes = {}
    for onnx_file in bundle.glob("*.onnx"):
        data = onnx_file.with_name(onnx_file.name + ".data")
        sizes[onnx_file] = onnx_file.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return max(sizes.values()) if sizes else None


def run_stage(stage: str, shape: Shape, checkpoint: Path, bundle: Path, args: argparse.Namespace,
              params: int, dtype: str, logs: Path) -> StageResult:
    cmd = stage_command(stage, checkpoint, bundle, args, dtype)
    log = logs / f"{shape.name}-{stage}.log"
    print(f"[{shape.name}] {stage}: fastv-export {' '.join(cmd[cmd.index('-v'):])}", flush=True)
    rc, seconds, maxrss = run_child(cmd, log)
    result = StageResult(shape.name, stage, rc == 0, round(seconds, 1), command=cmd)
    if rc != 0:
        result.error = one_line_error(log)
        result.peak_rss_bytes, result.peak_source = maxrss, "ru_maxrss"
        return result
    rec = stage_record(bundle, stage)
    if rec.get("peak_rss_bytes"):
        result.peak_rss_bytes, result.peak_source = int(rec["peak_rss_bytes"]), "stages.json"
    else:
        result.peak_rss_bytes, result.peak_source = maxrss, "ru_maxrss"
    result.weight_bytes = rec.get("weight_bytes") or fallback_weight_bytes(stage, params, dtype, bundle)
    result.start_rss_bytes, result.estimate_bytes = rec.get("start_rss_bytes"), rec.get("estimate_bytes")
    if result.weight_bytes:
        result.ratio = round(result.peak_rss_bytes / result.weight_bytes, 3)
    return result


# ------------------------------------------------------------------------------------------------ report
def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.0f} MiB"


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60)} s"


MD_HEADER = ("| shape | stage | dtype | wall time | peak RSS | weights held | peak / weights | machine |\n"
             "|---|---|---|---|---|---|---|---|")


def markdown_row(r: StageResult, dtype: str, mach: str) -> str:
    ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
    status = "" if r.ok else f" FAILED: {r.error}"
    return (f"| {r.shape} | {r.stage}{status} | {dtype} | {fmt_seconds(r.seconds)} | {fmt_bytes(r.peak_rss_bytes)} | "
            f"{fmt_bytes(r.weight_bytes)} | {ratio} | {mach} |")


def iter_shapes(text: str) -> Iterator[Shape]:
    for name in text.split(","):
        name = name.strip()
        if name not in SHAPES:
            raise SystemExit(f"error: unknown --shape {name!r}; choose from {', '.join(SHAPES)}")
        yield SHAPES[name]


def parse_stages(text: str) -> list[str]:
    if text.strip() in ("", "none"):
        return []
    stages = [s.strip() for s in text.split(",")]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"error: unknown --stages {bad}; choose from {', '.join(STAGES)} (or none)")
    return [s for s in STAGES if s in stages]          # always in pipeline order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shape", default="small-llava", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--stages", default="export,validate,build",
                    help="comma-separated subset of export,validate,build, or none (write the checkpoint only)")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                    help="export precision (default: the shape's: fp16 for LLaVA-7B and Qwen2.5-VL-7B, fp32 for "
                         "Qwen2.5-VL-3B)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-scale"),
                    help="where checkpoints, bundles, logs and the reports go (default ./bench-scale)")
    ap.add_argument("--keep", action="store_true", help="keep each shape's checkpoint and bundle")
    ap.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_BYTES / GB, help="GB per shard (default 2)")
    ap.add_argument("--compute-capability", default="8.9", help="build: TensorRT-RTX target(s) (default 8.9)")
    ap.add_argument("--plugin-lib", type=Path, default=None, help="build: libfastv_plugins.so (default: the CLI's)")
    ap.add_argument("--max-new-tokens", type=int, default=4, help="validate: generated tokens (default 4)")
    ap.add_argument("--export-args", default="", help="more `fastv-export export` arguments, one string")
    ap.add_argument("--validate-args", default="", help="more `fastv-export validate` arguments, one string")
    ap.add_argument("--build-args", default="", help="more `fastv-export build` arguments, one string")
    ap.add_argument("--max-ratio", type=float, default=1.3, help="the acceptance bound printed beside each ratio")
    args = ap.parse_args(argv)
    args.export_args, args.validate_args, args.build_args = (
        args.export_args.split(), args.validate_args.split(), args.build_args.split())
    stages = parse_stages(args.stages)
    shapes = list(iter_shapes(args.shape))
    work = args.workdir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mach = machine()
    mach_text = describe_machine(mach)
    print(f"machine: {mach_text}")
    report: dict[str, Any] = {"machine": mach, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "shapes": []}
    rows = [MD_HEADER]
    failed = False
    for shape in shapes:
        dtype = args.dtype or shape.export_dtype
        checkpoint, bundle = work / f"{shape.name}-checkpoint", work / f"{shape.name}-{dtype}-bundle"
        entry: dict[str, Any] = {"shape": shape.name, "checkpoint_dtype": shape.dtype, "export_dtype": dtype,
                                 "stages": []}
        report["shapes"].append(entry)
        try:
            if checkpoint.exists() and (checkpoint / "model.safetensors.index.json").exists():
                print(f"[{shape.name}] reusing {checkpoint}")
                index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
                written = {"bytes": index["metadata"]["total_size"], "reused": True}
            else:
                print(f"[{shape.name}] writing {checkpoint}", flush=True)
                written = write_checkpoint(shape, checkpoint, int(args.shard_size * GB))
            params = written["bytes"] // _DTYPES[shape.dtype][1]
            entry["checkpoint"] = dict(written, parameters=params, path=str(checkpoint))
            print(f"[{shape.name}] checkpoint: {params / 1e9:.3f} B parameters, {fmt_bytes(written['bytes'])}"
                  + (f", {written['shards']} shards in {fmt_seconds(written['seconds'])}" if "shards" in written
                     else ""), flush=True)
            for stage in stages:
                r = run_stage(stage, shape, checkpoint, bundle, args, params, dtype, logs)
                entry["stages"].append(asdict(r))
                rows.append(markdown_row(r, dtype, mach_text))
                if not r.ok:
                    print(f"[{shape.name}] {stage} FAILED after {fmt_seconds(r.seconds)}: {r.error}", flush=True)
                    failed = True
                    break
                bound = "" if r.ratio is None else (f" (<= {args.max_ratio:.2f}x)" if r.ratio <= args.max_ratio
                                                    else f" (OVER {args.max_ratio:.2f}x)")
                ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
                print(f"[{shape.name}] {stage}: {fmt_seconds(r.seconds)}, peak RSS {fmt_bytes(r.peak_rss_bytes)} "
                      f"({r.peak_source}), weights {fmt_bytes(r.weight_bytes)}, peak/weights {ratio}{bound}",
                      flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(checkpoint, ignore_errors=True)
                shutil.rmtree(bundle, ignore_errors=True)
        if failed:
            break
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (work / "bench_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "bench_scale.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(f"wrote {work / 'bench_scale.json'} and {work / 'bench_scale.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
