"""LEGACY: `run` for preset bundles written before bundles carried tokenizer files (issue 20). Their text is
encoded byte by byte (id = 10 + byte mod 390), or with the demo tiny-llava-shapes' word vocabulary, and
images are preprocessed for the exported size. Delete this module once every preset bundle carries its
tokenizer.json, preprocessor_config.json and chat template (fastv_export/frontend then serves them)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from fastv_export.errors import FastVError

IMAGE_MARK = "<image>"
BYTE_OFFSET, BYTE_RANGE = 10, 390


@dataclass
class TextCodec:
    """Prompt text <-> token ids for a preset."""
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
    from fastv_export.presets import build_preset_config, shapes

    def encode(text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in shapes.TOKEN_ID]
        if unknown:
            raise FastVError(f"{source} knows only the words {' '.join(shapes.VOCAB[4:])}; "
                             f"{', '.join(map(repr, unknown))} is not among them")
        return [shapes.TOKEN_ID[w] for w in text.split()]

    def decode(ids: list[int]) -> str:
        return " ".join(shapes.VOCAB[t] for t in ids if 0 <= t < len(shapes.VOCAB))

    config = build_preset_config(source)
    return TextCodec(encode=encode, decode=decode, bos_token_id=config.text_config.bos_token_id, config=config)


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


def _load_images(paths: list[str], adapter) -> list:
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


def run(args: argparse.Namespace, bundle, requests: list) -> int:
    import numpy as np

    from fastv_export.adapters import adapter_class_for
    from fastv_export.presets import TRAINED_PRESETS
    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.runners import open_runner

    if args.request or args.video or len(requests) != 1:
        raise FastVError(f"this bundle ({bundle.source}) carries no tokenizer files: `run` takes --image and --prompt "
                         "only; re-export it with the current fastv-export for requests and videos")
    max_new = args.max_new_tokens if args.max_new_tokens is not None else 32
    if max_new < 1:
        raise FastVError("--max-new-tokens must be >= 1")
    source = bundle.source
    codec = _word_codec(source) if source in TRAINED_PRESETS else _byte_codec(source)
    adapter = adapter_class_for(bundle.architecture)(SimpleNamespace(config=codec.config))
    images = _load_images(args.image, adapter)
    prompt = (args.system + " " if args.system else "") + args.prompt
    ids = np.array([prompt_ids(prompt, codec, bundle.image_prompt_tokens(), len(images))], dtype=np.int64)
    if args.dump_inputs:
        from fastv_export.runtime.dump import dump_inputs
        from fastv_export.runtime.generate import find_candidates

        dump_inputs(args.dump_inputs, ids, np.ones_like(ids), images, find_candidates(ids, bundle.image_token_ids))
    gen = generate(open_runner(bundle, args.runner), ids, np.ones_like(ids), images, max_new,
                   eos_token_id=bundle.eos_token_id)
    tokens = gen.tokens[0].tolist()
    f = bundle.fastv
    print(f"prompt: {ids.shape[1]} tokens ({len(images)} image(s)); kept {gen.kept.shape[1]} after "
          f"TokenSelect (K={f.k}, R={f.r.numerator}/{f.r.denominator}, {f.ranking})")
    print(f"tokens: {tokens}")
    print(f"text  : {codec.decode(tokens)!r}")
    return 0
