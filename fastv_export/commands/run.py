"""`fastv-export run`: generate with a bundle's graphs in ONNX Runtime from an image and a prompt."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..bundle import load_bundle
from ..errors import FastVError
from ..runtime_ort import OrtRuntime

HELP = "generate from PNG image(s) and a text prompt with a bundle's graphs (ONNX Runtime)"
DESCRIPTION = """\
Drive the bundle exactly as a deployment runtime would: vision -> embed -> pre-K (TokenSelect)
-> post-K, then decode steps over the two KV caches. CPU provider by default, CUDA when
onnxruntime-gpu is installed. The built-in presets have no tokenizer: their prompt text is
encoded byte by byte (id = 10 + byte mod 390) and decoded back the same way; a bundle exported
from a checkpoint directory uses that checkpoint's tokenizer.

examples:
  fastv-export run bundle --image cat.png --prompt "What is in the image?" --max-new-tokens 16
  fastv-export -v run bundle --image a.png --image b.png --prompt "Compare them."
"""
BYTE_OFFSET, BYTE_RANGE = 10, 390


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `fastv-export export`")
    parser.add_argument("--image", action="append", default=[], metavar="PNG", help="an image (repeatable)")
    parser.add_argument("--prompt", required=True, help="the instruction text")
    parser.add_argument("--max-new-tokens", type=int, default=32)


def _load_images(paths: list[str], adapter) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FastVError(f"image {p} does not exist")
        try:
            with Image.open(p) as im:
                out.append(adapter.preprocess_image(im))
        except (UnidentifiedImageError, OSError) as exc:
            raise FastVError(f"image {p} cannot be read as an image ({exc})") from None
    return out


def run(args: argparse.Namespace) -> int:
    from ..adapters import adapter_class_for
    from ..models import PRESETS, build_preset_config

    if not args.prompt.strip():
        raise FastVError("--prompt is empty; give the instruction text")
    if args.max_new_tokens < 1:
        raise FastVError("--max-new-tokens must be >= 1")
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    source = m["source_model"]["name"]
    if source not in PRESETS:
        raise FastVError(f"`run` encodes text for the built-in presets only; {source} needs its own tokenizer "
                         "(use the Python API OrtRuntime.generate with token ids)")
    config = build_preset_config(source)

    # the adapter needs only the config here (image tokens, preprocessing), not the weights
    adapter = adapter_class_for(m["source_model"]["architecture"])(SimpleNamespace(config=config))
    images = _load_images(args.image, adapter)
    text = [BYTE_OFFSET + b % BYTE_RANGE for b in args.prompt.encode()]
    ids = [config.text_config.bos_token_id] + [t for _ in images for t in m["image_tokens"]["prompt_tokens_per_image"]]
    ids = np.array([ids + text], dtype=np.int64)
    runtime = OrtRuntime(bundle)
    gen = runtime.generate(ids, np.ones_like(ids), images, args.max_new_tokens,
                           eos_token_id=m["source_model"].get("eos_token_id"))
    tokens = gen.tokens[0].tolist()
    decoded = bytes((t - BYTE_OFFSET) % 256 for t in tokens if BYTE_OFFSET <= t < BYTE_OFFSET + BYTE_RANGE)
    print(f"prompt: {ids.shape[1]} tokens ({len(images)} image(s)); kept {gen.kept_indices.shape[1]} after "
          f"TokenSelect (K={m['fastv']['k']}, R={m['fastv']['ratio']}, {m['fastv']['ranking']})")
    print(f"tokens: {tokens}")
    print(f"text  : {decoded.decode('utf-8', errors='replace')!r}")
    if logging.getLogger().isEnabledFor(logging.INFO):
        for stage, sec in gen.timings.items():
            print(f"  {stage:>16}: {sec * 1e3:8.2f} ms")
    return 0
