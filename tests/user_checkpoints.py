"""Checkpoint directories as a user has them, test media, and the Hugging Face ground truth (test support only:
no test of the product lives here).

Checkpoints (``llava_checkpoint``, ``qwen2_5_vl_checkpoint``, ``onevision_checkpoint``): the model from the real HF
config and model classes with the tiny sizes of the presets (seeded random weights, ``save_pretrained``); a
tokenizer TRAINED here with the ``tokenizers`` library on :data:`CORPUS` (LLaVA: Llama style, BPE with byte
fallback and Metaspace; Qwen2.5-VL and OneVision: byte-level BPE behind the Qwen2 pre-tokenizer regex), the model's
token ids set to the tokenizer's; non-default processor configs; the families' real chat templates; a
generation_config.json. ``user_checkpoint(root, family)`` builds one once per test run (locked, shared by the
pytest-xdist workers).

Media: ``test_images`` (PNG and JPEG, several sizes and aspect ratios), ``test_video`` (an mp4 written with
PyAV) and ``test_frames_dir`` (the same frames as PNG files).

Ground truth: ``hf_prompt`` (input ids and pixels as the checkpoint's processor makes them), ``hf_generate``
(greedy ``model.generate``) and ``hf_fastv_generate`` (``apply_fastv`` then the same generate).
What is real Hugging Face code and what is substituted (transformers 5 here has no torchvision, so the
Qwen2.5-VL and LLaVA-OneVision processors cannot load their video processors):

- LLaVA-1.5: all real: ``AutoProcessor.from_pretrained(checkpoint)`` (LlavaProcessor: CLIP PIL image processor,
  the tokenizer, the chat template), ``apply_chat_template`` then the processor call.
- Qwen2.5-VL / LLaVA-OneVision, images: real. The processor class itself (``Qwen2_5_VLProcessor`` /
  ``LlavaOnevisionProcessor``) is constructed from the checkpoint's files: its tokenizer (AutoTokenizer), its
  image processor (the PIL class, ``from_pretrained(checkpoint)``), its chat template and processor_config.json
  arguments. Only its video processor is a stand-in object (:class:`FrameVideoProcessor`; ProcessorMixin's class
  check is skipped for that one argument, as its base class cannot be resolved without torchvision); so the chat
  template, the processor's placeholder validation and expansion (``replace_image_token`` /
  ``replace_video_token``, OneVision's anyres and multi-image counts), its tokenization and, for Qwen2.5-VL,
  ``second_per_grid_ts`` and ``mm_token_type_ids`` are HF's own code. The images of one conversation are passed
  together (nested), as ``apply_chat_template(..., tokenize=True)`` passes them.
- Videos (both): the stand-in decodes nothing itself (frames come from :func:`read_video`, PyAV), samples frames
  (LLaVA-OneVision: HF's ``default_sample_indices_fn``; Qwen2-VL: its ``sample_frames`` formula, written out
  below because its module imports torchvision), resizes each frame with PIL (HF's video processors resize
  tensors with torchvision, so video pixels are a re-implementation, not bit-equal to HF's), normalizes, and for
  Qwen patchifies as Qwen2VLVideoProcessor does. The frame count, the grid and hence the prompt ids are
  exact; video pixels are this module's computation of the checkpoint's video_preprocessor_config.json
  (tested equal to the PIL image processor's patches on a still video). A folder of frames has no frame rate:
  ``hf_prompt`` takes it as ``frames_fps`` (default :data:`VIDEO_FPS`, the rate ``test_frames_dir`` was made at).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SEED = 20
#: a frame folder carries no frame rate: the rate its frames were written at (test_frames_dir)
VIDEO_FPS = 8
VIDEO_FRAMES = 16

CORPUS = """\
What is in the image? Describe the picture in one sentence. What colour is the circle?
The image shows a red circle next to a blue square on a green background.
There is a yellow triangle above two grey stripes, and the sky is light blue.
Please describe the video. A small white ball moves from the left to the right of the frame.
The photo was taken on a sunny day: a cat sits on the wooden table near the window.
How many shapes are there? There are three shapes: a circle, a square and a triangle.
Is the ball moving up or down? It moves slowly to the right, then it stops near the edge.
You are a helpful assistant. Answer the question about the image briefly and clearly.
The quick brown fox jumps over the lazy dog. A man is reading a book under a tree.
In the first frame the square is at the top left; in the last frame it is at the bottom right.
Colours: red, green, blue, yellow, orange, purple, black, white, grey, brown and pink.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, 1, 2, 3, 10, 42, 2024.
USER: What is in the image? ASSISTANT: A red circle and a blue square.
She said: "It's a picture of the sea." They're looking at the mountains; we've seen them before.
"""

#: the Qwen2 pre-tokenizer pattern (contractions, letters with one leading non-letter, single digits,
#: punctuation runs, newlines, spaces)
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

#: llava-hf's LLaVA-1.5 chat template ("USER: <image>\n... ASSISTANT:")
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto',"
    " 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

#: Qwen2-VL's ChatML template (default system message, vision blocks, optional "Picture N: " ids)
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

#: llava-hf's LLaVA-OneVision template (ChatML; a turn's images, then videos, then "\n" + each text)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# the non-default processor settings the tests check and compute with
LLAVA_TOWER = 112                      # CLIP image size (patch 14: 8 x 8 = 64 image tokens)
LLAVA_SHORTEST_EDGE = 128
QWEN_MIN_PIXELS = 28 * 28 * 16         # at least 4 x 4 merged tokens
QWEN_MAX_PIXELS = 28 * 28 * 64         # at most 64 merged tokens
QWEN_VIDEO_MIN_PIXELS = 28 * 28 * 4
QWEN_VIDEO_MAX_PIXELS = 28 * 28 * 16
QWEN_VIDEO_FPS = 2.0
ONEVISION_TILE = 28
ONEVISION_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
ONEVISION_VIDEO_FRAMES = 8


# ---- tokenizers ----------------------------------------------------------------------------------------
def llama_style_tokenizer(vocab_size: int = 420):
    """A Llama-layout tokenizer trained on :data:`CORPUS`: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the 256 byte
    tokens ``<0x00>``.. at 3.., then the learned pieces; BPE with byte fallback behind Metaspace ("▁" for spaces,
    prepended to the first piece), BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS.splitlines(), trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    return tok


def qwen_style_tokenizer(added: Sequence[str], vocab_size: int = 600):
    """A Qwen2-layout byte-level BPE trained on :data:`CORPUS` behind the Qwen2 regex (NFC, Split, ByteLevel
    without prefix space), then ``added`` as special added tokens in order (no BOS added on encoding)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return tok


def _save_tokenizer(tok, out: Path, cls_name: str, **special) -> Any:
    """Wrap the trained ``tok`` in transformers' fast tokenizer, save it (tokenizer.json, tokenizer_config.json
    naming ``cls_name``) and return the wrapper."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = cls_name
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return fast


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_model(config, cls_name: str, out: Path) -> None:
    import torch
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = getattr(transformers, cls_name)(config)
    model.eval().save_pretrained(out)


# ---- checkpoints -----------------------------------------------------------------------------------------
def llava_checkpoint(out: Path) -> Path:
    """LLaVA-1.5 as llava-hf lays it out: Llama-style trained tokenizer with ``<image>`` / ``<pad>`` added, CLIP
    tower of 112 px (CLIPImageProcessorPil: shortest edge 128, centre crop 112, mean/std 0.5, bilinear), the
    llava-hf template, LlavaProcessor.save_pretrained."""
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from fastv_export.presets import TINY_INIT_RANGE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = llama_style_tokenizer()
    _save_tokenizer(tok, out, "LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", model_max_length=4096, padding_side="left")
    ids = {t: tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=LLAVA_TOWER, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       initializer_range=TINY_INIT_RANGE, pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"],
                       eos_token_id=ids["</s>"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                         image_seq_length=(LLAVA_TOWER // 14) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", initializer_range=TINY_INIT_RANGE,
                         pad_token_id=ids["<pad>"])
    _save_model(config, "LlavaForConditionalGeneration", out)
    GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]).save_pretrained(out)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": LLAVA_SHORTEST_EDGE},
                                            crop_size={"height": LLAVA_TOWER, "width": LLAVA_TOWER},
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=2)
    image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(LLAVA_TEMPLATE)
    _write_json(out / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": "<image>", "num_additional_image_tokens": 1,
        "patch_size": 14, "vision_feature_select_strategy": "default"})
    return out


def _qwen_tokenizer_files(out: Path, added: Sequence[str], **special):
    tok = qwen_style_tokenizer(added)
    fast = _save_tokenizer(tok, out, "Qwen2Tokenizer", model_max_length=32768, padding_side="left",
                           split_special_tokens=False, **special)
    (out / "chat_template.jinja").write_text(special.get("chat_template", ""))
    return tok, fast


def qwen2_5_vl_checkpoint(out: Path) -> Path:
    """Qwen2.5-VL: byte-level BPE behind the Qwen2 regex with the ChatML and vision tokens added, the preset's
    tiny tower and text model, Qwen2VLImageProcessorPil with min/max pixels of 16..64 merged tokens, a
    video_preprocessor_config.json (2 fps, 4..16 merged tokens a frame), the Qwen2-VL template. The processor's
    files are written as Qwen2_5_VLProcessor.save_pretrained writes them (it cannot be built without
    torchvision): tokenizer files, preprocessor_config.json, video_preprocessor_config.json,
    chat_template.jinja."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fastv_export.presets import TINY_INIT_RANGE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|image_pad|>", "<|video_pad|>"]
    tok, _ = _qwen_tokenizer_files(out, added, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    (out / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    ids = {t: tok.token_to_id(t) for t in added}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                  fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=TINY_INIT_RANGE)
    text = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                initializer_range=TINY_INIT_RANGE,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], use_sliding_window=False)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], initializer_range=TINY_INIT_RANGE)
    _save_model(config, "Qwen2_5_VLForConditionalGeneration", out)
    GenerationConfig(bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                     pad_token_id=ids["<|endoftext|>"]).save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(out)
    _write_json(out / "video_preprocessor_config.json", {
        "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_sample_frames": True, "fps": QWEN_VIDEO_FPS, "num_frames": None, "min_frames": 4, "max_frames": 768,
        "size": {"shortest_edge": QWEN_VIDEO_MIN_PIXELS, "longest_edge": QWEN_VIDEO_MAX_PIXELS},
        "resample": 3, "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "cap_pixels_per_frame": False,
        "max_video_tokens": 128000, "return_metadata": False, "default_to_square": True})
    return out


def onevision_checkpoint(out: Path) -> Path:
    """LLaVA-OneVision (Qwen2 tokenizer with ``<image>`` / ``<video>``): SigLIP tiles of 28 px, anyres
    pinpoints up to 2 x 2 and 1 x 3 tiles, LlavaOnevisionImageProcessorPil with those pinpoints, a video config
    sampling 8 frames, llava-hf's OneVision template, processor_config.json as LlavaOnevisionProcessor writes."""
    from transformers import GenerationConfig, LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from fastv_export.presets import TINY_INIT_RANGE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok, _ = _qwen_tokenizer_files(out, added, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    (out / "chat_template.jinja").write_text(ONEVISION_TEMPLATE)
    ids = {t: tok.token_to_id(t) for t in added}
    patches = ONEVISION_TILE // 7
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=ONEVISION_TILE, patch_size=7)
    text = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       initializer_range=TINY_INIT_RANGE, pad_token_id=ids["<|endoftext|>"],
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], use_sliding_window=False,
                       tie_word_embeddings=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                                  video_token_index=ids["<video>"], image_grid_pinpoints=ONEVISION_PINPOINTS,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_9", initializer_range=TINY_INIT_RANGE,
                                  tie_word_embeddings=False)
    _save_model(config, "LlavaOnevisionForConditionalGeneration", out)
    GenerationConfig(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                     pad_token_id=ids["<|endoftext|>"]).save_pretrained(out)
    LlavaOnevisionImageProcessorPil(size={"height": ONEVISION_TILE, "width": ONEVISION_TILE},
                                    image_grid_pinpoints=ONEVISION_PINPOINTS).save_pretrained(out)
    _write_json(out / "video_preprocessor_config.json", {
        "video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True, "do_center_crop": None,
        "do_sample_frames": True, "num_frames": ONEVISION_VIDEO_FRAMES, "fps": None,
        "size": {"height": ONEVISION_TILE, "width": ONEVISION_TILE}, "resample": 3, "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "return_metadata": False,
        "default_to_square": False})
    _write_json(out / "processor_config.json", {
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": patches * patches,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
        "image_token": "<image>", "video_token": "<video>"})
    return out


BUILDERS = {"llava": llava_checkpoint, "qwen2_5_vl": qwen2_5_vl_checkpoint, "onevision": onevision_checkpoint}


def user_checkpoint(root: Path, family: str) -> Path:
    """The checkpoint of ``family`` (a key of :data:`BUILDERS`) under ``root``, built once per test run: under a
    file lock, into a temporary folder renamed when complete (tests/helpers.py ``once_per_run``)."""
    from tests.helpers import once_per_run

    return once_per_run(Path(root) / family, BUILDERS[family])


# ---- media -------------------------------------------------------------------------------------------------
def _draw_scene(size: tuple[int, int], seed: int):
    """A picture with structure: a two-colour gradient, a circle, a rectangle, a triangle and stripes."""
    from PIL import Image, ImageDraw

    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = ((x / max(w - 1, 1) + y / max(h - 1, 1)) / 2)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.1, h * 0.15, w * 0.45, h * 0.6], fill=(220, 30, 30), outline=(0, 0, 0), width=2)
    d.rectangle([w * 0.55, h * 0.2, w * 0.9, h * 0.5], fill=(30, 60, 220))
    d.polygon([(w * 0.5, h * 0.55), (w * 0.3, h * 0.95), (w * 0.75, h * 0.95)], fill=(240, 220, 40))
    for i in range(4):
        d.line([(0, h * (0.7 + 0.07 * i)), (w, h * (0.62 + 0.07 * i))], fill=(90, 90, 90), width=2)
    return img


#: (file name, width, height): wide, tall, square and small odd-sized; PNG and JPEG
IMAGE_SPECS = [("wide.png", 300, 200), ("tall.jpg", 150, 260), ("square.jpg", 180, 180), ("small.png", 67, 45)]


def test_images(out: Path) -> list[Path]:
    """The test pictures (:data:`IMAGE_SPECS`) written into ``out`` (again only when absent)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, w, h) in enumerate(IMAGE_SPECS):
        path = out / name
        if not path.exists():
            img = _draw_scene((w, h), seed=i)
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            img.save(tmp, format="JPEG" if name.endswith(".jpg") else "PNG", quality=92)
            os.replace(tmp, path)          # workers racing write the same bytes; the rename is atomic
        paths.append(path)
    return paths


test_images.__test__ = False   # not a pytest test (its name starts with "test_")


def video_frames(width: int = 160, height: int = 112, frames: int = VIDEO_FRAMES) -> list[np.ndarray]:
    """Frames [H, W, 3] uint8 of a white ball and a square moving over a gradient."""
    from PIL import ImageDraw

    out = []
    for i in range(frames):
        img = _draw_scene((width, height), seed=100)
        d = ImageDraw.Draw(img)
        cx, cy = 10 + i * (width - 20) / (frames - 1), height / 2 + 20 * math.sin(i / 3)
        d.ellipse([cx - 9, cy - 9, cx + 9, cy + 9], fill=(255, 255, 255))
        d.rectangle([i * 4, i * 3, i * 4 + 16, i * 3 + 16], fill=(0, 160, 0))
        out.append(np.asarray(img))
    return out


def test_video(out: Path, name: str = "moving.mp4") -> Path:
    """An H.264 mp4 (PyAV) of :func:`video_frames`: 16 frames at 8 fps, 160 x 112, in ``out``."""
    import av

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    if path.exists():
        return path
    tmp = out / f".{os.getpid()}-{name}"
    frames = video_frames()
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "medium"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


test_video.__test__ = False


def test_frames_dir(out: Path, name: str = "frames") -> Path:
    """A folder of PNG frames (frame_000.png ...) of :func:`video_frames`."""
    from PIL import Image

    path = Path(out) / name
    if path.exists():
        return path
    tmp = Path(out) / f".{os.getpid()}-{name}"
    tmp.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(video_frames()):
        Image.fromarray(f).save(tmp / f"frame_{i:03d}.png")
    try:
        tmp.rename(path)
    except OSError:                    # another worker made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


test_frames_dir.__test__ = False


def read_video(path: Path, fps: float | None = None) -> tuple[np.ndarray, float | None]:
    """All frames [T, H, W, 3] uint8 of a video file (PyAV) or of a folder of images (sorted by name), and the
    frame rate (the stream's; ``fps`` for a folder)."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]), fps
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.base_rate or Fraction(0))
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), rate or fps


# ---- ground truth: the processor -----------------------------------------------------------------------------
def _model_type(checkpoint: Path) -> str:
    return json.loads((Path(checkpoint) / "config.json").read_text())["model_type"]


class FrameVideoProcessor:
    """Stand-in for a video processor that transformers cannot build here (its class needs torchvision). Its
    behaviour is the checkpoint's video_preprocessor_config.json applied to decoded frames: frame sampling, PIL
    resize, rescale, normalize, and for Qwen2-VL's processor the temporal patches; see the module docstring.
    ``processor_kind`` is "qwen2_vl" or "llava_onevision"."""

    def __init__(self, config: dict, processor_kind: str, fps: Sequence[float | None]) -> None:
        self.config = config
        self.kind = processor_kind
        self.fps = list(fps)
        self.merge_size = config.get("merge_size", 2)
        self.temporal_patch_size = config.get("temporal_patch_size", 2)

    # the sampling rules ---------------------------------------------------------------------------------------
    def sample(self, total: int, fps: float | None) -> np.ndarray:
        c = self.config
        if not c.get("do_sample_frames"):
            return np.arange(total)
        if self.kind == "qwen2_vl":      # Qwen2VLVideoProcessor.sample_frames
            tps = self.temporal_patch_size
            num = c.get("num_frames")
            if num is not None:
                num = round(num / tps) * tps
            else:
                if fps is None:
                    raise ValueError("sampling at an fps needs the video's frame rate")
                max_frames = math.floor(min(c.get("max_frames", 768), total) / tps) * tps
                num = total / fps * c["fps"]
                num = min(max(num, c.get("min_frames", 4)), max_frames, total)
                num = math.floor(num / tps) * tps
            import torch
            return torch.arange(0, total, total / num).int().numpy()
        from transformers.video_utils import VideoMetadata, default_sample_indices_fn
        return np.asarray(default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=fps),
                                                    num_frames=c.get("num_frames"), fps=c.get("fps")))

    def _frames(self, frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """[T, H, W, 3] uint8 -> [T, 3, h, w] float32: PIL resize to (h, w), rescale, normalize."""
        from PIL import Image

        c = self.config
        h, w = size
        resized = np.stack([np.asarray(Image.fromarray(f).resize((w, h), resample=c.get("resample", 3)))
                            for f in frames]).astype(np.float32)
        x = resized * np.float32(c.get("rescale_factor", 1 / 255))
        x = (x - np.asarray(c["image_mean"], np.float32)) / np.asarray(c["image_std"], np.float32)
        return x.transpose(0, 3, 1, 2).astype(np.float32)

    def __call__(self, videos, **kwargs):
        import torch
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        pixels, grids, metadata = [], [], []
        for video, fps in zip(videos, self.fps):
            idx = self.sample(len(video), fps)
            frames = np.asarray(video)[idx]
            metadata.append(VideoMetadata(total_num_frames=len(video), fps=fps, frames_indices=list(map(int, idx))))
            if self.kind == "qwen2_vl":
                from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

                p, m, tps = self.config["patch_size"], self.merge_size, self.temporal_patch_size
                size = self.config["size"]
                h, w = smart_resize(frames.shape[1], frames.shape[2], factor=p * m, min_pixels=size["shortest_edge"],
                                    max_pixels=size["longest_edge"])
                x = self._frames(frames, (h, w))
                if pad := -len(x) % tps:
                    x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
                t, gh, gw = len(x) // tps, h // p, w // p
                x = x.reshape(t, tps, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
                pixels.append(x.reshape(t * gh * gw, 3 * tps * p * p))
                grids.append([t, gh, gw])
            else:
                size = self.config["size"]
                pixels.append(self._frames(frames, (size["height"], size["width"])))
        if self.kind == "qwen2_vl":
            data = {"pixel_values_videos": torch.from_numpy(np.concatenate(pixels)),
                    "video_grid_thw": torch.tensor(grids), "video_metadata": metadata}
        else:
            data = {"pixel_values_videos": torch.from_numpy(np.stack(pixels))}
        return BatchFeature(data, skip_tensor_conversion=["video_metadata"])


@contextmanager
def _video_processor_unchecked():
    """ProcessorMixin.__init__ checks each part's class; the video processor's base class cannot be resolved
    without torchvision, so for the video processor only (the stand-in) that check is skipped."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def checked(self, name, argument):
        if name == "video_processor" and isinstance(argument, FrameVideoProcessor):
            return FrameVideoProcessor
        return check(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = checked
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def hf_processor(checkpoint: Path, video_fps: Sequence[float | None] = ()):
    """The checkpoint's HF processor: LLaVA AutoProcessor.from_pretrained; Qwen2.5-VL and OneVision their
    processor class from the checkpoint's tokenizer, PIL image processor, template and processor_config.json,
    with :class:`FrameVideoProcessor` as the video processor."""
    from transformers import AutoProcessor, AutoTokenizer

    checkpoint = Path(checkpoint)
    kind = _model_type(checkpoint)
    if kind == "llava":
        return AutoProcessor.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    template = (checkpoint / "chat_template.jinja").read_text()
    video_cfg = json.loads((checkpoint / "video_preprocessor_config.json").read_text())
    extra = {}
    if (checkpoint / "processor_config.json").is_file():
        extra = {k: v for k, v in json.loads((checkpoint / "processor_config.json").read_text()).items()
                 if k != "processor_class"}
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        video = FrameVideoProcessor(video_cfg, "qwen2_vl", video_fps)
        with _video_processor_unchecked():
            return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(checkpoint),
                                       tokenizer=tokenizer, video_processor=video, chat_template=template,
                                       **extra)
    if kind == "llava_onevision":
        from transformers import LlavaOnevisionProcessor
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        video = FrameVideoProcessor(video_cfg, "llava_onevision", video_fps)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(checkpoint)
        with _video_processor_unchecked():
            return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                           chat_template=template, **extra)
    raise ValueError(f"no ground truth for model type {kind!r}")


def hf_prompt(checkpoint: Path, messages: list[dict], images: Sequence = (), videos: Sequence | None = None,
              frames_fps: float | None = VIDEO_FPS, add_generation_prompt: bool = True) -> dict:
    """The model inputs the checkpoint's processor makes for ``messages`` (HF chat format: content parts
    ``{"type": "image"}`` / ``{"type": "video"}`` / ``{"type": "text", "text": ...}``): ``apply_chat_template``
    (text), then the processor on that text, ``images`` (paths or PIL images, in order) and ``videos`` (video
    files or frame folders; a folder's frames are taken as ``frames_fps`` frames a second). Returns the
    processor's tensors (input_ids, attention_mask, pixel_values, image_grid_thw / image_sizes,
    pixel_values_videos, ...) plus ``text``: the rendered template."""
    from PIL import Image

    pil = [Image.open(p).convert("RGB") if isinstance(p, (str, Path)) else p for p in images]
    decoded = [read_video(v, frames_fps) for v in (videos or [])]
    processor = hf_processor(checkpoint, [fps for _, fps in decoded])
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    kwargs: dict = {"text": text, "return_tensors": "pt"}
    if pil:
        kwargs["images"] = [pil]    # one conversation's images, nested as apply_chat_template(tokenize=True) does
        #                             (LLaVA-OneVision treats several images of one conversation as multi-image)
    if decoded:
        kwargs["videos"] = [frames for frames, _ in decoded]
    out = dict(processor(**kwargs))
    out["text"] = text
    return out


# ---- ground truth: generation ---------------------------------------------------------------------------------
_MODELS: dict[str, Any] = {}
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids",
                "batch_num_images")


def hf_model(checkpoint: Path):
    """The checkpoint loaded with ``from_pretrained`` (float32, SDPA), once per process."""
    import torch
    import transformers

    key = str(Path(checkpoint).resolve())
    if key not in _MODELS:
        arch = json.loads((Path(checkpoint) / "config.json").read_text())["architectures"][0]
        _MODELS[key] = getattr(transformers, arch).from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()
    model = _MODELS[key]
    assert getattr(model, "_fastv_handle", None) is None, "FastV was left applied"
    return model


def _generate(model, prompt: dict, max_new_tokens: int, ignore_eos: bool) -> list[int]:
    import torch

    inputs = {k: v for k, v in prompt.items() if k in MODEL_INPUTS and v is not None}
    extra = {"eos_token_id": None} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_generate(checkpoint: Path, prompt: dict, max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """Greedy ``model.generate`` (do_sample=False) of the checkpoint on ``prompt`` (:func:`hf_prompt`): the new
    token ids; generation stops at the generation config's EOS unless ``ignore_eos``."""
    return _generate(hf_model(checkpoint), prompt, max_new_tokens, ignore_eos)


def hf_fastv_generate(checkpoint: Path, prompt: dict, k: int, r: str | float, max_new_tokens: int,
                      ranking: str = "last", ignore_eos: bool = False) -> list[int]:
    """As :func:`hf_generate` with the reference FastV (``fastv_export.reference.apply_fastv``, K, R, ranking)
    applied for the call and removed after."""
    from fastv_export import apply_fastv
    from fastv_export.config import FastVConfig

    model = hf_model(checkpoint)
    with apply_fastv(model, FastVConfig(k=k, ratio=r, ranking=ranking)):
        return _generate(model, prompt, max_new_tokens, ignore_eos)
