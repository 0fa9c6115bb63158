"""Checks of the user-style checkpoints, media and Hugging Face ground truth of tests/user_checkpoints.py: the
tokenizers are trained as their families' are, the processor configs are the non-default ones, the checkpoints
load and generate, the processor's placeholder counts equal the grid arithmetic written out here, and export
takes each checkpoint."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests import user_checkpoints as uc
from tests.helpers import shared_dir

FAMILIES = list(uc.BUILDERS)
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
VIDEO_QUESTION = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shared_dir(tmp_path_factory) / "user-checkpoints"


@pytest.fixture(scope="module")
def checkpoint(root):
    return lambda family: uc.user_checkpoint(root, family)


@pytest.fixture(scope="module")
def images(root):
    return uc.test_images(root / "media")


def _image_sizes(images):
    from PIL import Image

    return [Image.open(p).size for p in images]          # (width, height)


# ---- media -----------------------------------------------------------------------------------------------------
def test_images_differ_in_size_aspect_and_format(images):
    from PIL import Image

    sizes = _image_sizes(images)
    assert len(images) >= 3 and len(set(sizes)) == len(sizes)
    assert len({round(w / h, 2) for w, h in sizes}) >= 3
    assert {Image.open(p).format for p in images} == {"PNG", "JPEG"}
    for p in images:                                    # structure, not flat colour or noise
        a = np.asarray(Image.open(p).convert("L"), np.float32)
        assert a.std() > 20 and np.abs(np.diff(a, axis=1)).mean() < 20


def test_video_and_frames(root):
    path = uc.test_video(root / "media")
    frames, fps = uc.read_video(path)
    assert path.suffix == ".mp4" and fps == uc.VIDEO_FPS
    assert frames.shape == (uc.VIDEO_FRAMES, 112, 160, 3) and frames.dtype == np.uint8
    folder = uc.test_frames_dir(root / "media")
    still, rate = uc.read_video(folder, fps=8)
    assert rate == 8 and still.shape == frames.shape
    # the mp4 is lossy: close to the PNG frames, and the frames move
    assert np.abs(frames.astype(int) - still).mean() < 6
    assert np.abs(still[0].astype(int) - still[-1]).mean() > 1


# ---- tokenizers --------------------------------------------------------------------------------------------------
def test_llama_style_tokenizer_is_trained_with_byte_fallback(checkpoint):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = checkpoint("llava")
    spec = json.loads((path / "tokenizer.json").read_text())
    model = spec["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] and len(model["merges"]) > 100
    assert spec["pre_tokenizer"]["type"] == "Metaspace"
    assert [model["vocab"][t] for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]
    tok = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    # a learned word is one piece; a character never seen in training falls back to its UTF-8 bytes
    assert tok.convert_ids_to_tokens(tok("the image")["input_ids"]) == ["<s>", "▁the", "▁image"]
    ids = tok("ü→日")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:2] == ["<s>", "▁"]
    assert pieces[2:] == [f"<0x{b:02X}>" for b in "ü→日".encode()]
    assert tok.decode(ids, skip_special_tokens=True) == "ü→日"
    text = "USER: <image>\nWhat is in the image? ASSISTANT:"
    assert tok(text)["input_ids"] == raw.encode(text).ids          # transformers loads the tokenizer as trained
    assert tok.convert_tokens_to_ids("<image>") in tok(text)["input_ids"]


def test_qwen_style_tokenizer_splits_with_the_qwen_regex(checkpoint):
    import regex
    from transformers import AutoTokenizer

    for family, added in (("qwen2_5_vl", "<|image_pad|>"), ("onevision", "<image>")):
        path = checkpoint(family)
        spec = json.loads((path / "tokenizer.json").read_text())
        assert spec["model"]["type"] == "BPE" and len(spec["model"]["merges"]) > 100
        split, level = spec["pre_tokenizer"]["pretokenizers"]
        assert split["pattern"]["Regex"] == uc.QWEN_PATTERN and level["type"] == "ByteLevel"
        tok = AutoTokenizer.from_pretrained(path)
        text = "They're 42 cats!\n\n  héllo"
        # the Qwen2 split (contractions, one digit each, letters with a leading space, newline runs), in bytes
        words = regex.findall(uc.QWEN_PATTERN, text)
        assert words == ["They", "'re", " ", "4", "2", " cats", "!\n\n", " ", " héllo"]
        pre = [w for w, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        byte_level = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
        assert pre == ["".join(byte_level[b] for b in w.encode()) for w in words]
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and len(ids) < len(text.encode())      # merges apply
        assert tok(f"a{added}b")["input_ids"][1] == tok.convert_tokens_to_ids(added)   # an added token, whole
        assert tok("hi")["input_ids"][0] != tok.convert_tokens_to_ids("<|endoftext|>")  # no BOS


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet), written out."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def test_model_token_ids_are_the_tokenizers(checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    for family, pairs in (("llava", {"image_token_id": "<image>"}),
                          ("qwen2_5_vl", {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                                          "vision_start_token_id": "<|vision_start|>",
                                          "vision_end_token_id": "<|vision_end|>"}),
                          ("onevision", {"image_token_id": "<image>", "video_token_id": "<video>"})):
        path = checkpoint(family)
        cfg, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        assert cfg.text_config.vocab_size == len(tok)
        for attr, token in pairs.items():
            assert getattr(cfg, attr) == tok.convert_tokens_to_ids(token), (family, attr)
        gen = json.loads((path / "generation_config.json").read_text())
        eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
        assert tok.eos_token_id in eos and gen["pad_token_id"] == tok.pad_token_id


# ---- processor configs -------------------------------------------------------------------------------------------
def test_processor_configs_are_not_the_defaults(checkpoint):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    clip = CLIPImageProcessorPil.from_pretrained(checkpoint("llava"))
    default = CLIPImageProcessorPil()
    assert (clip.size.shortest_edge, clip.crop_size.height, clip.crop_size.width) == (128, 112, 112)
    assert (default.size.shortest_edge, default.crop_size.height) == (224, 224)
    assert tuple(clip.image_mean) == tuple(clip.image_std) == (0.5, 0.5, 0.5) != tuple(default.image_mean)
    assert int(clip.resample) == 2 != int(default.resample)
    qwen = Qwen2VLImageProcessorPil.from_pretrained(checkpoint("qwen2_5_vl"))
    qdefault = Qwen2VLImageProcessorPil()
    assert (qwen.size.shortest_edge, qwen.size.longest_edge) == (uc.QWEN_MIN_PIXELS, uc.QWEN_MAX_PIXELS)
    assert (qdefault.size.shortest_edge, qdefault.size.longest_edge) != (uc.QWEN_MIN_PIXELS, uc.QWEN_MAX_PIXELS)
    video = json.loads((checkpoint("qwen2_5_vl") / "video_preprocessor_config.json").read_text())
    assert video["do_sample_frames"] and video["fps"] == 2.0
    assert video["size"] == {"shortest_edge": uc.QWEN_VIDEO_MIN_PIXELS, "longest_edge": uc.QWEN_VIDEO_MAX_PIXELS}
    ov = LlavaOnevisionImageProcessorPil.from_pretrained(checkpoint("onevision"))
    cfg = json.loads((checkpoint("onevision") / "config.json").read_text())
    assert [list(p) for p in ov.image_grid_pinpoints] == cfg["image_grid_pinpoints"] == uc.ONEVISION_PINPOINTS
    assert (ov.size.height, ov.size.width) == (28, 28) != (LlavaOnevisionImageProcessorPil().size.height,) * 2
    ov_video = json.loads((checkpoint("onevision") / "video_preprocessor_config.json").read_text())
    assert ov_video["num_frames"] == uc.ONEVISION_VIDEO_FRAMES and ov_video["do_sample_frames"]


def test_chat_templates_render_the_families_formats(checkpoint):
    expected = {
        "llava": "USER: <image>\nWhat is in the image? ASSISTANT:",
        "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
                      "<|im_start|>assistant\n",
        "onevision": "<|im_start|>user <image>\nWhat is in the image?<|im_end|><|im_start|>assistant\n"}
    from transformers import AutoTokenizer

    for family, text in expected.items():
        tok = AutoTokenizer.from_pretrained(checkpoint(family))
        assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == text
        assert uc.hf_prompt(checkpoint(family), QUESTION, [_black()])["text"] == text


def _black():
    from PIL import Image

    return Image.new("RGB", (50, 40))


# ---- the ground truth: placeholder counts from the grid arithmetic --------------------------------------------------
def _qwen_resize(h: int, w: int, factor: int, lo: int, hi: int) -> tuple[int, int]:
    """Qwen2-VL's smart resize, written out: round to the factor, then scale into [lo, hi] pixels."""
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def test_llava_prompt_and_pixels(checkpoint, images):
    from PIL import Image

    path = checkpoint("llava")
    cfg = json.loads((path / "config.json").read_text())
    for image in images:
        p = uc.hf_prompt(path, QUESTION, [image])
        ids = p["input_ids"][0].tolist()
        assert ids[0] == 1 and ids.count(cfg["image_token_index"]) == (112 // 14) ** 2
        assert tuple(p["pixel_values"].shape) == (1, 3, 112, 112)
        # shortest edge to 128 (bilinear), centre crop 112, (x / 255 - 0.5) / 0.5: written out
        img = Image.open(image).convert("RGB")
        w, h = img.size
        s = 128 / min(w, h)
        nw, nh = (128, int(h * s)) if w <= h else (int(w * s), 128)
        a = np.asarray(img.resize((nw, nh), Image.BILINEAR), np.float32)
        top, left = (nh - 112) // 2, (nw - 112) // 2
        want = ((a[top:top + 112, left:left + 112] / 255 - 0.5) / 0.5).transpose(2, 0, 1)
        assert np.abs(p["pixel_values"][0].numpy() - want).max() < 1e-5, image.name


def test_qwen_placeholders_follow_the_smart_resize(checkpoint, images):
    path = checkpoint("qwen2_5_vl")
    cfg = json.loads((path / "config.json").read_text())
    for image, (w, h) in zip(images, _image_sizes(images)):
        p = uc.hf_prompt(path, QUESTION, [image])
        rh, rw = _qwen_resize(h, w, 28, uc.QWEN_MIN_PIXELS, uc.QWEN_MAX_PIXELS)
        assert p["image_grid_thw"][0].tolist() == [1, rh // 14, rw // 14], image.name
        ids = p["input_ids"][0].tolist()
        n = rh * rw // 28 ** 2
        start = ids.index(cfg["vision_start_token_id"])
        assert ids[start + 1:start + 2 + n] == [cfg["image_token_id"]] * n + [cfg["vision_end_token_id"]]
        assert tuple(p["pixel_values"].shape) == (rh * rw // 14 ** 2, 3 * 2 * 14 * 14)
    assert _qwen_resize(200, 300, 28, uc.QWEN_MIN_PIXELS, uc.QWEN_MAX_PIXELS) == (168, 252)   # the case


def test_qwen_video_placeholders_and_sampling(checkpoint, root):
    path = checkpoint("qwen2_5_vl")
    cfg = json.loads((path / "config.json").read_text())
    for video in (uc.test_video(root / "media"), uc.test_frames_dir(root / "media")):
        p = uc.hf_prompt(path, VIDEO_QUESTION, [], [video])
        # 16 frames at 8 fps sampled at 2 fps: 4 frames, 2 temporal patches of 2; 112 x 160 into 4..16 tokens
        frames = math.floor(min(max(16 / 8 * 2, 4), 16) / 2) * 2
        rh, rw = _qwen_resize(112, 160, 28, uc.QWEN_VIDEO_MIN_PIXELS, uc.QWEN_VIDEO_MAX_PIXELS)
        grid = [frames // 2, rh // 14, rw // 14]
        assert p["video_grid_thw"][0].tolist() == grid
        assert p["input_ids"][0].tolist().count(cfg["video_token_id"]) == math.prod(grid) // 4
        # 2 frames a temporal patch at the sampled 2 fps: 1 second each
        assert p["second_per_grid_ts"].tolist() == [1.0]
        assert p["mm_token_type_ids"][0].tolist().count(2) == math.prod(grid) // 4


def test_onevision_placeholders_follow_anyres(checkpoint, images, root):
    path = checkpoint("onevision")
    cfg = json.loads((path / "config.json").read_text())
    for image, (w, h) in zip(images, _image_sizes(images)):
        p = uc.hf_prompt(path, QUESTION, [image])
        assert p["input_ids"][0].tolist().count(cfg["image_token_index"]) == _onevision_tokens(h, w), image.name
        assert p["image_sizes"][0].tolist() == [h, w]
    p = uc.hf_prompt(path, VIDEO_QUESTION, [], [uc.test_video(root / "media")])
    # 8 sampled frames, each 4 x 4 features pooled to 2 x 2, one newline
    assert tuple(p["pixel_values_videos"].shape) == (1, 8, 3, 28, 28)
    assert p["input_ids"][0].tolist().count(cfg["video_token_index"]) == 8 * 4 + 1


def _onevision_tokens(h: int, w: int) -> int:
    """Base tile (4 x 4) + the unpadded grid of the best pinpoint with one newline a row, written out."""
    best, best_key = None, None
    for ph, pw in uc.ONEVISION_PINPOINTS:                  # select_best_resolution: most effective, least waste
        s = min(pw / w, ph / h)
        eff = min(int(w * s) * int(h * s), w * h)
        key = (eff, -(pw * ph - eff))
        if best_key is None or key > best_key:
            best, best_key = (ph, pw), key
    side = 4
    ch, cw = best[0] // 28 * side, best[1] // 28 * side
    if w / h > cw / ch:
        nh = int(round(h * (cw / w), 7))
        ch -= (ch - nh) // 2 * 2
    else:
        nw = int(round(w * (ch / h), 7))
        cw -= (cw - nw) // 2 * 2
    return side * side + ch * cw + ch


# ---- the checkpoints load, generate, and export ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_and_generates(family, checkpoint, images):
    path = checkpoint(family)
    prompt = uc.hf_prompt(path, QUESTION, [images[0]])
    tokens = uc.hf_generate(path, prompt, 12, ignore_eos=True)
    assert len(tokens) == 12 and len(set(tokens)) > 3                     # not degenerate
    assert uc.hf_generate(path, prompt, 12, ignore_eos=True) == tokens    # deterministic
    assert uc.hf_fastv_generate(path, prompt, 2, 0, 12, ignore_eos=True) == tokens   # R=0 is the model
    model = uc.hf_model(path)
    assert getattr(model, "_fastv_handle", None) is None


def test_fastv_ground_truth_prunes(checkpoint, images):
    from fastv_export import apply_fastv
    from fastv_export.config import FastVConfig

    path = checkpoint("qwen2_5_vl")
    prompt = uc.hf_prompt(path, QUESTION, [images[0]])
    model = uc.hf_model(path)
    with apply_fastv(model, FastVConfig(k=2, ratio="1/2")) as handle:
        uc._generate(model, prompt, 1, ignore_eos=True)
        kept = handle.kept_positions.shape[1]
    assert kept == prompt["input_ids"].shape[1] - 54 // 2
    differ = [uc.hf_fastv_generate(path, uc.hf_prompt(path, QUESTION, [im]), 2, "9/10", 16, ignore_eos=True)
              != uc.hf_generate(path, uc.hf_prompt(path, QUESTION, [im]), 16, ignore_eos=True) for im in images]
    assert any(differ)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_export_takes_the_checkpoint(family, checkpoint, tmp_path, capsys):
    from fastv_export.cli import main as cli
    from fastv_export.config import FastVConfig
    from fastv_export.export.onnx_export import ExportOptions, export_bundle

    path = checkpoint(family)
    assert cli(["export", "--model", str(path), "--out", str(tmp_path / "b"), "--k", "2", "--r", "0"]) == 0
    assert (tmp_path / "b" / "manifest.json").is_file()
    bundle = export_bundle(tmp_path / "api", FastVConfig(k=2, ratio="1/2"), ExportOptions(model=str(path)))
    assert (bundle.path / "manifest.json").is_file()


def test_qwen_video_stand_in_patches_as_the_image_processor(checkpoint):
    """The stand-in video processor's resize, normalisation and temporal patches equal HF's PIL image processor
    on a still video (both frames of each temporal patch the same picture) at the same size and settings."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = json.loads((checkpoint("qwen2_5_vl") / "video_preprocessor_config.json").read_text())
    frame = np.asarray(uc._draw_scene((160, 112), seed=7))
    stand_in = uc.FrameVideoProcessor({**cfg, "do_sample_frames": False}, "qwen2_vl", [8.0])
    out = stand_in([np.stack([frame, frame])])
    image = Qwen2VLImageProcessorPil(min_pixels=cfg["size"]["shortest_edge"], max_pixels=cfg["size"]["longest_edge"],
                                     image_mean=cfg["image_mean"], image_std=cfg["image_std"], resample=cfg["resample"],
                                     patch_size=14, merge_size=2, temporal_patch_size=2)
    want = image(images=Image.fromarray(frame), return_tensors="np")
    assert out["video_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    assert np.abs(out["pixel_values_videos"].numpy() - want["pixel_values"]).max() < 1e-5


def test_conversations_with_system_turns_and_two_images(checkpoint, images):
    """A system prompt, an earlier exchange and two images: each image expanded by the processor (LLaVA: 64;
    Qwen2.5-VL: its grid; OneVision: several images are one base tile + newline each)."""
    chat = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And in this one?"}]}]
    sizes = _image_sizes(images[:2])
    qwen = [math.prod(_qwen_resize(h, w, 28, uc.QWEN_MIN_PIXELS, uc.QWEN_MAX_PIXELS)) // 28 ** 2 for w, h in sizes]
    for family, token, count in (("llava", "image_token_index", 2 * 64), ("qwen2_5_vl", "image_token_id", sum(qwen)),
                                 ("onevision", "image_token_index", 2 * (16 + 1))):
        path = checkpoint(family)
        p = uc.hf_prompt(path, chat, images[:2])
        cfg = json.loads((path / "config.json").read_text())
        assert p["input_ids"][0].tolist().count(cfg[token]) == count, family
        assert "Answer briefly." in p["text"] and "A red circle." in p["text"]
        assert "You are a helpful assistant." not in p["text"]           # the given system prompt replaces it
        assert len(uc.hf_generate(path, p, 4, ignore_eos=True)) == 4
