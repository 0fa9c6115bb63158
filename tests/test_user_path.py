"""The user's path end to end (issue 20's acceptance): a user-style checkpoint directory (tests/user_checkpoints.py:
trained tokenizers, non-default processors, the families' chat templates) exported with K=2, then requests through
the front end loaded from the BUNDLE: the prompt ids equal the Hugging Face processor's exactly, the pixel inputs
within 1e-6, and the greedy tokens of the bundle's graphs equal HF ``model.generate`` (R=0) or the reference
``apply_fastv`` + generate (R=1/2) exactly, with the same number of new tokens and the same end-of-sequence rule
(the generation config's EOS ids: a row stops after the first of them, which it keeps).

The R=1/2 bundles are exported from a COPY of the checkpoint that is deleted right after the export: every R=1/2
test runs a bundle whose checkpoint directory no longer exists. Bad input through ``fastv-export run``: one line
on stderr and exit 2 each.

Exports are shared by the pytest-xdist workers (``once_per_run``); the tests that need one are marked ``slow``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import user_checkpoints as uc
from tests.helpers import once_per_run, run_cli, shared_dir

FAMILIES = list(uc.BUILDERS)
VIDEO_FAMILIES = ["qwen2_5_vl", "onevision"]
K = 2
NEW_TOKENS = 10
QUESTION = "What is in the image?"
SYSTEM = "Answer briefly."
#: the vision inputs of the model's forward that the front end and the HF processor both give
VISION_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw",
               "second_per_grid_ts")
#: pixel inputs (images and videos) agree within this; the ground truth's video pixels are its re-implementation of
#: the checkpoint's video processor (PIL resize of the decoded frames, see tests/user_checkpoints.py)
PIXELS_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return shared_dir(tmp_path_factory) / "user-checkpoints"     # the checkpoints test_user_checkpoints.py uses


@pytest.fixture(scope="module")
def checkpoint(root):
    return lambda family: uc.user_checkpoint(root, family)


@pytest.fixture(scope="module")
def images(root) -> list[Path]:
    return uc.test_images(root / "media")


@pytest.fixture(scope="module")
def media(root) -> Path:
    uc.test_video(root / "media")
    uc.test_frames_dir(root / "media")
    return root / "media"


def _copy_of_checkpoint(checkpoint: Path, name: str) -> Path:
    return checkpoint.parent / f".{checkpoint.name}-{name}-copy"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, checkpoint):
    """``bundle(family, ratio)``: the checkpoint exported with K=2 at ``ratio`` once per run. R=0: from the
    checkpoint directory; otherwise from a copy of it, deleted after the export."""
    from fastv_export.config import FastVConfig
    from fastv_export.export.onnx_export import ExportOptions, export_bundle

    base = shared_dir(tmp_path_factory) / "user-bundles"

    def get(family: str, ratio: str) -> Path:
        name = f"{family}-k{K}-r{ratio.replace('/', '_')}"
        source = checkpoint(family)

        def make(tmp: Path) -> None:
            if ratio == "0":
                export_bundle(tmp, FastVConfig(k=K, ratio=ratio), ExportOptions(model=str(source)))
                return
            copy = _copy_of_checkpoint(source, name)
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(source, copy)
            export_bundle(tmp, FastVConfig(k=K, ratio=ratio), ExportOptions(model=str(copy)))
            shutil.rmtree(copy)

        return once_per_run(base / name, make)
    return get


_RUNNERS: dict[str, object] = {}


def _runner(path: Path):
    """The loaded bundle's ONNX Runtime runner, opened once per process."""
    from fastv_export.bundle import load_bundle
    from fastv_export.runtime.runners import open_runner

    key = str(path)
    if key not in _RUNNERS:
        _RUNNERS[key] = open_runner(load_bundle(path))
    return _RUNNERS[key]


# ---------------------------------------------------------------------------------------------- requests
def _chat(media_kind: str, question: str = QUESTION, turns: bool = False) -> list[dict]:
    """HF chat messages: a system turn, (``turns``: a user turn with the medium, the assistant's answer, then a
    text-only user turn; else) one user turn with the medium and the question."""
    system = {"role": "system", "content": [{"type": "text", "text": SYSTEM}]}
    first = {"role": "user", "content": [{"type": media_kind}, {"type": "text", "text": question}]}
    if not turns:
        return [system, first]
    return [system, first, {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
            {"role": "user", "content": [{"type": "text", "text": "What colour is the square?"}]}]


def _request_json(messages: list[dict], path: str, **extra) -> dict:
    """The OpenAI chat form of ``messages`` with the medium's path in its part."""
    out = []
    for m in messages:
        parts = [dict(p, **({p["type"]: path} if p["type"] in ("image", "video") else {})) for p in m["content"]]
        out.append({"role": m["role"], "content": parts})
    return {"messages": out, **extra}


def _request(messages: list[dict], path: str):
    from fastv_export.frontend.request import Message, Part, Request

    return Request([Message(m["role"], tuple(Part(p["type"], p["text"] if p["type"] == "text" else path)
                                             for p in m["content"])) for m in messages])


def _front(path: Path):
    from fastv_export.bundle import load_bundle
    from fastv_export.frontend import Frontend

    bundle = load_bundle(path)
    return Frontend.load(bundle.path, bundle)


# ---------------------------------------------------------------------------------------------- comparisons
def _assert_prompt_equal(front, prepared, ref: dict, what: str) -> None:
    """Prompt ids exactly the processor's; the model's vision inputs within :data:`PIXELS_ATOL` (grids exact)."""
    from fastv_export.frontend.processor import model_vision_inputs

    ours_ids = prepared.input_ids[0].tolist()
    want_ids = ref["input_ids"][0].tolist()
    assert ours_ids == want_ids, f"{what}: prompt ids differ at {_first_difference(ours_ids, want_ids)}"
    assert prepared.attention_mask.all()
    ours = model_vision_inputs(prepared.processed[0], front.family)
    want = {k: np.asarray(ref[k]) for k in VISION_KEYS if ref.get(k) is not None}
    assert set(ours) == set(want), what
    for key, value in want.items():
        got = np.asarray(ours[key])
        assert got.shape == value.shape, (what, key, got.shape, value.shape)
        if key.startswith("pixel_values"):
            diff = float(np.abs(got.astype(np.float64) - value).max())
            assert diff <= PIXELS_ATOL, f"{what}: {key} differ by {diff:.3g}"
        else:
            np.testing.assert_allclose(got, value, rtol=0, atol=1e-6, err_msg=f"{what}: {key}")


def _first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"position {i} (lengths {len(a)} and {len(b)}): {a[i:i + 5]} vs {b[i:i + 5]}"


def _generate(path: Path, front, prepared, max_new: int = NEW_TOKENS) -> list[int]:
    """Greedy generation with the bundle's graphs (ONNX Runtime), stopped as HF generate stops: after the first
    of the generation config's EOS ids (kept)."""
    from fastv_export.runtime.generate import generate

    eos = set(front.eos_token_ids)
    stopped: list[int] = []

    def on_token(step: int, tokens: np.ndarray) -> bool:
        if int(tokens[0]) in eos:
            stopped.append(step)
            return True
        return False

    gen = generate(_runner(path), prepared.input_ids, prepared.attention_mask, prepared.images, max_new,
                   eos_token_id=min(eos) if eos else None, media=prepared.media,
                   video_seconds=prepared.video_seconds or None, on_token=on_token)
    tokens = gen.tokens[0].tolist()
    return tokens[:stopped[0] + 1] if stopped else tokens


def _hf_tokens(checkpoint: Path, ref: dict, ratio: str, max_new: int = NEW_TOKENS) -> list[int]:
    if ratio == "0":
        return uc.hf_generate(checkpoint, ref, max_new)
    return uc.hf_fastv_generate(checkpoint, ref, K, ratio, max_new)


def _cli_json(capsys, argv: list[str]) -> dict:
    from fastv_export.cli import main as cli

    capsys.readouterr()
    rc = cli(argv + ["--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    (row,) = json.loads(out.out)["rows"]
    return row


# ---------------------------------------------------------------------------------------------- EOS rule
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_stops_at_the_generation_configs_eos_ids(family, bundle, checkpoint):
    """The front end stops generation at every EOS id of the checkpoint's generation_config.json, as
    ``model.generate`` does (Qwen2.5-VL has two: <|im_end|> and <|endoftext|>)."""
    gen = json.loads((checkpoint(family) / "generation_config.json").read_text())["eos_token_id"]
    want = sorted(gen if isinstance(gen, list) else [gen])
    assert sorted(_front(bundle(family, "0")).eos_token_ids) == want


@pytest.mark.slow
def test_run_stops_where_hugging_face_stops(bundle, checkpoint, images, capsys):
    """Qwen2.5-VL's generation config stops at <|im_end|> and <|endoftext|>; on this picture and question the model
    says <|endoftext|> as its 22nd token: HF generate stops there (keeping it), and so does ``run``."""
    ckpt = checkpoint("qwen2_5_vl")
    endoftext = uc.hf_processor(ckpt).tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ref = uc.hf_prompt(ckpt, _chat("image"), [images[0]])
    want = uc.hf_generate(ckpt, ref, 30)
    assert len(want) < 30 and want[-1] == endoftext           # the case this test is about
    row = _cli_json(capsys, ["run", str(bundle("qwen2_5_vl", "0")), "--image", str(images[0]), "--system", SYSTEM,
                             "--prompt", QUESTION, "--max-new-tokens", "30"])
    assert row["tokens"] == want and row["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.slow
@pytest.mark.parametrize("ratio", ["0", "1/2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_images_prompt_pixels_and_tokens_equal_hugging_face(family, ratio, bundle, checkpoint, images):
    """>= 3 images of different sizes and aspect ratios (PNG and JPEG), a system turn and a question: prompt ids,
    pixels and greedy tokens of the bundle equal the checkpoint's processor and model (R=1/2: with the reference
    FastV), through the Python front end + runtime."""
    from PIL import Image

    path, ckpt = bundle(family, ratio), checkpoint(family)
    assert len({Image.open(p).size for p in images}) >= 3 and {p.suffix for p in images} == {".png", ".jpg"}
    front = _front(path)
    messages = _chat("image")
    for image in images:
        prepared = front.prepare(_request(messages, str(image)))
        ref = uc.hf_prompt(ckpt, messages, [image])
        _assert_prompt_equal(front, prepared, ref, f"{family} {image.name}")
        ours, want = _generate(path, front, prepared), _hf_tokens(ckpt, ref, ratio)
        assert ours == want, f"{family} R={ratio} {image.name}: {ours} != HF {want}"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_request_through_run_equals_hugging_face(family, bundle, checkpoint, images, tmp_path, capsys):
    """A request file (OpenAI chat format) with a system turn, an image, the assistant's earlier answer and a
    follow-up question, through ``fastv-export run --request --json`` (in process): the tokens equal HF's at R=0
    and at R=1/2 (max_tokens from the request)."""
    ckpt = checkpoint(family)
    image = images[1]
    messages = _chat("image", turns=True)
    ref = uc.hf_prompt(ckpt, messages, [image])
    assert "A red circle." in ref["text"]
    req = tmp_path / "req.json"
    req.write_text(json.dumps(_request_json(messages, str(image), max_tokens=NEW_TOKENS)))
    for ratio in ("0", "1/2"):
        row = _cli_json(capsys, ["run", str(bundle(family, ratio)), "--request", str(req)])
        assert row["prompt_tokens"] == ref["input_ids"].shape[1]
        want = _hf_tokens(ckpt, ref, ratio)
        assert row["tokens"] == want, f"{family} R={ratio}: {row['tokens']} != HF {want}"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_short_cli_form_equals_hugging_face(family, bundle, checkpoint, images, capsys):
    """``run BUNDLE --image photo.jpg --system ... --prompt ...`` (the short form): HF's tokens for the same
    conversation (a JPEG, R=1/2)."""
    ckpt = checkpoint(family)
    image = images[2]
    row = _cli_json(capsys, ["run", str(bundle(family, "1/2")), "--image", str(image), "--system", SYSTEM,
                             "--prompt", QUESTION, "--max-new-tokens", str(NEW_TOKENS)])
    ref = uc.hf_prompt(ckpt, _chat("image"), [image])
    assert row["prompt_tokens"] == ref["input_ids"].shape[1]
    assert row["tokens"] == _hf_tokens(ckpt, ref, "1/2")


@pytest.mark.slow
def test_validate_on_real_requests(bundle, checkpoint, images, media, tmp_path, capsys):
    """``validate --request`` (two requests: a PNG with a system turn, the video) and ``validate --image --prompt``
    on the R=1/2 Qwen2.5-VL bundle whose checkpoint was deleted (``--model`` names the directory): each request is
    one case, its prompt exactly the processor's, and every comparison passes."""
    import json

    family = "qwen2_5_vl"
    ckpt, path = checkpoint(family), bundle(family, "1/2")
    req = tmp_path / "req.json"
    req.write_text(json.dumps([_request_json(_chat("image"), str(images[0])),
                               _request_json(_chat("video"), str(media / "moving.mp4"))]))
    rc, err = run_cli(capsys, ["validate", str(path), "--model", str(ckpt), "--request", str(req),
                               "--max-new-tokens", "4", "--report-dir", str(tmp_path / "v")])
    assert rc == 0, err
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert report["requests"] == 2 and [c["batch"] for c in report["cases"]] == [1, 1]
    for case, (kind, medium) in zip(report["cases"], (("image", images[0]), ("video", media / "moving.mp4"))):
        ref = uc.hf_prompt(ckpt, _chat(kind), [medium] if kind == "image" else [], [medium] if kind == "video"
                           else None)
        assert case["prompt_tokens"] == ref["input_ids"].shape[1] and case["passed"]
        assert case["kept_tokens"] < case["prompt_tokens"]
    rc, err = run_cli(capsys, ["validate", str(path), "--model", str(ckpt), "--image", str(images[1]), "--prompt",
                               QUESTION, "--max-new-tokens", "4", "--report-dir", str(tmp_path / "v2")])
    assert rc == 0, err
    rc, err = run_cli(capsys, ["validate", str(path), "--request", str(req), "--media", "image"])
    assert rc == 2 and len(err.splitlines()) == 1 and "--media" in err


# ---------------------------------------------------------------------------------------------- videos
VIDEO_CASES = [("qwen2_5_vl", "moving.mp4"), ("qwen2_5_vl", "frames"), ("onevision", "moving.mp4")]


@pytest.mark.slow
@pytest.mark.parametrize("ratio", ["0", "1/2"])
@pytest.mark.parametrize("family, video", VIDEO_CASES)
def test_video_prompt_pixels_and_tokens_equal_hugging_face(family, video, ratio, bundle, checkpoint, media):
    """A video file (and for Qwen2.5-VL a folder of its frames) with a system turn and a question: prompt ids
    (hence frame count and grid) exactly the processor's, pixels within 1e-6 of the ground truth's (its video
    processor's re-implementation), greedy tokens equal HF's. A folder of frames has no frame rate: the front end
    takes it at the video processor's fps (frontend/video.py), so the ground truth is asked for that rate."""
    path, ckpt = bundle(family, ratio), checkpoint(family)
    front = _front(path)
    source = media / video
    messages = _chat("video", "Describe the video.")
    fps = uc.VIDEO_FPS
    if source.is_dir():
        fps = json.loads((ckpt / "video_preprocessor_config.json").read_text())["fps"]
    prepared = front.prepare(_request(messages, str(source)))
    ref = uc.hf_prompt(ckpt, messages, [], [source], frames_fps=fps)
    _assert_prompt_equal(front, prepared, ref, f"{family} {video}")
    ours, want = _generate(path, front, prepared), _hf_tokens(ckpt, ref, ratio)
    assert ours == want, f"{family} R={ratio} {video}: {ours} != HF {want}"


# ---------------------------------------------------------------------------------------------- self-contained
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_runs_after_its_checkpoint_is_deleted(family, bundle, checkpoint, images):
    """The R=1/2 bundle was exported from a copy of the checkpoint, deleted after the export: ``fastv-export run``
    (a separate process) answers from the bundle alone, with HF's tokens (a PNG)."""
    path = bundle(family, "1/2")
    ckpt = checkpoint(family)
    copy = _copy_of_checkpoint(ckpt, path.name)
    assert not copy.exists()
    source = json.loads((path / "manifest.json").read_text())["source_model"]
    assert (path / source["checkpoint"]).resolve() == copy.resolve()     # exported from the copy, which is gone
    image = images[0]
    proc = subprocess.run([sys.executable, "-m", "fastv_export.cli", "run", str(path), "--image", str(image),
                           "--system", SYSTEM, "--prompt", QUESTION, "--max-new-tokens", str(NEW_TOKENS), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["rows"]
    assert row["tokens"] == _hf_tokens(ckpt, uc.hf_prompt(ckpt, _chat("image"), [image]), "1/2")


# ---------------------------------------------------------------------------------------------- bad input
def _one_line(capsys, argv: list[str], message: str) -> None:
    rc, err = run_cli(capsys, argv)
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, (argv, rc, err)


@pytest.mark.slow
def test_bad_media_and_requests_exit_2_with_one_line(bundle, images, media, tmp_path, capsys):
    """Missing or unreadable image or video, request JSON errors and placeholders that do not match the media,
    against a real bundle (Qwen2.5-VL: it takes videos): one line on stderr and exit 2 each."""
    path = str(bundle("qwen2_5_vl", "0"))
    text_png = tmp_path / "notes.png"
    text_png.write_text("this is not a picture\n")
    text_mp4 = tmp_path / "clip.mp4"
    text_mp4.write_text("this is not a video\n")

    def request(data) -> str:
        f = tmp_path / f"req{len(list(tmp_path.glob('req*.json')))}.json"
        f.write_text(json.dumps(data))
        return str(f)

    user = {"role": "user", "content": [{"type": "image", "image": str(images[0])}, {"type": "text", "text": "Hi"}]}
    cases = [
        (["--image", str(tmp_path / "missing.jpg"), "--prompt", QUESTION], "does not exist"),
        (["--image", str(text_png), "--prompt", QUESTION], "cannot be read as an image"),
        (["--video", str(tmp_path / "missing.mp4"), "--prompt", QUESTION], "does not exist"),
        (["--video", str(text_mp4), "--prompt", QUESTION], str(text_mp4)),
        (["--request", request({"messages": [{"role": "robot", "content": "hi"}]})], "unknown role 'robot'"),
        (["--request", request({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]})],
         "unknown content type 'audio'"),
        (["--request", request({"messages": [{"content": "hi"}]})], "missing field 'role'"),
        (["--request", request({"messages": [{"role": "user", "content": [{"type": "image"}]}]})],
         "missing field 'image'"),
        (["--request", request({"max_tokens": 4})], "missing field 'messages'"),
        # placeholders: two in raw text for one image; a chat text part carrying the model's own placeholder
        (["--raw", "--image", str(images[0]), "--prompt", "<image> and <image>"],
         "2 image placeholder(s) (<|image_pad|>) but 1 image(s)"),
        (["--request", request({"messages": [dict(user, content=user["content"] + [
            {"type": "text", "text": "and <|vision_start|><|image_pad|><|vision_end|>"}])]})],
         "2 image placeholder(s)"),
        (["--raw", "--video", str(media / "moving.mp4"), "--prompt", "<image> what happens?"],
         "1 image placeholder(s) (<|image_pad|>) but 0 image(s)"),
    ]
    for argv, message in cases:
        _one_line(capsys, ["run", path, *argv], message)


@pytest.mark.slow
def test_image_the_fixed_layout_bundle_cannot_take_exits_2(exported_bundle, images, capsys):
    """A preset Qwen2-VL bundle takes its exported image size only (fixed layout): a wide picture, which its
    image processor resizes to another grid, is refused in one line naming both sizes."""
    path = str(exported_bundle("tiny-qwen2-vl", 2, "0"))
    rc, err = run_cli(capsys, ["run", path, "--image", str(images[0]), "--prompt", QUESTION])
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "wide.png (300x200 px)" in err and "fixed layout" in err and "takes only" in err, err


def _engines_section(prompt: int) -> dict:
    """A manifest ``engines`` section as `fastv-export build` writes it, with engines for at most ``prompt``
    prompt tokens (no engine files: the front end refuses before any engine is opened)."""
    return {"backend": "tensorrt", "backend_version": "test", "targets": ["sm_90"], "precision": "fp32",
            "strongly_typed": True, "token_select": "onnx_function_body", "plugin": None,
            "limits": {"max_batch": 1, "max_prompt": prompt},
            "lengths": {"prompt": prompt, "image_tokens": 64, "kept": prompt - 32, "new_tokens": 16},
            "timing_cache": "timing.cache", "trtexec_script": "build.sh", "engines": {}}


@pytest.mark.slow
def test_prompt_longer_than_the_engines_take_exits_2(bundle, images, monkeypatch, capsys):
    """``run --runner tensorrt`` on a bundle whose engines take at most 80 prompt tokens, given a 100-token LLaVA
    prompt: refused in one line before any engine is opened. (Engines need TensorRT and a GPU: the bundle is the
    real one with a build's engines section added in memory.)"""
    import fastv_export.bundle
    from fastv_export.bundle import Bundle, load_bundle

    real = load_bundle(bundle("llava", "0"))
    built = Bundle(real.path, dict(real.raw, engines=_engines_section(80)))
    assert built.engines.lengths.prompt == 80
    monkeypatch.setattr(fastv_export.bundle, "load_bundle", lambda path, *a, **k: built)
    argv = ["run", str(real.path), "--image", str(images[0]), "--system", SYSTEM, "--prompt", QUESTION]
    _one_line(capsys, argv + ["--runner", "tensorrt"], "takes 100 tokens; this bundle's engines take at most 80")
    # the same request fits engines of 100 tokens: it goes past the check (to the engines themselves)
    front = _front(real.path)
    front.bundle = Bundle(real.path, dict(real.raw, engines=_engines_section(100)))
    prepared = front.prepare(_request(_chat("image"), str(images[0])), check_engines=True)
    assert prepared.input_ids.shape[1] == 100


# ---------------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize("family", FAMILIES)
def test_front_end_over_the_checkpoint_equals_the_processor(family, checkpoint, images, media):
    """Without an export (the fast loop): the front end over the checkpoint's files and its loaded model's view
    (what calibration uses) gives the processor's prompt ids and pixels for two images (PNG, JPEG), and for the
    video families a video file."""
    from fastv_export.adapters import get_adapter
    from fastv_export.frontend import Frontend
    from fastv_export.frontend.processor import model_view
    from fastv_export.presets import load_model

    ckpt = checkpoint(family)
    front = Frontend.load(ckpt, model_view(get_adapter(load_model(str(ckpt)))))
    for image in (images[0], images[1]):
        messages = _chat("image")
        _assert_prompt_equal(front, front.prepare(_request(messages, str(image))),
                             uc.hf_prompt(ckpt, messages, [image]), f"{family} {image.name}")
    if family in VIDEO_FAMILIES:
        messages = _chat("video", "Describe the video.")
        source = media / "moving.mp4"
        _assert_prompt_equal(front, front.prepare(_request(messages, str(source))),
                             uc.hf_prompt(ckpt, messages, [], [source]), f"{family} video")
