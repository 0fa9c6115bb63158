"""The front end (fastv_export/frontend): requests, video frame sampling, the streaming detokenizer, and prompts
and pixels equal to the Hugging Face processor's on small checkpoint directories built here (tokenizers trained
with the `tokenizers` library, non-default image processors, real-style chat templates)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fastv_export.errors import FastVError
from fastv_export.frontend import Frontend, StopStrings, StreamDecoder, from_cli, load_requests, parse_requests
from fastv_export.frontend.video import Sampling, default_sample_indices, qwen_sample_indices, read_video

CORPUS = ["What is in the image? A red square and a blue circle on a white ground.",
          "USER: ASSISTANT: describe the picture, compare the two pictures",
          "The cat sat on the mat. Café, naïve, déjà vu. 日本語のテキスト。", "hello world, hello there " * 3]
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---------------------------------------------------------------------------------------------- fixtures
def _llama_style_tokenizer():
    """Metaspace + byte-fallback BPE trained here, BOS added by the post-processor (a Llama layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    # the byte tokens are ordinary vocabulary (as in Llama's), not special tokens that decoding would skip
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _qwen_style_tokenizer():
    """Byte-level BPE with the Qwen2 pre-tokenizer regex, ChatML and vision special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    return fast


def _bundle(tok, architecture: str, **fields):
    """The manifest fields the front end reads (a stand-in for a bundle of this checkpoint)."""
    image_ids = [tok.convert_tokens_to_ids(t) for t in fields.pop("image_tokens")]
    base = dict(architecture=architecture, image_token_ids=image_ids, pad_token_id=0, eos_token_id=tok.eos_token_id,
                engines=None, vision_layout={"kind": "fixed"}, grid_thw=None, spatial_merge_size=None,
                video_tokens_per_second=None, vision_input_shape=None, tokens_per_image=None)
    base.update(fields)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A LLaVA-1.5-style checkpoint's processing files: shortest edge 40, centre crop 28 (patch 7: 16 tokens),
    mean/std 0.5, bilinear; saved by LlavaProcessor as a user's checkpoint has them."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    d = tmp_path_factory.mktemp("llava")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 28, "width": 28},
                               image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2)
    LlavaProcessor(image_processor=ip, tokenizer=_llama_style_tokenizer(), patch_size=7,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_TEMPLATE).save_pretrained(d)
    cfg = json.loads((d / "processor_config.json").read_text())     # transformers 5 nests the image processor
    cfg["image_processor"]["image_processor_type"] = "CLIPImageProcessor"   # as llava-hf checkpoints name it
    (d / "processor_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three images of different sizes and aspect ratios, PNG and JPEG."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    out = []
    for i, (w, h, ext) in enumerate([(64, 48, "png"), (37, 90, "jpg"), (300, 200, "png")]):
        p = d / f"img{i}.{ext}"
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(p)
        out.append(p)
    return out


def _llava_bundle(tok):
    return _bundle(tok, "LlavaForConditionalGeneration", image_tokens=["<image>"],
                   vision_input_shape=[1, 3, 28, 28], tokens_per_image=16)


# ---------------------------------------------------------------------------------------------- requests
def _err(data) -> str:
    with pytest.raises(FastVError) as exc:
        parse_requests(data)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_request_errors_are_one_line_naming_where():
    assert "request 0: missing field 'messages'" in _err({})
    assert "request 1: messages[0]: unknown role 'robot'" in _err(
        [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "robot", "content": "x"}]}])
    assert "messages[0].content[1]: unknown content type 'audio'" in _err(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}]})
    assert "messages[0].content[0]: missing field 'image'" in _err(
        {"messages": [{"role": "user", "content": [{"type": "image"}]}]})
    assert "messages[0]: missing field 'content'" in _err({"messages": [{"role": "user"}]})
    assert "request 0.temperature: expected a number, got a string" in _err(
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})
    assert "top_p: 0.0 is out of range" in _err({"messages": [{"role": "user", "content": "hi"}], "top_p": 0})
    assert "max_tokens: expected an integer" in _err({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 1.5})
    assert "stop: expected a non-empty string" in _err({"messages": [{"role": "user", "content": "hi"}], "stop": 3})
    assert "not a local file" in _err({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
    assert "the request list is empty" in _err([])


def test_request_parsing(tmp_path):
    path = tmp_path / "req.json"
    path.write_text(json.dumps([
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "image_url", "image_url": {"url": "file:///x/b%20c.jpg"}},
                                                   {"type": "video", "video": "/abs/frames"},
                                                   {"type": "text", "text": "Compare."}]}],
         "max_tokens": 8, "temperature": 0.5, "top_k": 4, "top_p": 0.9, "seed": 3, "stop": "\n", "model": "x"},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b"]}]))
    a, b = load_requests(path)
    assert [p.value for p in a.media] == [str(tmp_path / "a.png"), "/x/b c.jpg", "/abs/frames"]
    assert [p.kind for p in a.media] == ["image", "image", "video"]
    assert (a.max_tokens, a.temperature, a.top_k, a.top_p, a.seed, a.stop) == (8, 0.5, 4, 0.9, 3, ["\n"])
    assert b.stop == ["a", "b"] and b.messages[0].parts[0].value == "hi"
    cli = from_cli("What?", ["x.png"], ["v.mp4"], system="S")
    assert [m.role for m in cli.messages] == ["system", "user"]
    assert [(p.kind, p.value) for p in cli.messages[1].parts] == [("image", "x.png"), ("video", "v.mp4"),
                                                                 ("text", "What?")]
    bad = tmp_path / "bad.json"
    bad.write_text("{\"messages\": [}")
    with pytest.raises(FastVError, match="is not valid JSON"):
        load_requests(bad)


# ---------------------------------------------------------------------------------------------- video
def _torch_qwen(total, video_fps, fps, min_frames, max_frames, tp):
    """The Qwen2-VL video processor's arithmetic written out again, the ramp with torch as it does."""
    import torch

    top = (min(max_frames, total) // tp) * tp
    n = int(min(max(total / video_fps * fps, min_frames), top, total) // tp * tp)
    return torch.arange(0, total, total / n).int().tolist()


@pytest.mark.parametrize("total, video_fps, fps", [(100, 30.0, 2.0), (37, 24.0, 2.0), (19, 3.0, 1.0),
                                                    (1000, 29.97, 2.0), (301, 25.0, 4.0), (16, 8.0, 8.0)])
def test_qwen_frame_sampling(total, video_fps, fps):
    got = qwen_sample_indices(total, video_fps, fps=fps, num_frames=None, min_frames=4, max_frames=768,
                              temporal_patch_size=2).tolist()
    assert got == _torch_qwen(total, video_fps, fps, 4, 768, 2)
    assert len(got) % 2 == 0 and got == sorted(set(got)) and got[-1] < total
    for asked, n in ((5, 4), (7, 8)):      # rounded half to even to whole temporal patches, as Python's round
        assert qwen_sample_indices(total, video_fps, fps=None, num_frames=asked, min_frames=4, max_frames=768,
                                   temporal_patch_size=2).tolist() == (_torch_ramp(total, n) if n <= total else None)


def _torch_ramp(total, n):
    import torch
    return torch.arange(0, total, total / n).int().tolist()


@pytest.mark.parametrize("total, video_fps, fps, num", [(100, 30.0, 2.0, None), (7, 30.0, 2.0, None),
                                                         (50, 10.0, None, 8), (10, 1.0, None, 10)])
def test_default_frame_sampling(total, video_fps, fps, num):
    n = num if num is not None else max(1, math.floor(total / video_fps * fps))
    want = [math.floor(i * total / n) for i in range(n)]
    assert default_sample_indices(total, video_fps, fps=fps, num_frames=num).tolist() == want


def test_video_file_and_folder(tmp_path):
    import av
    from PIL import Image

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    sampling = Sampling(do_sample_frames=True, fps=2.0, min_frames=4, max_frames=768, temporal_patch_size=2)
    video = read_video(path, sampling)
    assert video.total_frames == 25 and video.source_fps == 10.0
    assert len(video.frames) == len(_torch_qwen(25, 10.0, 2.0, 4, 768, 2)) == 4
    assert video.frames[0].size == (64, 48)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (20, 10), (i, 0, 0)).save(folder / f"{i:03d}.png")
    frames = read_video(folder, Sampling())
    assert [f.getpixel((0, 0))[0] for f in frames.frames] == list(range(6))
    with pytest.raises(FastVError, match="does not exist"):
        read_video(tmp_path / "none.mp4", sampling)
    (tmp_path / "bad.mp4").write_text("not a video")
    with pytest.raises(FastVError, match="cannot be decoded"):
        read_video(tmp_path / "bad.mp4", sampling)


# ---------------------------------------------------------------------------------------------- streaming
def test_stream_decoder_holds_split_utf8_characters():
    tok = _llama_style_tokenizer()
    text = "Café 日本語 naïve ✓ done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)     # characters split into bytes
    dec = StreamDecoder(lambda x: tok.decode(x, skip_special_tokens=True))
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)
    qwen = _qwen_style_tokenizer()
    ids = qwen("日本語 ✓ ok", add_special_tokens=False)["input_ids"]
    dec = StreamDecoder(qwen.decode)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == "日本語 ✓ ok" and not any("\ufffd" in p for p in pieces)


def test_stop_strings():
    s = StopStrings(["###", "\n\n"])
    assert s.cut("abc\n\nx###") == 3 and s.cut("abc") is None
    assert s.visible("hello ##", finished=False) == "hello "        # '##' may become '###'
    assert s.visible("hello ##", finished=True) == "hello ##"
    assert s.visible("a###b", finished=False) == "a"


# ---------------------------------------------------------------------------------------------- LLaVA vs HF
def test_llava_prompt_ids_and_pixels_equal_the_processor(llava_dir, images):
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(llava_dir)
    front = Frontend.load(llava_dir, _llava_bundle(proc.tokenizer))
    for count in (1, 3):
        request = parse_requests({"messages": [
            {"role": "user", "content": [{"type": "image", "image": str(p)} for p in images[:count]]
             + [{"type": "text", "text": "What is in the image?\nAnswer in one word."}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And the colour?"}]})[0]
        conv = [{"role": m.role, "content": [{"type": p.kind} if p.kind != "text" else {"type": "text", "text": p.value}
                                             for p in m.parts]} for m in request.messages]
        text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        pil = [Image.open(p).convert("RGB") for p in images[:count]]
        ref = proc(images=pil, text=text, return_tensors="np")
        got = front.prepare(request)
        assert got.prompts == [text]
        assert got.input_ids.tolist() == ref["input_ids"].tolist()
        image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
        assert got.input_ids[0, 0] == proc.tokenizer.bos_token_id and (got.input_ids == image_id).sum() == 16 * count
        np.testing.assert_allclose(np.concatenate(got.images), ref["pixel_values"], atol=1e-6, rtol=0)
        assert [u.shape for u in got.images] == [(1, 3, 28, 28)] * count


def test_llava_raw_prompts_marks_and_errors(llava_dir, images, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(llava_dir)
    front = Frontend.load(llava_dir, _llava_bundle(proc.tokenizer))
    text = "USER: <image>\nWhat is it? ASSISTANT:"
    ref = proc(images=[Image.open(images[0]).convert("RGB")], text=text, return_tensors="np")
    got = front.prepare(from_cli(text, [str(images[0])]), raw=True)
    assert got.input_ids.tolist() == ref["input_ids"].tolist()
    no_mark = front.prepare(from_cli("What is it?", [str(images[0])]), raw=True)
    assert no_mark.prompts == ["<image>What is it?"]
    with pytest.raises(FastVError, match=r"2 image placeholder\(s\) \(<image>\) but 1 image"):
        front.prepare(from_cli("<image> and <image>", [str(images[0])]), raw=True)
    with pytest.raises(FastVError, match="does not exist"):
        front.prepare(from_cli("hi", [str(tmp_path / "none.png")]))
    with pytest.raises(FastVError, match="take images only"):
        front.prepare(from_cli("hi", [], [str(tmp_path)]))
    # a processor that makes another size than the bundle's: one line naming both and the way out
    small = _llava_bundle(proc.tokenizer)
    small.vision_input_shape = [1, 3, 56, 56]
    with pytest.raises(FastVError, match=r"makes pixel values \[1, 3, 28, 28\]; this bundle's vision graph takes "
                                         r"\[1, 3, 56, 56\].*re-export"):
        Frontend.load(llava_dir, small).prepare(from_cli("hi", [str(images[0])]))


def test_batches_are_left_padded(llava_dir, images):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(llava_dir).tokenizer
    front = Frontend.load(llava_dir, _llava_bundle(tok))
    reqs = [from_cli("What is it?", [str(images[0])]), from_cli("Describe the picture, compare it.", [str(images[1])])]
    got = front.prepare(reqs)
    alone = [front.prepare(r).input_ids[0] for r in reqs]
    n = max(len(a) for a in alone)
    for row, ids, mask in zip(alone, got.input_ids, got.attention_mask):
        assert ids[n - len(row):].tolist() == row.tolist() and (ids[:n - len(row)] == tok.pad_token_id).all()
        assert mask.tolist() == [0] * (n - len(row)) + [1] * len(row)
    with pytest.raises(FastVError, match="different numbers of image tokens"):
        front.prepare([from_cli("a", [str(images[0])]), from_cli("b", [str(images[0])] * 2)])
    bundle = _llava_bundle(tok)
    bundle.engines = SimpleNamespace(lengths=SimpleNamespace(prompt=10), limits={"max_batch": 1})
    with pytest.raises(FastVError, match=r"takes \d+ tokens; this bundle's engines take at most 10"):
        Frontend.load(llava_dir, bundle).prepare(reqs[0], check_engines=True)


# ---------------------------------------------------------------------------------------------- Qwen2.5-VL
@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A Qwen2.5-VL-style checkpoint's processing files: patch 14, merge 2, min/max pixels 56^2 .. 224^2."""
    from transformers import Qwen2VLImageProcessorPil

    d = tmp_path_factory.mktemp("qwen")
    tok = _qwen_style_tokenizer()
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(d)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(d)
    cfg = json.loads((d / "preprocessor_config.json").read_text())
    cfg["image_processor_type"] = "Qwen2VLImageProcessor"
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    (d / "video_preprocessor_config.json").write_text(json.dumps(
        {"do_sample_frames": True, "fps": 2.0, "min_frames": 4, "max_frames": 16, "temporal_patch_size": 2,
         "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, "image_mean": cfg["image_mean"],
         "image_std": cfg["image_std"], "resample": 3}))
    return d


def _qwen_bundle(tok, layout="patch_grid"):
    return _bundle(tok, "Qwen2_5_VLForConditionalGeneration", image_tokens=["<|image_pad|>", "<|video_pad|>"],
                   vision_layout={"kind": layout, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                                  "window_size": 112},
                   grid_thw=[1, 12, 12], spatial_merge_size=2, video_tokens_per_second=2.0, tokens_per_image=36)


def _smart(h, w, factor=28, lo=56 * 56, hi=224 * 224):
    """Qwen's smart resize, written out: round to the factor, then scale into [lo, hi] pixels."""
    hb, wb = factor * round(h / factor), factor * round(w / factor)
    if hb * wb > hi:
        s = math.sqrt(h * w / hi)
        hb, wb = max(factor, factor * math.floor(h / s / factor)), max(factor, factor * math.floor(w / s / factor))
    elif hb * wb < lo:
        s = math.sqrt(lo / (h * w))
        hb, wb = factor * math.ceil(h * s / factor), factor * math.ceil(w * s / factor)
    return hb, wb


def test_qwen_grids_and_placeholders_follow_smart_resize(qwen_dir, images):
    from PIL import Image
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    front = Frontend.load(qwen_dir, _qwen_bundle(tok))
    got = front.prepare(from_cli("Compare them.", [str(p) for p in images]))
    start, end, pad = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
    ids = got.input_ids[0].tolist()
    blocks = []
    i = 0
    while i < len(ids):
        if ids[i] == start:
            j = ids.index(end, i)
            assert set(ids[i + 1:j]) == {pad}
            blocks.append(j - i - 1)
            i = j
        i += 1
    want = []
    for p, medium, unit in zip(images, got.media, got.images):
        w, h = Image.open(p).size
        rh, rw = _smart(h, w)
        assert medium.size == (rh, rw)
        assert unit.shape == ((rh // 14) * (rw // 14), 3 * 2 * 14 * 14)
        want.append((rh // 14) * (rw // 14) // 4)
    assert blocks == want
    assert got.prompts[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                     "<|vision_start|><|image_pad|><|vision_end|>")
    assert got.prompts[0].endswith("Compare them.<|im_end|>\n<|im_start|>assistant\n")
    # the generic <image> mark and the model's own placeholder both work in raw prompts
    raw_own = front.prepare(from_cli("<|vision_start|><|image_pad|><|vision_end|>What?", [str(images[0])]), raw=True)
    raw_generic = front.prepare(from_cli("<image>What?", [str(images[0])]), raw=True)
    assert raw_own.input_ids.tolist() == raw_generic.input_ids.tolist()
    # a fixed-layout (Qwen2-VL-style) bundle takes its exported grid only: one line naming both sizes
    fixed = _bundle(tok, "Qwen2VLForConditionalGeneration", image_tokens=["<|image_pad|>", "<|video_pad|>"],
                    grid_thw=[1, 12, 12], spatial_merge_size=2, tokens_per_image=36)
    rh, rw = _smart(200, 300)
    with pytest.raises(FastVError, match=rf"\(300x200 px\).* makes it {rw}x{rh} px .*takes only 168x168 px \(fixed"):
        Frontend.load(qwen_dir, fixed).prepare(from_cli("hi", [str(images[2])]))


def test_qwen_video_patches_and_seconds(qwen_dir, tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    front = Frontend.load(qwen_dir, _qwen_bundle(tok))
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.RandomState(1)
    frames = [Image.fromarray((rng.rand(60, 90, 3) * 255).astype("uint8")) for _ in range(7)]
    for i, f in enumerate(frames):
        f.save(folder / f"f{i}.png")
    got = front.prepare(from_cli("What happens?", videos=[str(folder)]))
    # 7 frames at the folder's 2 fps: sampled to 6 (whole temporal patches), 3 temporal patches
    rh, rw = _smart(60, 90, lo=56 * 56, hi=112 * 112)
    (medium,) = got.media
    assert medium.kind == "video" and medium.frames == 6 and medium.size == (rh, rw)
    rows = (rh // 14) * (rw // 14)
    assert len(got.images) == 3 and all(u.shape == (rows, 3 * 2 * 14 * 14) for u in got.images)
    assert (got.input_ids == tok.convert_tokens_to_ids("<|video_pad|>")).sum() == 3 * rows // 4
    kept = [frames[i] for i in _torch_qwen(7, 2.0, 2.0, 4, 16, 2)]
    assert got.video_seconds == [pytest.approx(2 / (2.0 * 6 / 7))]
    # one temporal patch of two equal frames is the image processor's own patches of that frame
    ip = Qwen2VLImageProcessorPil(min_pixels=rh * rw, max_pixels=rh * rw, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    first = kept[0].resize((rw, rh), resample=3)
    same = front.prepare(from_cli("x", videos=[_frames_dir(tmp_path / "same", [kept[0]] * 4)]))
    np.testing.assert_allclose(same.images[0], ip(images=first, do_resize=False, return_tensors="np")["pixel_values"],
                               atol=1e-6, rtol=0)


def _frames_dir(folder: Path, frames) -> str:
    folder.mkdir()
    for i, f in enumerate(frames):
        f.save(folder / f"{i:02d}.png")
    return str(folder)


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_text_prompts_go_through_the_front_end(llava_dir, images, tmp_path):
    """calibrate's folder format with text prompts: ids and pixels equal to the checkpoint's LlavaProcessor."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from fastv_export.adapters import get_adapter
    from fastv_export.calibrate import dataset

    proc = AutoProcessor.from_pretrained(llava_dir)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(image_size=28, patch_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2)
    config = LlavaConfig(vision_config=vision,
                         text_config=LlamaConfig(vocab_size=image_id + 8, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                 eos_token_id=2, pad_token_id=0),
                         image_token_id=image_id, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    adapter = get_adapter(LlavaForConditionalGeneration(config).eval())
    folder = tmp_path / "calib"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps({"image": p.name, "prompt": prompt, "answer": "a cat"})
                                                    for p in images))
    items = dataset.load_items(str(folder), adapter, 10, model=str(llava_dir))
    assert len(items) == 3
    for item, p in zip(items, images):
        ref = proc(images=[Image.open(p).convert("RGB")], text=prompt, return_tensors="np")
        assert item.input_ids.tolist() == ref["input_ids"].tolist()
        np.testing.assert_allclose(item.vision["pixel_values"].numpy(), ref["pixel_values"], atol=1e-6, rtol=0)
        assert item.answer == proc.tokenizer("a cat", add_special_tokens=False)["input_ids"] + [2]


# ---------------------------------------------------------------------------------------------- the run command
def test_run_bad_requests_exit_2_with_one_line(tmp_path, images, capsys):
    from tests.helpers import run_cli

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{\"messages\": [")
    robot = tmp_path / "robot.json"
    robot.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}))
    audio = tmp_path / "audio.json"
    audio.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]}))
    checks = [
        (["--request", str(bad_json)], "is not valid JSON"),
        (["--request", str(robot)], "messages[0]: unknown role 'robot'"),
        (["--request", str(audio)], "unknown content type 'audio'"),
        (["--image", str(tmp_path / "none.png"), "--prompt", "hi"], f"image {tmp_path / 'none.png'} does not exist"),
        (["--video", str(tmp_path / "none.mp4"), "--prompt", "hi"], "does not exist"),
        (["--request", str(robot), "--prompt", "hi"], "drop --prompt"),
        (["--image", str(images[0])], "give --prompt TEXT"),
    ]
    for argv, message in checks:
        rc, err = run_cli(capsys, ["run", str(tmp_path / "bundle"), *argv])
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


@pytest.mark.slow
def test_run_placeholder_mismatch_and_wrong_size_exit_2(exported_bundle, llava_dir, images, tmp_path, capsys):
    """tiny-llava's bundle with a LLaVA checkpoint's processing files (--model): media / placeholder mismatch
    and an image the processor makes into another size than the bundle takes, one line each."""
    from tests.helpers import run_cli

    bundle = str(exported_bundle("tiny-llava", 2, "1/2"))
    rc, err = run_cli(capsys, ["run", bundle, "--model", str(llava_dir), "--raw", "--image", str(images[0]),
                               "--prompt", "<image> and <image>"])
    assert rc == 2 and "2 image placeholder(s) (<image>) but 1 image(s)" in err and len(err.splitlines()) == 1
    rc, err = run_cli(capsys, ["run", bundle, "--model", str(llava_dir), "--image", str(images[0]),
                               "--prompt", "What is it?"])
    assert rc == 2 and "makes pixel values [1, 3, 28, 28]; this bundle's vision graph takes [1, 3, 56, 56]" in err
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- OneVision
def test_onevision_tiles_and_token_counts_equal_the_processor_rule(images, tmp_path):
    """LLaVA-OneVision anyres: tiles from the checkpoint's image processor, token counts (the bundle's anyres
    layout) equal to LlavaOnevisionProcessor._get_number_of_features for each image size."""
    from transformers import LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    d = tmp_path / "onevision"
    tok = _qwen_style_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                         "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
                         "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(d)
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
    ip = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip.save_pretrained(d)
    layout = {"kind": "tiles", "tile": 28, "patches_per_side": 4, "pinpoints": pinpoints, "max_num_patches": 9,
              "pooled_side": 2, "default_size": [56, 56], "default_tiles": 5}
    bundle = _bundle(tok, "LlavaOnevisionForConditionalGeneration", image_tokens=["<image>", "<video>"],
                     vision_layout=layout)
    front = Frontend.load(d, bundle)
    ns = SimpleNamespace(image_processor=ip, num_image_tokens=16, vision_aspect_ratio="anyres_max_9")
    ns._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(ns, *a)
    from PIL import Image

    for p in images:
        got = front.prepare(from_cli("What is it?", [str(p)]))
        w, h = Image.open(p).size
        (medium,) = got.processed[0]
        assert medium.media.size == (h, w)
        assert medium.count == LlavaOnevisionProcessor._get_number_of_features(ns, h, w, 28, 28)
        assert (got.input_ids == tok.convert_tokens_to_ids("<image>")).sum() == medium.count
        ref = ip(images=Image.open(p).convert("RGB"), return_tensors="np")["pixel_values"][0]
        assert got.images[0].shape[1:] == (3, 28, 28) and got.images[0].shape[0] <= ref.shape[0]
        np.testing.assert_array_equal(got.images[0], ref[:len(got.images[0])])


def test_run_streams_and_stops_and_writes_one_json_record(llava_dir, images, monkeypatch, capsys):
    """run over the front end with a scripted generation (the graphs are tested elsewhere): the text is streamed
    as it comes, cut at the stop string, and --json gives one record."""
    import fastv_export.bundle
    import fastv_export.runtime.generate
    import fastv_export.runtime.runners
    from fastv_export.cli import main as cli
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llava_dir)
    bundle = _llava_bundle(tok)
    bundle.path = llava_dir
    script = tok("Café ✓ done### more words", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    seen = {}

    def fake_generate(runner, input_ids, attention_mask, pixels, max_new_tokens, *, eos_token_id=None, media=None,
                      video_seconds=None, sampler=None, on_token=None):
        seen.update(ids=input_ids, sampler=sampler, max_new=max_new_tokens)
        out = []
        for step, t in enumerate(script[:max_new_tokens]):
            out.append(t)
            if on_token(step, np.array([t])):
                break
        return SimpleNamespace(tokens=np.array([out]), kept=np.array([[0, 1, 2]]), timings={"prefill": 0.25})

    monkeypatch.setattr(fastv_export.bundle, "load_bundle", lambda path: bundle)
    monkeypatch.setattr(fastv_export.runtime.runners, "open_runner", lambda b, name: None)
    monkeypatch.setattr(fastv_export.runtime.generate, "generate", fake_generate)
    argv = ["run", "b", "--image", str(images[0]), "--prompt", "What is it?", "--stop", "###"]
    capsys.readouterr()
    assert cli(argv + ["--stream"]) == 0
    assert capsys.readouterr().out == "Café ✓ done\n"
    assert seen["sampler"] is None and seen["max_new"] == 32
    assert cli(argv + ["--json", "--max-new-tokens", "40"]) == 0
    record = json.loads(capsys.readouterr().out)
    (row,) = record["rows"]
    assert row["text"] == "Café ✓ done" and row["finish_reason"] == "stop"
    assert row["tokens"] == script[:len(row["tokens"])] and len(row["tokens"]) < len(script)
    assert row["prompt_tokens"] == seen["ids"].shape[1] and row["kept_positions"] == [0, 1, 2]
    assert record["timings_ms"] == {"prefill": 250.0}
    assert cli(["run", "b", "--image", str(images[0]), "--prompt", "What is it?", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["text"] == "Café ✓ done### more words" and row["tokens"] == script     # ends at EOS
