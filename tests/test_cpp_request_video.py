"""Videos given as a folder of frames (Qwen2-VL / Qwen2.5-VL bundles) through fastv-run: ``--dry-run`` and the
tokens equal the Python front end's and ``fastv-export run --video``'s; bad folders refused in one line."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cpp_requests import ROOT, compare_dry_run, fail_line, fastv_run, py_error
from tests.helpers import once_per_run, shared_dir

# ---------------------------------------------------------------------------------------------- videos
#: folders of frames: name -> [(file name, width, height), ...] (a .jpg name is written as JPEG); "scene" is
#: tests/user_checkpoints.py's moving scene (16 PNG frames of 160x112)
FRAME_FOLDERS = {
    "four": [(f"f{i}.png", 64, 64) for i in range(4)],
    "three": [(f"f{i}.png", 64, 64) for i in range(3)],                  # odd: the last frame repeated
    "one": [("only.png", 80, 80)],
    "wide": [(f"w{i:02d}.png", 96, 40) for i in range(5)],
    "jpeg": [(f"j{i}.jpg", 72, 56) for i in range(6)],
    "mixed": [("a.png", 64, 64), ("b.png", 80, 48), ("c.png", 40, 72), ("d.png", 64, 64)],   # resized to the first's
    "names": [("b.png", 64, 64), ("A.PNG", 64, 64), ("a10.jpg", 64, 64), ("a9.png", 64, 64), ("c.JPEG", 64, 64)],
    "many": [(f"m{i:02d}.png", 48, 32) for i in range(21)],              # sampled by the user checkpoint's rule
}


@pytest.fixture(scope="session")
def frame_folders(tmp_path_factory) -> dict[str, Path]:
    """Folders of video frames (FRAME_FOLDERS, the scene) and bad ones: empty, no image files, an unreadable
    frame, a cut frame."""
    from tests import user_checkpoints as uc

    out = shared_dir(tmp_path_factory) / "cpp-request-frames"

    def make(tmp: Path) -> None:
        from PIL import Image

        rng = np.random.RandomState(21)
        for name, files in FRAME_FOLDERS.items():
            (tmp / name).mkdir(parents=True)
            for i, (file, w, h) in enumerate(files):
                pixels = (rng.rand(h, w, 3) * 255).astype("uint8")
                pixels[:, : w // 2] //= 1 + i                  # frames differ in time
                fmt = "JPEG" if file.lower().endswith((".jpg", ".jpeg")) else "PNG"
                Image.fromarray(pixels).save(tmp / name / file, format=fmt, quality=90)
        (tmp / "names" / "notes.txt").write_text("not a frame")
        uc.test_frames_dir(tmp, "scene")
        (tmp / "empty").mkdir()
        (tmp / "text-only").mkdir()
        (tmp / "text-only" / "readme.txt").write_text("no frames here")
        (tmp / "junk").mkdir()
        Image.fromarray(np.zeros((64, 64, 3), "uint8")).save(tmp / "junk" / "a.png")
        (tmp / "junk" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
        (tmp / "cut").mkdir()
        Image.fromarray(np.zeros((64, 64, 3), "uint8")).save(tmp / "cut" / "a.png")
        data = (tmp / "scene" / "frame_000.png").read_bytes()
        (tmp / "cut" / "b.png").write_bytes(data[: len(data) // 2])

    once_per_run(out, make)
    return {p.name: p for p in out.iterdir() if p.is_dir()}


def _video_conversations(video: Path, image: Path) -> list[tuple[dict, bool]]:
    """(request JSON, raw) pairs with a video: alone, after a system turn, with an image before and after it, and
    --raw with the generic <video> mark or none."""
    v, a = str(video), str(image)

    def user(*parts):
        return {"role": "user", "content": list(parts)}

    def vid(p):
        return {"type": "video", "video": p}

    def img(p):
        return {"type": "image", "image": p}

    def txt(t):
        return {"type": "text", "text": t}

    return [({"messages": [user(vid(v), txt("What happens in the video?"))]}, False),
            ({"messages": [{"role": "system", "content": "Answer briefly."}, user(txt("Describe:"), vid(v))]}, False),
            ({"messages": [user(img(a), txt("and"), vid(v), txt("compare them."))]}, False),
            ({"messages": [user(vid(v), txt("then"), img(a), txt("which came first?"))]}, False),
            ({"messages": [user(txt("<video>\nWhat is this?"), vid(v))]}, True),
            ({"messages": [user(vid(v), txt("no marks here"))]}, True)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_video_dry_run_equals_the_python_front_end_on_presets(runtime_build, exported_bundle, pictures,
                                                               frame_folders, tmp_path, model):
    """Folders of frames (several counts, sizes, formats, mixed sizes, names in every case) with and beside
    images: fastv-run --dry-run gives the Python front end's prompt text, ids and pixel sha256, or refuses
    where it refuses (Qwen2-VL's fixed layout takes its exported grid only; Qwen3-VL takes no videos)."""
    bundle = exported_bundle(model)
    n = 0
    for name in ("four", "three", "one", "wide", "jpeg", "mixed", "names", "scene"):
        n += compare_dry_run(runtime_build, bundle, _video_conversations(frame_folders[name], pictures["square.png"]),
                              tmp_path / name)
    if model == "tiny-qwen3-vl":
        assert n == 0
        line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", frame_folders["four"], "--prompt",
                                   "x", "--dry-run"))
        assert line == "Qwen3VLForConditionalGeneration bundles take images only; give images (or frames as images)"
    else:
        assert n >= 30


@pytest.mark.slow
def test_video_dry_run_equals_the_python_front_end_on_the_user_checkpoint(runtime_build, user_bundle, pictures,
                                                                          frame_folders, tmp_path):
    """The user-style Qwen2.5-VL checkpoint: its video_preprocessor_config.json samples frames (2 fps, 4..768
    frames, whole temporal patches) and bounds each frame to 4..16 merged tokens; too few frames are refused."""
    bundle = user_bundle("qwen2_5_vl")
    image = sorted(p for name, p in pictures.items() if name.startswith("user/"))[0]
    n = 0
    for name in ("four", "three", "one", "wide", "jpeg", "mixed", "names", "many", "scene"):
        n += compare_dry_run(runtime_build, bundle, _video_conversations(frame_folders[name], image), tmp_path / name)
    assert n >= 40
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", frame_folders["one"], "--prompt", "x",
                               "--dry-run"))
    assert line == "the video has 1 frames: too few to sample whole temporal patches of 2 frames; give a longer video"


@pytest.mark.slow
def test_video_folder_errors(runtime_build, exported_bundle, frame_folders, tmp_path):
    """Bad folders of frames: one line and a non-zero exit, the Python front end's message where it reads them
    (an empty folder, no image files, an unreadable or cut frame); a video file is refused (fastv-run reads
    folders of frames only)."""
    from fastv_export.bundle import load_bundle
    from fastv_export.frontend import Frontend

    bundle = exported_bundle("tiny-qwen2.5-vl")
    b = load_bundle(bundle)
    front = Frontend.load(b.path, b)
    for name in ("empty", "text-only"):
        line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", frame_folders[name], "--prompt", "x",
                                   "--dry-run"))
        assert line == py_error(lambda: front.process_video(str(frame_folders[name])))
    for name in ("junk", "cut"):
        line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", frame_folders[name], "--prompt", "x",
                                   "--dry-run"))
        assert line.startswith(f"frame {frame_folders[name] / 'b.png'} cannot be read as an image ("), line
        py_error(lambda: front.process_video(str(frame_folders[name])))
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", tmp_path / "clip.mp4", "--prompt", "x",
                               "--dry-run"))
    assert line.startswith(f"video {tmp_path / 'clip.mp4'}: fastv-run reads videos given as a folder of frames")
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", tmp_path / "none", "--prompt", "x",
                               "--dry-run"))
    assert line == f"video {tmp_path / 'none'} does not exist"


def _python_run_json(bundle: Path, *args: str) -> dict:
    """`fastv-export run BUNDLE ARGS --json` (the onnxruntime runner) in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "fastv_export.cli", "run", str(bundle), *map(str, args), "--json",
                           "--runner", "onnxruntime"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "user-qwen2_5_vl"])
def test_video_answers_equal_fastv_export_run(runtime_build, exported_bundle, user_bundle, frame_folders, pictures,
                                              model):
    """End to end with the cpu executor: `fastv-run --video DIR` gives the tokens, text, kept positions and prompt
    length of `fastv-export run --video DIR` (greedy; Qwen2.5-VL also with seeded sampling, and a video beside an
    image), so the video's pixels, grid, seconds per temporal patch and M-RoPE positions agree."""
    bundle = user_bundle("qwen2_5_vl") if model.startswith("user") else exported_bundle(model)
    cases = [("--video", frame_folders["four"], "--prompt", "What happens?", "--max-new-tokens", "6")]
    if model != "tiny-qwen2-vl":   # the fixed layout takes 168x168 frames only: the square folders
        cases.append(("--video", frame_folders["scene"], "--prompt", "Describe the motion.", "--max-new-tokens", "6",
                      "--temperature", "0.8", "--top-k", "20", "--seed", "7"))
        cases.append(("--image", pictures["square.png"], "--video", frame_folders["mixed"], "--prompt", "Compare.",
                      "--max-new-tokens", "5"))
    else:
        cases.append(("--video", frame_folders["three"], "--prompt", "Describe.", "--max-new-tokens", "6",
                      "--temperature", "0.7", "--seed", "3"))
    if model.startswith("user"):   # 20 of 21 frames sampled: 1.05 s per temporal patch
        cases.append(("--video", frame_folders["many"], "--prompt", "Count the frames.", "--max-new-tokens", "4"))
    for args in cases:
        py = _python_run_json(bundle, *args)["rows"][0]
        proc = fastv_run(runtime_build, "--bundle", bundle, *args, "--json", "--executor", "cpu")
        assert proc.returncode == 0, proc.stderr[-3000:]
        cpp = json.loads(proc.stdout.strip().splitlines()[-1])["rows"][0]
        for key in ("tokens", "text", "finish_reason", "prompt_tokens", "kept_positions"):
            assert cpp[key] == py[key], (args, key, cpp, py)


#: video processor settings over the user-style checkpoint's (frame sampling by count and bounds, the temporal patch,
#: the frames' pixel bounds and resampling filter)
VIDEO_CONFIG_VARIANTS = [
    {"max_frames": 6},
    {"num_frames": 5},
    {"num_frames": 7},
    {"num_frames": 40},                                   # more than the folder holds: refused
    {"do_sample_frames": False},
    {"fps": 3.0, "min_frames": 30},
    {"temporal_patch_size": 3, "max_frames": 9},
    {"size": {"shortest_edge": 28 * 28 * 8, "longest_edge": 28 * 28 * 8}, "resample": 2},
    {"size": None, "min_pixels": 28 * 28 * 2},            # no size of its own: the image processor's
]


@pytest.mark.slow
def test_video_sampling_variants_equal_the_python_front_end(runtime_build, user_bundle, frame_folders, tmp_path):
    """The user-style Qwen2.5-VL bundle with its video_preprocessor_config.json changed (VIDEO_CONFIG_VARIANTS): the
    frames kept, their size and layout (--dry-run ids and pixel sha256) equal the Python front end's, refusals too."""
    import shutil

    source = user_bundle("qwen2_5_vl")
    compared = 0
    for i, change in enumerate(VIDEO_CONFIG_VARIANTS):
        bundle = tmp_path / f"bundle{i}"
        shutil.copytree(source, bundle)
        path = bundle / "video_preprocessor_config.json"
        config = json.loads(path.read_text())
        for key, value in change.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config, indent=2))
        manifest = json.loads((bundle / "manifest.json").read_text())
        data = path.read_bytes()
        manifest["files"][path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for name in ("many", "scene", "three"):
            request = {"messages": [{"role": "user", "content": [{"type": "video", "video": str(frame_folders[name])},
                                                                 {"type": "text", "text": "What happens?"}]}]}
            compared += compare_dry_run(runtime_build, bundle, [(request, False)], tmp_path / f"r{i}-{name}")
    assert compared >= 20


@pytest.mark.slow
def test_video_dry_run_under_sanitizers(runtime_sanitize_build, user_bundle, pictures, frame_folders, tmp_path):
    """The AddressSanitizer + UBSan build (no cpu executor): folders of frames and bad ones through --dry-run on the
    user-style Qwen2.5-VL bundle give the Python front end's ids and pixels or one line, with no sanitizer report."""
    bundle = user_bundle("qwen2_5_vl")
    image = sorted(p for name, p in pictures.items() if name.startswith("user/"))[0]
    n = 0
    for name in ("three", "mixed", "many", "jpeg"):
        n += compare_dry_run(runtime_sanitize_build, bundle, _video_conversations(frame_folders[name], image)[:3],
                              tmp_path / name)
    assert n >= 9
    for name in ("empty", "junk", "cut", "one"):
        proc = fastv_run(runtime_sanitize_build, "--bundle", bundle, "--video", frame_folders[name], "--prompt", "x",
                         "--dry-run")
        assert proc.returncode == 1 and "Sanitizer" not in proc.stderr, proc.stderr[-2000:]
        fail_line(proc)


@pytest.mark.slow
def test_video_batch_equals_fastv_export_run(runtime_build, exported_bundle, frame_folders, tmp_path):
    """A left-padded batch of two video requests (tiny-qwen2.5-vl, cpu executor): each row's tokens, text and kept
    positions equal `fastv-export run --request`'s (the seconds per temporal patch and grids of every row)."""
    bundle = exported_bundle("tiny-qwen2.5-vl")
    video = str(frame_folders["four"])
    requests = [{"messages": [{"role": "user", "content": [{"type": "video", "video": video},
                                                           {"type": "text", "text": text}]}], "max_tokens": 6}
                for text in ("What happens?", "Describe the colours of every frame in one short sentence.")]
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(requests))
    py = _python_run_json(bundle, "--request", path)["rows"]
    proc = fastv_run(runtime_build, "--bundle", bundle, "--request", path, "--json", "--executor", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpp = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert len(cpp) == len(py) == 2
    for c, p in zip(cpp, py):
        for key in ("tokens", "text", "finish_reason", "prompt_tokens", "kept_positions"):
            assert c[key] == p[key], (key, c, p)
