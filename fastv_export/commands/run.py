"""`fastv-export run`: generate with a bundle's graphs in ONNX Runtime from an image and a prompt."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

from fastv_export.commands.common import add_runner_argument
from fastv_export.errors import FastVError

if TYPE_CHECKING:
    import numpy as np

HELP = "generate from PNG image(s) and a text prompt with a bundle's graphs (ONNX Runtime)"
DESCRIPTION = """\
Drive the bundle exactly as a deployment runtime would: vision -> embed -> pre-K (TokenSelect)
-> post-K, then decode steps over the two KV caches. CPU provider by default, CUDA when
onnxruntime-gpu is installed.

Each `<image>` in the prompt becomes one image's tokens, in the order of --image; a prompt without
`<image>` gets the images first. No chat template is applied: write the model's own format (e.g.
LLaVA-1.5: "USER: <image>\nWhat is in the image? ASSISTANT:"). A bundle exported from a checkpoint
directory uses that directory's tokenizer (it must still be there); the built-in presets have none,
so their text is encoded byte by byte (id = 10 + byte mod 390) and decoded back the same way,
except the trained demo tiny-llava-shapes, whose words are its own vocabulary (e.g. "what colour
at row 1 col 2 ?", "how many red ?", "where is blue ?").

examples:
  fastv-export run bundle --image cat.png --prompt "What is in the image?" --max-new-tokens 16
  fastv-export -v run bundle --image a.png --image b.png --prompt "<image> and <image>: compare them."
  fastv-export run bundle --image cat.png --prompt "Describe it." --dump-inputs in/   # + fastv-run --inputs in/
"""
IMAGE_MARK = "<image>"
BYTE_OFFSET, BYTE_RANGE = 10, 390


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `fastv-export export`")
    parser.add_argument("--image", action="append", default=[], metavar="PNG", help="an image (repeatable)")
    parser.add_argument("--prompt", required=True, help="the instruction text")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    add_runner_argument(parser)
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="the checkpoint directory whose tokenizer to use (default: the one the bundle was "
                             "exported from, found relative to the bundle)")
    parser.add_argument("--dump-inputs", metavar="DIR", default=None,
                        help="also write the inputs fed to the graphs (token ids, attention mask, pixel values per "
                             "image, candidate positions) as inputs.json + raw .bin files for the C++ runtime's "
                             "`fastv-run --inputs DIR` (format: runtime/README.md), then generate as usual")


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


@dataclass
class TextCodec:
    """Prompt text <-> token ids for the bundle's source model."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    bos_token_id: int | None
    config: object


def _byte_codec(source: str) -> TextCodec:
    from fastv_export.presets import build_preset_config

    config = build_preset_config(source)
    return TextCodec(encode=lambda text: [BYTE_OFFSET + b % BYTE_RANGE for b in text.encode()],
                     decode=lambda ids: bytes((t - BYTE_OFFSET) % 256 for t in ids
                                              if BYTE_OFFSET <= t < BYTE_OFFSET + BYTE_RANGE).decode("utf-8", "replace"),
                     bos_token_id=config.text_config.bos_token_id, config=config)


def _word_codec(source: str) -> TextCodec:
    """The demo preset's word vocabulary (presets/shapes.py): one token per space-separated word."""
    from fastv_export.presets import shapes
    from fastv_export.presets import build_preset_config

    def encode(text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in shapes.TOKEN_ID]
        if unknown:
            raise FastVError(f"{source} knows only the words {' '.join(shapes.VOCAB[4:])}; "
                             f"{', '.join(map(repr, unknown))} is not among them")
        return [shapes.TOKEN_ID[w] for w in text.split()]

    config = build_preset_config(source)
    def decode(ids: list[int]) -> str:
        return " ".join(shapes.VOCAB[t] for t in ids if 0 <= t < len(shapes.VOCAB))

    return TextCodec(encode=encode, decode=decode, bos_token_id=config.text_config.bos_token_id, config=config)


def _checkpoint_codec(source: str) -> TextCodec:
    from transformers import AutoConfig, AutoTokenizer

    path = Path(source)
    if not (path / "config.json").is_file():
        raise FastVError(f"this bundle was exported from {source}, which is not a checkpoint directory here; `run` "
                         "needs it for the tokenizer: pass --model DIR (or use the Python API "
                         "fastv_export.runtime.generate.generate with token ids)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise FastVError(f"{path} holds no usable tokenizer ({str(exc).splitlines()[0]}); add its tokenizer files "
                         "or use the Python API fastv_export.runtime.generate.generate with token ids") from None
    return TextCodec(encode=lambda text: tok.encode(text, add_special_tokens=False),
                     decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                     bos_token_id=tok.bos_token_id, config=AutoConfig.from_pretrained(path, local_files_only=True))


def prompt_ids(prompt: str, codec: TextCodec, image_tokens: list[int], num_images: int) -> list[int]:
    """[BOS] + text with each <image> replaced by one image's tokens (images first if none is marked)."""
    parts = prompt.split(IMAGE_MARK)
    if len(parts) == 1:
        parts = [""] * num_images + parts
    elif len(parts) - 1 != num_images:
        raise FastVError(f"the prompt marks {len(parts) - 1} {IMAGE_MARK} but {num_images} --image were given; "
                         f"give one {IMAGE_MARK} per image (or none: the images then come first)")
    ids = [] if codec.bos_token_id is None else [codec.bos_token_id]
    for i, part in enumerate(parts):
        if i:
            ids += image_tokens
        ids += codec.encode(part) if part else []
    return ids


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from fastv_export.adapters import adapter_class_for
    from fastv_export.bundle import load_bundle
    from fastv_export.presets import PRESETS, TRAINED_PRESETS
    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.runners import open_runner

    if not args.prompt.strip():
        raise FastVError("--prompt is empty; give the instruction text")
    if args.max_new_tokens < 1:
        raise FastVError("--max-new-tokens must be >= 1")
    bundle = load_bundle(args.bundle)
    source = args.model or bundle.source
    if source in TRAINED_PRESETS:
        codec = _word_codec(source)
    else:
        codec = _byte_codec(source) if source in PRESETS else _checkpoint_codec(source)
    # the adapter needs only the config here (image tokens, preprocessing), not the weights
    adapter = adapter_class_for(bundle.architecture)(SimpleNamespace(config=codec.config))
    images = _load_images(args.image, adapter)
    ids = prompt_ids(args.prompt, codec, bundle.image_prompt_tokens(), len(images))
    ids = np.array([ids], dtype=np.int64)
    if args.dump_inputs:
        from fastv_export.runtime.dump import dump_inputs
        from fastv_export.runtime.generate import find_candidates

        dump_inputs(args.dump_inputs, ids, np.ones_like(ids), images, find_candidates(ids, bundle.image_token_ids))
    gen = generate(open_runner(bundle, args.runner), ids, np.ones_like(ids), images, args.max_new_tokens,
                   eos_token_id=bundle.eos_token_id)
    tokens = gen.tokens[0].tolist()
    f = bundle.fastv
    print(f"prompt: {ids.shape[1]} tokens ({len(images)} image(s)); kept {gen.kept.shape[1]} after "
          f"TokenSelect (K={f.k}, R={f.r.numerator}/{f.r.denominator}, {f.ranking})")
    print(f"tokens: {tokens}")
    print(f"text  : {codec.decode(tokens)!r}")
    if logging.getLogger(__name__).isEnabledFor(logging.INFO):   # -v
        for stage, sec in gen.timings.items():
            print(f"  {stage:>16}: {sec * 1e3:8.2f} ms")
    return 0
