"""The self-contained bundle: the serving files (tokenizer, processors, chat template, generation config) and the
manifest's ``serving`` section.

- the pre-rendered chat template renders exactly what the Jinja template renders (through
  ``apply_chat_template``), for the presets' templates and real-style ones written here (llava-hf's LLaVA-1.5,
  Qwen2-VL's ChatML), and is null where it cannot;
- the presets' tokenizers (written by code) encode and decode as their byte / word codes say (byte b: id 10 + b;
  the demo's word vocabulary), and their image processor configs, loaded by the front end, give what the
  bundle's vision graph takes (CLIP-style pixels against an independent normalisation); InternVL's image
  expansion holds the bundle's image prompt tokens, ``<img>`` and ``</img>`` included;
- a checkpoint directory's files are copied byte for byte (a template kept in tokenizer_config.json gets its own
  chat_template.jinja), and the bundle loads its tokenizer after the checkpoint is deleted;
- the schema: a manifest missing a serving field fails with one line naming it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastv_export.bundle import MANIFEST, ChatForm, load_bundle
from fastv_export.bundle.verify import SERVING_ROLES
from fastv_export.errors import FastVError
from fastv_export.export.chat_template import prerender
from fastv_export.export.serving import ROLES, write_serving_files
from fastv_export.presets import PRESETS, TRAINED_PRESETS
from fastv_export.presets import serving as preset_serving
from tests.helpers import copy_bundle

# ---- real-style templates, as their checkpoints ship them ------------------------------------------------
# llava-hf/llava-1.5-7b-hf: USER / ASSISTANT, a message's images first, each text followed by a space
LLAVA_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Qwen/Qwen2-VL-7B-Instruct: ChatML, a default system message, vision blocks in content order
QWEN2_VL_HF = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-3 style: the template writes the BOS token itself
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# not pre-renderable: turns are numbered
NUMBERED = ("{% for message in messages %}{{ loop.index }}. {{ message['role'] }}: "
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

TEMPLATES = {"llava-hf": LLAVA_HF, "qwen2-vl-hf": QWEN2_VL_HF, "llama3-style": LLAMA3_STYLE,
             "preset-llava": preset_serving.LLAVA_1_5, "preset-qwen2-vl": preset_serving.QWEN2_VL,
             "preset-qwen3-vl": preset_serving.QWEN3_VL, "preset-internvl": preset_serving.INTERNVL,
             "preset-onevision": preset_serving.LLAVA_ONEVISION, "preset-shapes": preset_serving.SHAPES}

IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def msg(role: str, *parts: dict) -> dict:
    return {"role": role, "content": list(parts)}


#: the conversations of the issue: user only; system + user; system + user + assistant + user; images placed
#: before / after the text (and two images, and a video)
CONVERSATIONS = {
    "user": [msg("user", text("What is in the image?"))],
    "image_before": [msg("user", IMAGE, text("What is in the image?"))],
    "image_after": [msg("user", text("What is in the image?"), IMAGE)],
    "two_images": [msg("user", text("Is"), IMAGE, text("the same as"), IMAGE, text("?"))],
    "system_user": [msg("system", text("You are a careful assistant.")), msg("user", IMAGE, text("Describe it."))],
    "system_user_assistant_user": [msg("system", text("Answer briefly.")), msg("user", IMAGE, text("Colour?")),
                                   msg("assistant", text("Red.")), msg("user", text("And the shape?"))],
    "user_assistant_user": [msg("user", text("Hi")), msg("assistant", text("Hello.")), msg("user", IMAGE, text("?"))],
    "video": [msg("user", VIDEO, text("What happens?"))],
}


@pytest.fixture(scope="module")
def tokenizer():
    """A tokenizer to render templates with (its special tokens: <s>, </s>, <pad>)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<pad>": 2},
                                                                                unk_token="<pad>")),
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _jinja(tokenizer, template: str, conv: list[dict], gen: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=gen)
    except Exception:  # noqa: BLE001 - the template refuses the conversation
        return None


# ---- the pre-rendered chat template ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prerendered_template_renders_what_jinja_renders(name, tokenizer):
    template = TEMPLATES[name]
    form = prerender(tokenizer, template, name)
    assert form is not None
    assert ChatForm.from_dict(json.loads(json.dumps(form.to_dict()))) == form     # survives the manifest
    compared = 0
    for conv_name, conv in CONVERSATIONS.items():
        for gen in (False, True):
            want = _jinja(tokenizer, template, conv, gen)
            drops_video = form.video is None and any(p == VIDEO for m in conv for p in m["content"])
            if want is None or drops_video:     # the template refuses it (or drops the video): the form refuses it
                with pytest.raises(FastVError):
                    form.render(conv, gen)
                continue
            assert form.render(conv, gen) == want, (conv_name, gen)
            compared += 1
    refused = {"preset-shapes": 6, "llava-hf": 2, "preset-llava": 2, "llama3-style": 2}   # system turns / videos
    assert compared == 2 * len(CONVERSATIONS) - refused.get(name, 0)


def test_prerendered_forms_of_the_real_templates(tokenizer):
    """What the forms say, written out (independent of the derivation)."""
    llava = prerender(tokenizer, LLAVA_HF)
    assert (llava.user.prefix, llava.assistant.prefix, llava.text_suffix, llava.image, llava.generation_prompt) == (
        "USER: ", "ASSISTANT: ", " ", "<image>\n", "ASSISTANT:")
    assert llava.media_first and llava.video is None and llava.default_system is None and not llava.bos_in_template
    assert llava.render([msg("user", text("What is in the image?"), IMAGE)]) == \
        "USER: <image>\nWhat is in the image? ASSISTANT:"
    qwen = prerender(tokenizer, QWEN2_VL_HF)
    assert qwen.default_system == "You are a helpful assistant." and not qwen.media_first
    assert qwen.image == "<|vision_start|><|image_pad|><|vision_end|>"
    assert qwen.video == "<|vision_start|><|video_pad|><|vision_end|>"
    assert qwen.render([msg("user", IMAGE, text("What?"))]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n")
    llama = prerender(tokenizer, LLAMA3_STYLE)
    assert llama.start == "<s>" and llama.bos_in_template


def test_a_template_the_form_cannot_reproduce_gives_none_and_a_warning(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        assert prerender(tokenizer, NUMBERED, "numbered") is None
    assert "chat template of numbered cannot be pre-rendered" in caplog.text


def test_shapes_template_makes_the_trained_prompts(tokenizer):
    form = prerender(tokenizer, preset_serving.SHAPES)
    assert form.system is None and form.generation_prompt == ""
    assert form.render([msg("user", text("how many red ?"), IMAGE)]) == "<image> how many red ?"
    with pytest.raises(FastVError, match="takes no system message"):
        form.render([msg("system", text("x")), msg("user", text("how many red ?"))])


# ---- the presets' files ----------------------------------------------------------------------------------
PROMPTS = ["What is in the image?", "Line one\nline two\ttab  and spaces", "héllo wörld — ünïcode ✓ 日本",
           "ASSISTANT: <b>bold</b> {json: [1, 2]}"]
WORD_PROMPTS = ["what colour at row 1 col 2 ?", "how many red ?", "where is blue ?", "row 3 col 0 </s>"]


@pytest.fixture(scope="module")
def preset_files(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp(name)
            preset_serving.write_preset_files(name, cache[name])
        return cache[name]
    return get


BYTE_OFFSET = 10       # the random presets' byte code: byte b has id 10 + b


def _byte_ids(text: str) -> list[int]:
    return [BYTE_OFFSET + b for b in text.encode()]


def _word_ids(text: str) -> list[int]:
    from fastv_export.presets import shapes

    return [shapes.VOCAB.index(w) for w in text.split()]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_tokenizer_encodes_and_decodes_as_its_code_says(name, preset_files):
    from transformers import AutoTokenizer

    from fastv_export.presets import build_preset_config

    d = preset_files(name)
    assert sorted(p.name for p in d.iterdir()) == sorted(preset_serving.FILES)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    cfg = build_preset_config(name)
    bos = cfg.text_config.bos_token_id
    trained = name in TRAINED_PRESETS
    code = _word_ids if trained else _byte_ids
    for prompt in WORD_PROMPTS if trained else PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False)
        assert ids == code(prompt), prompt
        assert tok.encode(prompt) == [bos] + code(prompt)                      # every preset adds its BOS
        assert tok.decode(tok.encode(prompt), skip_special_tokens=True) == (
            prompt.replace(" </s>", "") if trained else prompt)
    if trained:
        with pytest.raises(Exception):                                         # an unknown word does not encode
            tok.encode("what is a dog ?")
    # the special tokens sit at the config's ids
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        cfg.text_config.pad_token_id, bos, cfg.text_config.eos_token_id)
    image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    form = prerender(tok, tok.chat_template, name)
    assert form is not None
    assert image_id in tok.encode(form.image, add_special_tokens=False)         # the image part's text holds it


def test_internvl_preset_names_its_image_tokens_as_internvl_checkpoints_do(preset_files):
    """InternVL's processor reads <img> / </img> / <IMG_CONTEXT> from tokenizer attributes; the preset's tokenizer
    has them, at the config's ids."""
    from transformers import AutoTokenizer

    from fastv_export.presets import build_preset_config

    cfg = build_preset_config("tiny-internvl")
    tok = AutoTokenizer.from_pretrained(preset_files("tiny-internvl"), local_files_only=True)
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == ("<img>", "</img>", "<IMG_CONTEXT>")
    assert tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]) == [
        cfg.start_image_token_id, cfg.end_image_token_id, cfg.image_token_id]


#: the image processor class of each family's preset config (the PIL classes: no torchvision here)
PIL_CLASSES = {
    "llava": "transformers.models.clip.image_processing_pil_clip.CLIPImageProcessorPil",
    "qwen2_vl": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
    "llava_onevision": "transformers.models.llava_onevision.image_processing_pil_llava_onevision."
                       "LlavaOnevisionImageProcessorPil",
    "internvl": "transformers.models.got_ocr2.image_processing_pil_got_ocr2.GotOcr2ImageProcessorPil",
}


#: an image of the exported size per family: (height, width)
def _exported_size(adapter) -> tuple[int, int]:
    if adapter.name == "llava_onevision":
        return adapter.default_size()
    if hasattr(adapter, "image_grid"):
        side = adapter.image_grid[1] * adapter.config.vision_config.patch_size
        return side, side
    side = adapter.tile if hasattr(adapter, "tile") else adapter.config.vision_config.image_size
    return side, side


@pytest.mark.parametrize("name", [p for p in PRESETS if not p.startswith("bench")])
def test_preset_image_processor_config_gives_the_exported_pixels(name, preset_files, model_and_adapter, tmp_path):
    """The config names the family's processor class, and the front end, loaded from the preset's files, turns
    an image of the exported size into the vision-graph calls the bundle takes (their shapes, the tokens they
    encode to); CLIP-style families' pixels equal an independent normalisation of the image."""
    import torch
    from PIL import Image

    from fastv_export.adapters import Media
    from fastv_export.frontend.processor import model_view

    _, adapter = model_and_adapter(name)
    d = preset_files(name)
    config = json.loads((d / "preprocessor_config.json").read_text())
    family = {"qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen2_vl"}.get(adapter.name, adapter.name)
    assert config["image_processor_type"] == PIL_CLASSES[family].rsplit(".", 1)[1].removesuffix("Pil")
    h, w = _exported_size(adapter)
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    front = preset_serving.preset_frontend(name, model_view(adapter))
    got = front.process_image(str(tmp_path / "img.png"))
    want = adapter.vision_units([Media()], adapter.media_inputs([Media()], torch.Generator().manual_seed(0)))
    assert [tuple(u.shape) for u in got.units] == [tuple(u.shape) for u in want]
    assert got.count == sum(t in adapter.image_token_ids() for t in adapter.image_prompt_tokens())
    if family == "llava":
        mean, std = np.array(config["image_mean"]), np.array(config["image_std"])
        independent = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)[None]
        np.testing.assert_allclose(got.units[0], independent, atol=1e-5)


def test_internvl_expansion_holds_the_bundles_image_prompt_tokens(model_and_adapter, tmp_path):
    """The front end writes an image as InternVL's processor does (<img>, the context tokens of its tiles,
    </img>), and that is exactly the image prompt tokens the bundle records (adapter.media_prompt_tokens)."""
    from PIL import Image

    from fastv_export.adapters import Media
    from fastv_export.frontend import from_cli
    from fastv_export.frontend.processor import model_view

    _, adapter = model_and_adapter("tiny-internvl")
    front = preset_serving.preset_frontend("tiny-internvl", model_view(adapter))
    cfg = adapter.config
    for size in ((56, 56), (56, 112), (100, 60)):                         # 1, 3 (+thumbnail) and 7 tiles
        Image.new("RGB", size[::-1], (20, 90, 200)).save(tmp_path / "img.png")
        ids = front.prepare(from_cli("What is it?", [str(tmp_path / "img.png")], [])).input_ids[0].tolist()
        start, end = ids.index(cfg.start_image_token_id), ids.index(cfg.end_image_token_id)
        block = ids[start:end + 1]
        tiles = (len(block) - 2) // adapter.tokens_per_tile()
        assert block == [cfg.start_image_token_id] + [cfg.image_token_id] * (len(block) - 2) + [cfg.end_image_token_id]
        medium = Media("image", size)
        assert block == adapter.media_prompt_tokens(medium) and tiles == adapter.tiles(medium)
    assert adapter.image_prompt_tokens() == [502] + [500] * 16 + [503]


def test_role_names_agree():
    assert ROLES == SERVING_ROLES


# ---- checkpoints ------------------------------------------------------------------------------------------
def _checkpoint(path: Path, tokenizer: str = "json", generation: bool = True) -> Path:
    """A user-style LLaVA checkpoint directory: the tiny-llava model, a BPE tokenizer trained here (``json``:
    tokenizer.json; ``none``: no tokenizer), a non-default CLIP image processor, llava-hf's chat template,
    a generation config with two EOS ids and sampling defaults."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from fastv_export.presets import build_preset

    path.mkdir(parents=True)
    build_preset("tiny-llava").save_pretrained(path)
    if tokenizer == "json":
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(["a red square at row one", "what is in the image", "two blue circles"] * 20,
                                    trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      chat_template=LLAVA_HF, extra_special_tokens={"image_token": "<image>"})
        tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3, resample=2).save_pretrained(path)
    if generation:
        GenerationConfig(eos_token_id=[2, 7], bos_token_id=1, pad_token_id=0, do_sample=True, temperature=0.7,
                         top_p=0.9, top_k=20, max_new_tokens=64).save_pretrained(path)
    return path


def test_checkpoint_files_are_copied_and_described(tmp_path):
    """write_serving_files on a checkpoint (no graphs needed): the files byte for byte, the section."""
    from transformers import AutoConfig

    ckpt = _checkpoint(tmp_path / "ckpt")
    out = tmp_path / "bundle"
    out.mkdir()
    section = write_serving_files(ckpt, AutoConfig.from_pretrained(ckpt), out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "generation_config.json"):
        assert (out / f).read_bytes() == (ckpt / f).read_bytes(), f
    assert section["tokenizer"] == "tokenizer.json" and section["chat_template"] == "chat_template.jinja"
    assert section["image_processor"] == "preprocessor_config.json" and section["video_processor"] is None
    assert section["generation"] == {"eos_token_ids": [2, 7], "bos_token_id": 1, "pad_token_id": 0,
                                     "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9,
                                     "repetition_penalty": None, "max_new_tokens": 64}
    assert section["chat"]["image"] == "<image>\n" and section["chat"]["generation_prompt"] == "ASSISTANT:"


def test_checkpoint_with_a_word_vocabulary_without_unknown_token_is_described(tmp_path):
    """The demo's word-level tokenizer cannot encode arbitrary text (no unknown token): the copy check and the
    BOS probe use words it knows instead of failing with the tokenizers library's own exception."""
    from transformers import AutoConfig, AutoTokenizer

    from fastv_export.presets import build_preset_config

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    build_preset_config("tiny-llava-shapes").save_pretrained(ckpt)
    preset_serving.write_preset_files("tiny-llava-shapes", ckpt)
    with pytest.raises(Exception, match="UNK|unk|Unk"):
        AutoTokenizer.from_pretrained(ckpt).encode("Hello, wörld")
    out = tmp_path / "bundle"
    out.mkdir()
    section = write_serving_files(ckpt, AutoConfig.from_pretrained(ckpt), out)
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert section["tokenizer_adds_bos"] is True          # the demo's prompts start with <s> (shapes.py)


def test_a_template_kept_in_tokenizer_config_gets_its_own_file(tmp_path):
    """An older checkpoint keeps its chat template inside tokenizer_config.json: the bundle copies that file as it
    is and writes the template as chat_template.jinja too, which serving.chat_template names."""
    from transformers import AutoConfig, AutoTokenizer

    ckpt = _checkpoint(tmp_path / "ckpt")
    (ckpt / "chat_template.jinja").unlink()
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAVA_HF
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(ckpt).chat_template == LLAVA_HF
    out = tmp_path / "bundle"
    out.mkdir()
    section = write_serving_files(ckpt, AutoConfig.from_pretrained(ckpt), out)
    assert (out / "tokenizer_config.json").read_bytes() == (ckpt / "tokenizer_config.json").read_bytes()
    assert section["chat_template"] == "chat_template.jinja"
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == LLAVA_HF
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).chat_template == LLAVA_HF
    assert section["chat"]["generation_prompt"] == "ASSISTANT:"


def test_checkpoint_without_tokenizer_exports_with_a_warning(tmp_path, caplog):
    from transformers import AutoConfig

    ckpt = _checkpoint(tmp_path / "ckpt", tokenizer="none", generation=False)
    out = tmp_path / "bundle"
    out.mkdir()
    with caplog.at_level(logging.WARNING):
        section = write_serving_files(ckpt, AutoConfig.from_pretrained(ckpt), out)
    assert section["tokenizer"] is None and section["chat"] is None and section["tokenizer_adds_bos"] is None
    assert "holds no tokenizer" in caplog.text
    # no generation_config.json: the one the model config implies
    assert section["generation_config"] == "generation_config.json" and section["generation"]["eos_token_ids"] == [2]


def test_checkpoint_without_tokenizer_json_gets_the_one_its_tokenizer_saves(tmp_path, monkeypatch):
    """A checkpoint whose tokenizer loads from other files (slow formats; transformers here cannot convert them
    without sentencepiece, so the checkpoint's tokenizer is stood in for): the bundle holds the tokenizer.json
    that tokenizer saves, and loads it to the same encodings."""
    from transformers import AutoConfig, AutoTokenizer

    from fastv_export.export import serving

    ckpt = _checkpoint(tmp_path / "ckpt")
    original = AutoTokenizer.from_pretrained(ckpt)
    saved = tmp_path / "saved"
    original.save_pretrained(saved)
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "vocab.txt").write_text("stands for the slow tokenizer's files\n")
    load = serving._load_tokenizer
    monkeypatch.setattr(serving, "_load_tokenizer", lambda d: original if Path(d) == ckpt else load(d))
    out = tmp_path / "bundle"
    out.mkdir()
    section = write_serving_files(ckpt, AutoConfig.from_pretrained(ckpt), out)
    assert section["tokenizer"] == "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == (saved / "tokenizer.json").read_bytes()
    assert (out / "vocab.txt").read_bytes() == (ckpt / "vocab.txt").read_bytes()
    again = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for prompt in PROMPTS:
        assert again.encode(prompt) == original.encode(prompt)


@pytest.mark.slow
def test_bundle_from_a_checkpoint_is_self_contained(tmp_path):
    from transformers import AutoTokenizer

    from fastv_export.config import FastVConfig
    from fastv_export.export import ExportOptions, export_bundle

    ckpt = _checkpoint(tmp_path / "ckpt")
    files = {f.name: f.read_bytes() for f in ckpt.iterdir() if not f.name.startswith("model")}
    files.pop("config.json")
    want_ids = AutoTokenizer.from_pretrained(ckpt).encode("what is in the image")
    out = tmp_path / "bundle"
    export_bundle(out, FastVConfig(k=2, ratio="1/2"), ExportOptions(model=str(ckpt)))
    shutil.rmtree(ckpt)
    bundle = load_bundle(out)
    for name, data in files.items():
        assert (out / name).read_bytes() == data and name in bundle.files, name
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.encode("what is in the image") == want_ids
    serving = bundle.serving
    assert serving.tokenizer == "tokenizer.json" and serving.generation.eos_token_ids == [2, 7]
    assert serving.chat.render([msg("user", IMAGE, text("Hi"))]) == "USER: <image>\nHi ASSISTANT:"


# ---- the schema -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serving_section_is_checked(exported_bundle, tmp_path):
    good = exported_bundle("tiny-llava", 2, "1/2")
    bundle = load_bundle(good)
    assert bundle.serving.tokenizer == "tokenizer.json" and bundle.serving.chat is not None
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "generation_config.json"):
        assert f in bundle.files
    b = copy_bundle(good, tmp_path)
    text_ = (good / MANIFEST).read_text()

    def edit(change) -> str:
        man = json.loads(text_)
        change(man)
        (b / MANIFEST).write_text(json.dumps(man))
        with pytest.raises(FastVError) as exc:
            load_bundle(b)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "required field 'serving' is missing; re-export the bundle" in edit(lambda m: m.pop("serving"))
    assert "required field 'serving.generation.eos_token_ids' is missing" in edit(
        lambda m: m["serving"]["generation"].pop("eos_token_ids"))
    assert "required field 'serving.chat.generation_prompt' is missing" in edit(
        lambda m: m["serving"]["chat"].pop("generation_prompt"))
    assert "required field 'serving.tokenizer' is missing" in edit(lambda m: m["serving"].pop("tokenizer"))
    assert "field 'serving.tokenizer' names 'tok.json', which 'files' does not list" in edit(
        lambda m: m["serving"].update(tokenizer="tok.json"))
    assert "field 'serving.generation.top_p'" in edit(lambda m: m["serving"]["generation"].update(top_p=2))
    assert "field 'serving.colour': unknown field" in edit(lambda m: m["serving"].update(colour="red"))
    (b / MANIFEST).write_text(text_)
    load_bundle(b)
