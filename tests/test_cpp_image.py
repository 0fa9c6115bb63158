"""The C++ image path (runtime/src/image.cpp, preprocess.cpp; the tool fastv-preprocess) against the Python front end.

The reference is what the front end computes for an image file (fastv_export.frontend.processor: the image
processor class its loader builds from the config, fed ``Image.open(path).convert("RGB")``); the C++ side reads
the same file with libpng / libjpeg-turbo and runs its own image processor. Compared:

- the decoded RGB bytes (C++ ``read_image`` vs PIL's ``convert("RGB")``), every PNG mode the families meet;
- the resized uint8 image, before crop / rescale / normalize (captured from the Python processor's own resize):
  Pillow's resampling on uint8 is integer arithmetic, so the bytes must be equal;
- the pixel values (max abs difference <= 1e-5; float32 arithmetic in numpy's order makes it 0), shapes,
  Qwen2-VL grids and token counts;
over >= 50 sizes and aspect ratios per processor: CLIP as the user checkpoints configure it (shortest edge 128,
crop 112, mean/std 0.5, bilinear), CLIP's defaults (bicubic 224), Qwen2-VL with non-default min/max pixels
(legacy keys, patch 14) and in transformers 5's form (size dict, patch 16, mean/std 0.5); each other Pillow
filter on fewer sizes. JPEG: the two decoders (Debian's libjpeg-turbo in C++, the one in Pillow's wheel) are
compared byte for byte. Corrupt, truncated, huge and non-image files: one line and exit code 1, never a crash.
"""
from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastv_export.frontend.processor import _load_image_processor

TOL = 1e-5

CLIP_USER = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 128},
             "crop_size": {"height": 112, "width": 112}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
             "resample": 2, "do_center_crop": True}
CLIP_DEFAULT = {"image_processor_type": "CLIPImageProcessor"}
QWEN_LEGACY = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 96,
               "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
QWEN_V5 = {"image_processor_type": "Qwen2VLImageProcessorFast", "size": {"shortest_edge": 32 * 32 * 2,
           "longest_edge": 32 * 32 * 80}, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
FAMILIES = {"clip-user": CLIP_USER, "clip-default": CLIP_DEFAULT, "qwen-legacy": QWEN_LEGACY, "qwen-v5": QWEN_V5}

#: sizes (width, height): the corner cases, then seeded random sizes over aspect ratios from 1:60 to 60:1
FIXED_SIZES = [(1, 1), (1, 7), (7, 1), (2, 3), (13, 200), (200, 13), (111, 112), (112, 112), (113, 111),
               (128, 128), (127, 129), (224, 224), (225, 223), (448, 112), (56, 56), (57, 55), (640, 480),
               (480, 640), (999, 751), (28, 560), (3, 3), (256, 96)]


def random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        area = float(np.exp(rng.uniform(np.log(16), np.log(700_000))))
        ratio = float(np.exp(rng.uniform(np.log(1 / 60), np.log(60))))
        w, h = max(1, round(np.sqrt(area * ratio))), max(1, round(np.sqrt(area / ratio)))
        if w <= 1400 and h <= 1400:
            out.append((w, h))
    return out


SIZES = FIXED_SIZES + random_sizes(40, seed=21)


def pattern(w: int, h: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients, a sine, hard edges and noise: every filter tap and the clipping of overshoot matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * 255 // max(w - 1, 1) + y * 7) % 256,
              np.where(((x // 3) + (y // 5)) % 2 == 0, 250, 5) ^ rng.integers(0, 32, (h, w)),
              (np.sin(x / 4.0 + y / 9.0) * 127 + 128).astype(np.int64),
              rng.integers(0, 256, (h, w))]
    return np.stack(planes[:channels], axis=-1).astype(np.uint8)


def png_bytes(rows: np.ndarray, color_type: int, bit_depth: int, extra: bytes = b"") -> bytes:
    """A PNG written here (PIL cannot write 16-bit RGB): filter 0 rows, one IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = rows.shape[:2]
    raw = rows.astype(">u2" if bit_depth == 16 else np.uint8).reshape(h, -1).tobytes()
    stride = len(raw) // h
    data = b"".join(b"\0" + raw[i * stride:(i + 1) * stride] for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(data))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def tool(runtime_build) -> Path:
    exe = runtime_build.parent / "fastv-preprocess"
    assert exe.is_file(), f"{exe} was not built"
    return exe


def run_tool(tool: Path, out: Path, images: list[Path], config: dict | None = None,
             directory: Path | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    args = [str(tool), "--out", str(out)]
    if directory is not None:
        args += ["--dir", str(directory)]
    elif config is not None:
        path = out.parent / f"{out.name}.config.json"
        path.write_text(json.dumps(config))
        args += ["--config", str(path)]
    else:
        args += ["--decode-only"]
    proc = subprocess.run(args + [str(p) for p in images], capture_output=True, text=True, timeout=600)
    index = json.loads((out / "index.json").read_text())["images"] if proc.returncode == 0 else []
    return proc, index


def cpp_array(out: Path, i: int, kind: str, shape) -> np.ndarray:
    dtype = np.float32 if kind == "pixels" else np.uint8
    return np.fromfile(out / f"{i}.{kind}.bin", dtype=dtype).reshape(shape)


def refused(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a refused run: exit code 1 (not a signal), nothing else printed."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastv-preprocess: error: "), proc.stderr[-2000:]
    return lines[0]


def python_processor(config: dict, tmp_path: Path):
    """The front end's image processor for ``config`` (its own loader), with its resize output recorded."""
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "preprocessor_config.json").write_text(json.dumps(config))
    ip = _load_image_processor(d, None, None, {})
    resized: list[np.ndarray] = []
    resize = ip.resize

    def spy(*args, **kwargs):
        out = resize(*args, **kwargs)
        resized.append(np.asarray(out).transpose(1, 2, 0))   # (C, H, W) -> (H, W, C)
        return out

    ip.resize = spy
    return ip, resized


def python_pixels(ip, resized: list, path: Path) -> tuple[dict, np.ndarray | None]:
    """What Frontend.process_image feeds the processor and what comes out."""
    resized.clear()
    with Image.open(path) as im:
        image = im.convert("RGB")
    out = ip(images=image, return_tensors="np")
    return dict(out), (resized[0] if resized else None)


def compare(tool: Path, config: dict, paths: list[Path], tmp_path: Path, name: str) -> dict:
    """Run both sides over ``paths``; assert equality; return the measured maxima."""
    proc, index = run_tool(tool, tmp_path / f"out-{name}", paths, config)
    assert proc.returncode == 0, proc.stderr
    ip, resized = python_processor(config, tmp_path)
    worst_px, worst_resized = 0.0, 0
    for i, (path, rec) in enumerate(zip(paths, index)):
        want, want_resized = python_pixels(ip, resized, path)
        px = want["pixel_values"]
        assert list(px.shape) == rec["shape"], (path.name, px.shape, rec["shape"])
        got = cpp_array(tmp_path / f"out-{name}", i, "pixels", rec["shape"])
        if "image_grid_thw" in want:
            assert want["image_grid_thw"][0].tolist() == rec["grid_thw"], path.name
            t, gh, gw = rec["grid_thw"]
            merge = int(config.get("merge_size", 2))
            assert rec["tokens"] == t * gh * gw // merge ** 2
        if want_resized is not None:
            got_resized = cpp_array(tmp_path / f"out-{name}", i, "resized", (*rec["resized"], 3))
            assert got_resized.shape == want_resized.shape, (path.name, got_resized.shape, want_resized.shape)
            diff = np.abs(got_resized.astype(int) - want_resized.astype(int))
            worst_resized = max(worst_resized, int(diff.max()))
            assert diff.max() == 0, f"{name} {path.name}: resized bytes differ at {np.argwhere(diff)[:3].tolist()}"
        err = float(np.abs(got.astype(np.float64) - px.astype(np.float64)).max())
        worst_px = max(worst_px, err)
        assert err <= TOL, f"{name} {path.name}: pixel values differ by {err}"
    return {"images": len(paths), "max_abs_pixels": worst_px, "max_abs_resized": worst_resized}


@pytest.fixture(scope="module")
def png_files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("png")
    paths = []
    for i, (w, h) in enumerate(SIZES):
        p = d / f"{i:03d}-{w}x{h}.png"
        Image.fromarray(pattern(w, h, seed=i)).save(p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------- PNG: exact
@pytest.mark.parametrize("family", list(FAMILIES))
def test_png_pixels_equal_the_front_end(tool, png_files, tmp_path, family):
    config = FAMILIES[family]
    paths = png_files
    if family.startswith("qwen"):
        paths = [p for p in png_files if max(Image.open(p).size) / min(Image.open(p).size) <= 200]
    assert len(paths) >= 50
    stats = compare(tool, config, paths, tmp_path, family)
    assert stats["max_abs_pixels"] == 0.0, stats   # float32 in numpy's order: bit for bit


@pytest.mark.parametrize("resample", [0, 1, 3, 4, 5])
def test_every_pillow_filter(tool, png_files, tmp_path, resample):
    """Each filter (nearest, lanczos, bicubic, box, hamming) down and up, through a fixed-size CLIP resize and a
    shortest-edge one (bilinear is the user CLIP config above)."""
    paths = png_files[::3]
    fixed = {"image_processor_type": "CLIPImageProcessor", "size": {"height": 96, "width": 160}, "resample": resample,
             "do_center_crop": False}
    compare(tool, fixed, paths, tmp_path, f"fixed-{resample}")
    short = {**CLIP_USER, "resample": resample, "size": {"shortest_edge": 300}, "crop_size": {"height": 320,
                                                                                                "width": 200}}
    compare(tool, short, paths, tmp_path, f"short-{resample}")


def test_clip_size_forms_and_processor_config(tool, png_files, tmp_path):
    """An old config's int size / crop, shortest + longest edge, no normalize / rescale, and the image processor
    nested in processor_config.json (transformers 5's layout)."""
    paths = png_files[:20]
    compare(tool, {"image_processor_type": "CLIPImageProcessorFast", "size": 100, "crop_size": 90, "resample": 3},
            paths, tmp_path, "int")
    compare(tool, {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 64, "longest_edge": 150},
                   "do_center_crop": False}, paths, tmp_path, "longest")
    compare(tool, {"image_processor_type": "CLIPImageProcessor", "do_normalize": False, "rescale_factor": 0.5},
            paths, tmp_path, "no-normalize")
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "processor_config.json").write_text(json.dumps({"image_processor": CLIP_USER, "processor_class": "X"}))
    proc, index = run_tool(tool, tmp_path / "nested", paths[:3], directory=d)
    assert proc.returncode == 0, proc.stderr
    assert index[0]["shape"] == [1, 3, 112, 112]


# ---------------------------------------------------------------------------------------------- PNG modes
def mode_files(d: Path) -> list[Path]:
    """The PNG colour types and depths: PIL-written (L, LA, P, P + one transparent entry, P + alpha table, RGBA,
    1-bit, L / RGB / P with a tRNS colour key, I;16) and hand-written 16-bit RGB / RGBA / LA."""
    w, h = 37, 23
    rgb = pattern(w, h, seed=1)
    rgba = pattern(w, h, seed=2, channels=4)
    grey = rgb[..., 0]
    out = []

    def save(name: str, im: Image.Image, **kwargs) -> None:
        im.save(d / name, **kwargs)
        out.append(d / name)

    save("l.png", Image.fromarray(grey))
    save("la.png", Image.fromarray(rgba[..., :2], "LA"))
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    pal = Image.fromarray(rgb).quantize(colors=50)
    save("p.png", pal)
    save("p-key.png", pal, transparency=3)
    pa = Image.fromarray(rgba, "RGBA").quantize(colors=40, method=Image.Quantize.FASTOCTREE)
    save("p-alpha.png", pa)
    small = Image.fromarray(grey).quantize(colors=4)
    save("p-2bit.png", small, bits=2)
    save("one-bit.png", Image.fromarray(grey > 128))
    save("l-key.png", Image.fromarray(grey), transparency=int(grey[3, 3]))
    save("rgb-key.png", Image.fromarray(rgb), transparency=tuple(int(v) for v in rgb[5, 7]))
    save("i16.png", Image.fromarray((grey.astype(np.uint16) * 3)))
    for name, arr, ct in (("rgb16.png", rgb.astype(np.uint16) * 257 + 3, 2),
                          ("rgba16.png", rgba.astype(np.uint16) * 251, 6),
                          ("la16.png", rgba[..., :2].astype(np.uint16) * 199, 4)):
        (d / name).write_bytes(png_bytes(arr, ct, 16))
        out.append(d / name)
    return out


def test_png_modes_decode_as_pil_converts(tool, tmp_path):
    d = tmp_path / "modes"
    d.mkdir()
    paths = mode_files(d)
    proc, index = run_tool(tool, tmp_path / "dec", paths)
    assert proc.returncode == 0, proc.stderr
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            want = np.asarray(im.convert("RGB"))
        got = cpp_array(tmp_path / "dec", i, "decoded", (*index[i]["decoded"], 3))
        assert got.shape == want.shape and np.array_equal(got, want), f"{p.name} decodes differently"
    # through the processors too: the colour keys are composited onto white by convert_to_rgb
    for family in ("clip-user", "qwen-legacy"):
        compare(tool, FAMILIES[family], paths, tmp_path, f"modes-{family}")


# ---------------------------------------------------------------------------------------------- JPEG
def jpeg_files(d: Path) -> list[Path]:
    out = []
    for i, (w, h) in enumerate(SIZES[::2]):
        arr = pattern(w, h, seed=100 + i)
        kwargs = [dict(quality=90), dict(quality=75, subsampling=0), dict(quality=95, progressive=True),
                  dict(quality=60, subsampling=1)][i % 4]
        p = d / f"{i:03d}-{w}x{h}.jpg"
        Image.fromarray(arr).save(p, **kwargs)
        out.append(p)
    Image.fromarray(pattern(64, 48, seed=7)[..., 0]).save(d / "grey.jpg", quality=85)
    Image.fromarray(pattern(64, 48, seed=8, channels=4), "RGBA").convert("CMYK").save(d / "cmyk.jpg", quality=85)
    return out + [d / "grey.jpg", d / "cmyk.jpg"]


def test_jpeg_decoders_agree(tool, tmp_path):
    """libjpeg-turbo (Debian's, in C++) and Pillow's decoder: the measured difference is 0 (both are libjpeg-turbo
    with the default islow IDCT and fancy upsampling); the pixel values then equal the front end's."""
    d = tmp_path / "jpeg"
    d.mkdir()
    paths = jpeg_files(d)
    proc, index = run_tool(tool, tmp_path / "dec", paths)
    assert proc.returncode == 0, proc.stderr
    worst = 0
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            want = np.asarray(im.convert("RGB")).astype(int)
        got = cpp_array(tmp_path / "dec", i, "decoded", (*index[i]["decoded"], 3)).astype(int)
        worst = max(worst, int(np.abs(got - want).max()))
    assert worst == 0, f"JPEG decoders differ by up to {worst} (of 255)"
    for family in ("clip-user", "qwen-v5"):
        ok = [p for p in paths if family == "clip-user" or max(Image.open(p).size) / min(Image.open(p).size) <= 200]
        stats = compare(tool, FAMILIES[family], ok, tmp_path, f"jpeg-{family}")
        assert stats["max_abs_pixels"] <= TOL


# ---------------------------------------------------------------------------------------------- refusals
def corrupt_files(d: Path) -> dict[str, Path]:
    good_png = d / "good.png"
    Image.fromarray(pattern(40, 30, seed=3)).save(good_png)
    good_jpg = d / "good.jpg"
    Image.fromarray(pattern(40, 30, seed=4)).save(good_jpg, quality=90)
    png, jpg = good_png.read_bytes(), good_jpg.read_bytes()
    files = {}

    def put(name: str, data: bytes) -> None:
        (d / name).write_bytes(data)
        files[name] = d / name

    idat = png.index(b"IDAT")
    put("png-truncated-header.png", png[:20])
    put("png-truncated-idat.png", png[:idat + 40])
    put("png-no-idat-end.png", png[:len(png) - 30])
    put("png-bad-idat.png", png[:idat + 8] + bytes(b ^ 0x5A for b in png[idat + 8:idat + 60]) + png[idat + 60:])
    put("png-bad-ihdr.png", png[:16] + b"\xff\xff\xff\xff" + png[20:])
    put("png-huge.png", png_bytes(np.zeros((1, 1, 3), np.uint8), 2, 8)[:16] +
        struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0) +
        struct.pack(">I", zlib.crc32(b"IHDR" + struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))))
    put("jpg-truncated.jpg", jpg[:len(jpg) // 2])
    put("jpg-header-only.jpg", jpg[:30])
    sof = jpg.index(b"\xff\xc0")
    put("jpg-huge.jpg", jpg[:sof + 5] + struct.pack(">HH", 65000, 65000) + jpg[sof + 9:])
    put("jpg-bad-marker.jpg", jpg[:sof] + b"\xff\xc3\x00\x02" + jpg[sof + 4:])
    put("text.png", b"just some text, not an image\n" * 10)
    put("empty.jpg", b"")
    return files


def test_bad_files_are_refused_with_one_line(tool, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    files = corrupt_files(d)
    for name, path in files.items():
        proc, _ = run_tool(tool, tmp_path / f"o-{name}", [path], CLIP_USER)
        line = refused(proc)
        assert name in line or str(path) in line, line
        with pytest.raises(Exception):   # PIL refuses each of them too (nothing C++ accepts that Python does not)
            with Image.open(path) as im:
                im.convert("RGB")
    assert "over the 67108864-pixel limit" in refused(run_tool(tool, tmp_path / "h1", [files["png-huge.png"]])[0])
    assert "over the 67108864-pixel limit" in refused(run_tool(tool, tmp_path / "h2", [files["jpg-huge.jpg"]])[0])
    assert "not a PNG or JPEG" in refused(run_tool(tool, tmp_path / "t", [files["text.png"]])[0])


@pytest.fixture(scope="module")
def sanitized_tool(runtime_sanitize_build) -> Path:
    exe = runtime_sanitize_build.parent / "fastv-preprocess"
    assert exe.is_file(), f"{exe} was not built"
    return exe


@pytest.mark.parametrize("build", ["release", "asan+ubsan"])
def test_seeded_corruptions_never_crash(build, request, tmp_path):
    """200 seeded corruptions (bytes flipped, cut, chunks duplicated) of a PNG and a JPEG: each is decoded or
    refused with one line and exit code 1; no signal, no hang, and in the AddressSanitizer + UBSan build no
    sanitizer report (a report exits non-zero with more than one line)."""
    tool = request.getfixturevalue("tool" if build == "release" else "sanitized_tool")
    d = tmp_path / "fuzz"
    d.mkdir()
    good = corrupt_files(d)
    sources = [(d / "good.png").read_bytes(), (d / "good.jpg").read_bytes()]
    rng = np.random.default_rng(2121)
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(200):
        data = bytearray(sources[i % 2])
        kind = i % 4
        if kind == 0:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        elif kind == 1:
            data = data[:int(rng.integers(1, len(data)))]
        elif kind == 2:
            a, b = sorted(int(x) for x in rng.integers(0, len(data), 2))
            data = data[:b] + data[a:b] + data[b:]
        else:
            pos = int(rng.integers(8, 40))
            data[pos:pos + 4] = bytes(rng.integers(0, 256, 4).tolist())
        p = d / f"f{i}.{'png' if i % 2 == 0 else 'jpg'}"
        p.write_bytes(bytes(data))
        proc, _ = run_tool(tool, tmp_path / f"fo{i}", [p], QWEN_LEGACY)
        if proc.returncode == 0:
            outcomes["decoded"] += 1
        else:
            refused(proc)
            outcomes["refused"] += 1
    assert good and sum(outcomes.values()) == 200 and outcomes["refused"] > 0, outcomes


def test_unserved_processors_are_refused(tool, png_files, tmp_path):
    for config, needle in (({"image_processor_type": "LlavaOnevisionImageProcessor"}, "tiled images"),
                           ({"image_processor_type": "GotOcr2ImageProcessor"}, "tiled images"),
                           ({"image_processor_type": "SiglipImageProcessor"}, "not served"),
                           ({"image_processor_type": "CLIPImageProcessor", "resample": 7}, "resample"),
                           ({"size": {"shortest_edge": 10}}, "image_processor_type")):
        proc, _ = run_tool(tool, tmp_path / f"u{len(needle)}{needle[:3]}", png_files[:1], config)
        assert needle in refused(proc)
    # Qwen: an aspect ratio over 200 is refused as the processor refuses it
    p = tmp_path / "thin.png"
    Image.fromarray(pattern(300, 1, seed=0)).save(p)
    assert "aspect ratio over 200" in refused(run_tool(tool, tmp_path / "thin", [p], QWEN_LEGACY)[0])
    # no config in the directory
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "preprocessor_config.json" in refused(run_tool(tool, tmp_path / "e", png_files[:1], directory=empty)[0])
