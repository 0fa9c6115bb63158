"""The serving files of the built-in presets, written by code: a real ``tokenizer.json`` (built with the
``tokenizers`` library), its ``tokenizer_config.json`` and chat template, the image processor's
``preprocessor_config.json`` and ``generation_config.json``, under the names a checkpoint has them, so that
a preset's bundle is served exactly like a checkpoint's (fastv_export/export/serving.py).

- random presets: byte-level, byte ``b`` has id ``10 + b`` (no merges), the special tokens at the config's
  ids (pad 0, ``<s>`` 1, ``</s>`` 2, the vision tokens; InternVL's ``<img>`` / ``</img>`` at its config's start /
  end image token ids), ChatML's ``<|im_start|>`` / ``<|im_end|>`` at 266 / 267 for the families that use it.
  Every one adds ``<s>`` before a text, the Qwen-style ones included (a real Qwen tokenizer adds none): the
  random presets are exported, validated and benchmarked on prompts that start with their config's BOS
  (fastv_export/prompts.py), and their serving files keep to that;
- ``tiny-llava-shapes``: its word vocabulary (:mod:`.shapes`) as a WordLevel model split on whitespace (an
  unknown word is an encoding error), and a template that makes exactly the prompts it was trained on
  (``<s> <image> question words``; the processor expands ``<image>`` to the 64 image tokens).
Each family's chat template is in that family's style (LLaVA-1.5 ``USER: <image>\\n... ASSISTANT:``, Qwen's
ChatML with ``<|vision_start|><|image_pad|><|vision_end|>``, ...); its image processor config (the family's
processor class, as its checkpoints name it) gives the exported size: an image of that size (any size for the
families whose vision layout takes several) makes what the bundle's vision graph takes.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from fastv_export.errors import FastVError

BYTE_OFFSET = 10                       # byte b -> id 10 + b (the presets' synthetic text ids start there)
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_IDS = {IM_START: 266, IM_END: 267}
#: the files :func:`write_preset_files` writes
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
         "generation_config.json")

# ---------------------------------------------------------------------------------------------- templates
LLAVA_1_5 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _chatml(image: str, video: str, default_system: str | None) -> str:
    """Qwen's ChatML template: parts in their order, an optional default system message."""
    first = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + default_system +
             "<|im_end|>\n{% endif %}") if default_system else ""
    return ("{% for message in messages %}" + first + "<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for content in message['content'] %}{% if content['type'] == 'image' %}" + image +
            "{% elif content['type'] == 'video' %}" + video +
            "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


QWEN2_VL = _chatml("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>",
                   "You are a helpful assistant.")
QWEN3_VL = _chatml("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>", None)
INTERNVL = _chatml("<IMG_CONTEXT>\n", "<video>\n", None)
LLAVA_ONEVISION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")
SHAPES = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('tiny-llava-shapes takes no system message') }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + content['text'] }}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ ' </s>' }}{% endif %}{% endfor %}")


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """A preset family's template and its vision tokens (config attribute name -> token text)."""
    template: str
    vision_tokens: dict[str, str]
    chatml: bool
    image_processor: Callable


def _clip(adapter):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    s = int(adapter.config.vision_config.image_size)
    return CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def _qwen2_vl(adapter):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    v = adapter.config.vision_config
    side = adapter.image_grid[1] * v.patch_size
    return Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=v.patch_size,
                                    merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)


def _onevision(adapter):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    return LlavaOnevisionImageProcessorPil(size={"height": adapter.tile, "width": adapter.tile},
                                           image_grid_pinpoints=adapter.config.image_grid_pinpoints)


def _internvl(adapter):
    return adapter._processor()


_QWEN_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
FAMILIES = {
    "llava": Family(LLAVA_1_5, {"image_token_index": "<image>"}, False, _clip),
    "qwen2_vl": Family(QWEN2_VL, _QWEN_TOKENS, True, _qwen2_vl),
    "qwen2_5_vl": Family(QWEN2_VL, _QWEN_TOKENS, True, _qwen2_vl),
    "qwen3_vl": Family(QWEN3_VL, _QWEN_TOKENS, True, _qwen2_vl),
    "llava_onevision": Family(LLAVA_ONEVISION, {"image_token_index": "<image>", "video_token_index": "<video>"},
                              True, _onevision),
    "internvl": Family(INTERNVL, {"image_token_id": "<IMG_CONTEXT>"}, True, _internvl),
}
#: InternVL's tokenizer attributes (``extra_special_tokens``, as InternVL checkpoints name them) and their texts;
#: ``<img>`` / ``</img>`` at the config's start / end image token ids, ``<video>`` at the free id after the image
#: token
INTERNVL_TOKENS = {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>",
                   "video_token": "<video>"}


# ---------------------------------------------------------------------------------------------- tokenizers
def byte_level_tokenizer(special: dict[str, int]):
    """A byte-level ``tokenizers.Tokenizer``: byte b -> id 10 + b, no merges; ``special`` tokens at their
    ids; ``<s>`` added before every text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = {chars[b]: BYTE_OFFSET + b for b in range(256)}
    clash = [t for t, i in special.items() if BYTE_OFFSET <= i < BYTE_OFFSET + 256]
    if clash:
        raise FastVError(f"preset special tokens {clash} fall in the byte ids {BYTE_OFFSET}..{BYTE_OFFSET + 255}")
    vocab.update(special)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, special[BOS])])
    return tok


def word_tokenizer():
    """tiny-llava-shapes' word vocabulary: one token per whitespace-separated word, ``<s>`` added before."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    from fastv_export.presets import shapes

    tok = Tokenizer(models.WordLevel(vocab=dict(shapes.TOKEN_ID), unk_token="<unk>"))   # <unk> absent: unknown
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()                               # words fail to encode
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in shapes.SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, shapes.BOS_ID)])
    return tok


def _preset_tokenizer(name: str, config, family: Family):
    """(tokenizers.Tokenizer, chat template) of preset ``name``."""
    from fastv_export.presets import TRAINED_PRESETS

    if name in TRAINED_PRESETS:
        return word_tokenizer(), SHAPES
    text = config.text_config
    special = {PAD: int(text.pad_token_id), BOS: int(text.bos_token_id), EOS: int(text.eos_token_id)}
    for attr, token in family.vision_tokens.items():
        special[token] = int(getattr(config, attr))
    if family is FAMILIES["internvl"]:
        special.update({"<video>": int(config.image_token_id) + 1, "<img>": int(config.start_image_token_id),
                        "</img>": int(config.end_image_token_id)})
    if family.chatml:
        special.update(CHATML_IDS)
    if len(set(special.values())) != len(special) or max(special.values()) >= int(text.vocab_size):
        raise FastVError(f"preset {name}: its special token ids {special} clash or exceed the vocabulary")
    return byte_level_tokenizer(special), family.template


def write_preset_files(name: str, out: str | Path) -> None:
    """Write preset ``name``'s serving files (:data:`FILES`) into the directory ``out``."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from fastv_export.adapters import adapter_class_for
    from fastv_export.presets import _CLASSES, build_preset_config

    config = build_preset_config(name)
    adapter = adapter_class_for(_CLASSES[name])(SimpleNamespace(config=config))   # the config is all it reads
    family = FAMILIES[adapter.name]
    backend, template = _preset_tokenizer(name, config, family)
    text = config.text_config
    extra = {"extra_special_tokens": dict(INTERNVL_TOKENS)} if family is FAMILIES["internvl"] else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        clean_up_tokenization_spaces=False, chat_template=template,
                                        model_max_length=int(text.max_position_embeddings), **extra)
    generation = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                  pad_token_id=text.pad_token_id)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        family.image_processor(adapter).save_pretrained(scratch)
        generation.save_pretrained(scratch)
        for f in FILES:
            shutil.copyfile(Path(scratch) / f, Path(out) / f)


def preset_frontend(name: str, manifest):
    """The front end (:class:`fastv_export.frontend.Frontend`) of preset ``name`` from its serving files, as its
    bundle serves it; ``manifest``: the bundle's manifest or :func:`fastv_export.frontend.processor.model_view`
    of the loaded preset."""
    from fastv_export.frontend import Frontend

    with tempfile.TemporaryDirectory() as scratch:
        write_preset_files(name, scratch)
        return Frontend.load(scratch, manifest)       # reads every file while loading
