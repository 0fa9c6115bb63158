"""The C++ runtime (runtime/: fastv_runtime + fastv-run), built once per session by scripts/build_runtime.sh.

Acceptance: fastv-run's cpu executor (the real exported ONNX graphs in ONNX Runtime, driven by the C++
generation loop) generates the PyTorch reference's greedy tokens and keeps the reference's positions
(batch 1) over the validation's cover of preset x K x R x ranking for every family it serves (the full
matrix: scripts/validate_matrix.py --runtime). Bad inputs
are refused with one line on stderr and a non-zero exit. The TensorRT executor is compiled against
the TensorRT headers but runs only on a GPU with TensorRT 10 (not in CI): its checks that come before
any GPU work are tested here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fastv_export.bundle import MANIFEST, SCHEMA_VERSION
from fastv_export.config import FastVConfig
from fastv_export.graphs import op
from fastv_export.prompts import make_prompt
from fastv_export.runtime.dump import dump_inputs, load_inputs
from fastv_export.runtime.generate import find_candidates, generate
from fastv_export.validate import _images, _reference
from tests.helpers import CPP_FAMILIES, PAIRWISE, PAIRWISE_NEW, fastv_run_error

STEPS = 16


def run_cpp(exe: Path, bundle: Path, inputs: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), "--bundle", str(bundle), "--inputs", str(inputs), *extra],
                          capture_output=True, text=True, timeout=300)


def cpp_json(exe: Path, bundle: Path, inputs: Path, steps: int = STEPS, executor: str = "cpu") -> dict:
    proc = run_cpp(exe, bundle, inputs, "--max-new-tokens", str(steps), "--executor", executor, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def dump_prompt(adapter, out: Path, text_lengths=12, num_images: int = 1):
    prompt = make_prompt(adapter, text_lengths=text_lengths, num_images=num_images)
    ids, mask = prompt.input_ids.numpy(), prompt.attention_mask.numpy()
    images = _images(prompt, adapter)
    dump_inputs(out, ids, mask, images, find_candidates(ids, adapter.image_token_ids()))
    return prompt, images


fail_line = fastv_run_error


# -------------------------------------------------------------------------------------------- acceptance
# the validation's cover (its bundles, exported once per run), for every family fastv-run serves: DeepStack
# with K inside and after it; the full matrix: scripts/validate_matrix.py --runtime build/runtime/fastv-run
MATRIX = [case for case in PAIRWISE + PAIRWISE_NEW if case[0] in CPP_FAMILIES]


@pytest.mark.slow
@pytest.mark.parametrize("model,k,ratio,ranking", MATRIX,
                         ids=[f"{m}-k{k}-r{r.replace('/', '_')}-{rk}" for m, k, r, rk in MATRIX])
def test_tokens_and_kept_positions_equal_the_reference(runtime_build, exported_bundle, model_and_adapter, tmp_path,
                                                       model, k, ratio, ranking):
    bundle = exported_bundle(model, k, ratio, ranking)
    hf, adapter = model_and_adapter(model)
    prompt, _ = dump_prompt(adapter, tmp_path / "in")
    out = cpp_json(runtime_build, bundle, tmp_path / "in")
    ref_tokens, _, ref_kept, _, _ = _reference(hf, FastVConfig(k=k, ratio=ratio, ranking=ranking), prompt, STEPS)
    want = ref_tokens[0].tolist()
    eos = hf.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos in want:                                  # fastv-run stops at EOS; the reference ran on
        want = want[:want.index(eos) + 1]
    assert out["tokens"] == [want]
    n = prompt.input_ids.shape[1]
    # R = 0 drops nothing: the reference runs the unmodified model (no selection recorded), the graphs keep all n
    assert out["kept_positions"] == ([list(range(n))] if ref_kept is None else ref_kept.tolist())
    assert set(out["timings_ms"]) >= {"vision", "embed", "pre_k", "post_k", "prefill", "decode_per_token"}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_left_padded_batch_equals_the_python_loop(runtime_build, exported_bundle, model_and_adapter, tmp_path, model):
    """Batch 2, left-padded: the C++ loop generates what the Python loop does on the same graphs (Qwen2.5-VL:
    fastv-run computes the patch_grid vision feeds itself)."""
    from fastv_export.bundle import load_bundle
    from fastv_export.runtime.ort import OrtRunner

    bundle = exported_bundle(model)
    _, adapter = model_and_adapter(model)
    prompt, images = dump_prompt(adapter, tmp_path / "in", text_lengths=[12, 5])
    out = cpp_json(runtime_build, bundle, tmp_path / "in", steps=8)
    b = load_bundle(bundle)
    gen = generate(OrtRunner(b), prompt.input_ids.numpy(), prompt.attention_mask.numpy(), images, 8,
                   eos_token_id=b.eos_token_id)
    assert out["tokens"] == gen.tokens.tolist()
    assert out["kept_positions"] == gen.kept.tolist()


@pytest.mark.slow
def test_patch_grid_images_of_their_own_grid_equal_python(runtime_build, exported_bundle, tmp_path):
    """Qwen2.5-VL (patch_grid): images the processor resizes to other grids than the exported one, a batch row
    with a wide and a tall one. fastv-run computes each image's vision feeds and M-RoPE positions from its own
    grid: from Python's dumped inputs (`media_grid_thw`) and from the picture files through its own front end,
    the tokens and kept positions equal `fastv-export run`'s."""
    from PIL import Image

    bundle = exported_bundle("tiny-qwen2.5-vl")
    rng = np.random.RandomState(4)
    files = []
    for name, (w, h) in {"wide.png": (200, 90), "tall.png": (60, 150)}.items():
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(tmp_path / name)
        files += ["--image", str(tmp_path / name)]
    args = [*files, "--prompt", "Compare the two pictures.", "--max-new-tokens", "6", "--json"]
    proc = subprocess.run(["fastv-export", "run", str(bundle), *args, "--dump-inputs", str(tmp_path / "in")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    py = json.loads(proc.stdout)["rows"][0]
    grids = load_inputs(tmp_path / "in")["media_grid_thw"].tolist()
    exported = json.loads((bundle / MANIFEST).read_text())["image_tokens"]["grid_thw"]
    assert len(grids) == 2 and all(g[1:] != exported[1:] for g in grids), (grids, exported)
    dumped = cpp_json(runtime_build, bundle, tmp_path / "in", steps=6)
    assert dumped["tokens"] == [py["tokens"]] and dumped["kept_positions"] == [py["kept_positions"]]
    own = subprocess.run([str(runtime_build), "--bundle", str(bundle), "--executor", "cpu", *args],
                         capture_output=True, text=True)
    assert own.returncode == 0, own.stderr
    row = json.loads(own.stdout)["rows"][0]
    assert row["tokens"] == py["tokens"] and row["kept_positions"] == py["kept_positions"]


@pytest.mark.slow
def test_dump_inputs_round_trip_and_cli(exported_bundle, tmp_path):
    """`fastv-export run ... --dump-inputs DIR` writes what it feeds, in the documented format."""
    from PIL import Image

    bundle = exported_bundle("tiny-llava")
    png = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype("uint8")).save(png)
    proc = subprocess.run(["fastv-export", "run", str(bundle), "--image", str(png), "--raw", "--prompt",
                           "USER: <image> hi", "--max-new-tokens", "2", "--dump-inputs", str(tmp_path / "in")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "in" / "inputs.json").read_text())
    assert meta["format"] == "fastv-inputs" and meta["version"] == 1 and meta["num_images"] == 1
    t = load_inputs(tmp_path / "in")
    assert t["input_ids"].dtype == np.int64 and t["input_ids"].shape == t["attention_mask"].shape
    assert t["pixel_values.0"].shape == (1, 3, 56, 56) and t["pixel_values.0"].dtype == np.float32
    assert t["candidate_positions"].shape == (1, 64)


@pytest.mark.slow
def test_cpp_unit_tests_and_help(runtime_build):
    build_dir = runtime_build.parent
    proc = subprocess.run([str(build_dir / "fastv_runtime_tests")], capture_output=True, text=True)
    assert proc.returncode == 0 and " 0 failed" in proc.stdout, proc.stdout + proc.stderr
    assert "--executor trt|cpu" in subprocess.run([str(runtime_build), "--help"], capture_output=True, text=True).stdout


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def good(exported_bundle, model_and_adapter, tmp_path) -> tuple[Path, Path]:
    """A writable copy of a tiny-llava bundle and inputs for it."""
    dst = tmp_path / "bundle"
    shutil.copytree(exported_bundle("tiny-llava"), dst)
    _, adapter = model_and_adapter("tiny-llava")
    dump_prompt(adapter, tmp_path / "in")
    return dst, tmp_path / "in"


def _edit_manifest(bundle: Path, change) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    (bundle / MANIFEST).write_text(json.dumps(m, indent=2))


@pytest.mark.slow
def test_bad_bundles_are_refused_with_one_line(runtime_build, good, tmp_path):
    bundle, inputs = good
    assert run_cpp(runtime_build, bundle, inputs, "--executor", "cpu", "--max-new-tokens", "2").returncode == 0

    line = fail_line(run_cpp(runtime_build, tmp_path / "nowhere", inputs))
    assert "is not a bundle directory" in line

    (bundle / "post_k.onnx").rename(tmp_path / "post_k.onnx")
    line = fail_line(run_cpp(runtime_build, bundle, inputs))
    assert "post_k.onnx is missing" in line and "field 'files'" in line
    (tmp_path / "post_k.onnx").rename(bundle / "post_k.onnx")

    data = bytearray((bundle / "embed.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "embed.onnx").write_bytes(bytes(data))
    line = fail_line(run_cpp(runtime_build, bundle, inputs))
    assert "embed.onnx: sha256 does not match manifest.json field 'files.embed.onnx.sha256'" in line
    data[-1] ^= 0xFF
    (bundle / "embed.onnx").write_bytes(bytes(data))

    (bundle / "vision.onnx").write_bytes((bundle / "vision.onnx").read_bytes() + b"x")
    line = fail_line(run_cpp(runtime_build, bundle, inputs))
    assert "vision.onnx has" in line and "'files.vision.onnx.bytes'" in line
    (bundle / "vision.onnx").write_bytes((bundle / "vision.onnx").read_bytes()[:-1])

    _edit_manifest(bundle, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    line = fail_line(run_cpp(runtime_build, bundle, inputs))
    assert f"field 'schema_version' is {SCHEMA_VERSION + 1}, this runtime reads {SCHEMA_VERSION}" in line
    _edit_manifest(bundle, lambda m: m.update(schema_version=SCHEMA_VERSION))

    _edit_manifest(bundle, lambda m: m.pop("kv_cache"))
    line = fail_line(run_cpp(runtime_build, bundle, inputs))
    assert "required field 'kv_cache' is missing" in line

    (bundle / MANIFEST).write_text("{ not json")
    assert "is not valid JSON" in fail_line(run_cpp(runtime_build, bundle, inputs))
    (bundle / MANIFEST).unlink()
    line = fail_line(run_cpp(runtime_build, bundle, inputs))
    assert "manifest.json is missing" in line


@pytest.mark.slow
def test_bad_inputs_are_refused_with_one_line(runtime_build, good, tmp_path):
    bundle, inputs = good
    t = load_inputs(inputs)

    def redump(name, **tensors):
        d = tmp_path / name
        args = dict(input_ids=t["input_ids"], attention_mask=t["attention_mask"], images=[t["pixel_values.0"]],
                    candidates=t["candidate_positions"])
        args.update(tensors)
        dump_inputs(d, **args)
        return d

    line = fail_line(run_cpp(runtime_build, bundle, redump("px", images=[np.zeros((1, 3, 28, 28), np.float32)])))
    assert "'pixel_values.0' has shape [1, 3, 28, 28], the bundle's vision graph takes [1, 3, 56, 56]" in line
    line = fail_line(run_cpp(runtime_build, bundle, redump("mask", attention_mask=t["attention_mask"][:, 1:])))
    assert "'attention_mask' must be int64" in line
    line = fail_line(run_cpp(runtime_build, bundle, redump("imgs", images=[])))
    assert "'input_ids' holds 64 image tokens, but 0 image(s)" in line
    line = fail_line(run_cpp(runtime_build, bundle, redump("cands", candidates=t["candidate_positions"] + 1)))
    assert "'candidate_positions'" in line
    d = redump("short")
    (d / "input_ids.bin").write_bytes((d / "input_ids.bin").read_bytes()[:-8])
    line = fail_line(run_cpp(runtime_build, bundle, d))
    assert "input_ids.bin has" in line and "int64 [1," in line
    line = fail_line(run_cpp(runtime_build, bundle, tmp_path / "nothing"))
    assert "inputs.json is missing" in line
    bad = run_cpp(runtime_build, bundle, inputs, "--executor", "gpu")
    assert bad.returncode == 2 and "--executor must be trt or cpu" in bad.stderr


@pytest.mark.slow
def test_engine_bundle_checks_come_before_any_gpu_work(runtime_build, good, plugin_library, tmp_path):
    """--executor trt on a bundle with engines (built here ahead of time with the plugin): a missing plugin
    library, a missing engine and engines for another backend are refused with one line, on a machine
    with neither a GPU nor TensorRT 10."""
    from fastv_export.engines.build import BuildOptions, build_engines

    bundle, inputs = good
    build_engines(bundle, BuildOptions(backend="tensorrt-rtx", plugin_library=str(plugin_library)))

    def variant(name):
        dst = tmp_path / name
        shutil.copytree(bundle, dst)
        return dst

    # the plugin library deleted: the file check names it
    b = variant("plugin-deleted")
    (b / op.PLUGIN_LIBRARY).unlink()
    line = fail_line(run_cpp(runtime_build, b, inputs, "--executor", "trt"))
    assert f"{op.PLUGIN_LIBRARY} is missing (listed in manifest.json field 'files')" in line
    # ... and dropped from 'files' as well: the manifest check names it (as the Python loader does: engines.plugin
    # is set without the library in 'files'), before the backend, before any GPU work
    _edit_manifest(b, lambda m: m["files"].pop(op.PLUGIN_LIBRARY))
    line = fail_line(run_cpp(runtime_build, b, inputs, "--executor", "trt"))
    assert f"field 'engines.plugin': is set but 'files' does not list {op.PLUGIN_LIBRARY}" in line
    # a missing engine
    b = variant("engine-deleted")
    (b / "pre_k.engine").unlink()
    line = fail_line(run_cpp(runtime_build, b, inputs, "--executor", "trt"))
    assert "pre_k.engine is missing (listed in manifest.json field 'files'); rebuild the engines" in line
    # TensorRT-RTX engines are not TensorRT 10 engines
    line = fail_line(run_cpp(runtime_build, bundle, inputs, "--executor", "trt"))
    assert "field 'engines.backend' is 'tensorrt-rtx'" in line
    # the cpu executor still runs the ONNX graphs of a bundle with engines
    assert run_cpp(runtime_build, bundle, inputs, "--executor", "cpu", "--max-new-tokens", "2").returncode == 0


@pytest.mark.slow
def test_trt_on_a_bundle_without_engines(runtime_build, good):
    bundle, inputs = good
    line = fail_line(run_cpp(runtime_build, bundle, inputs, "--executor", "trt"))
    assert "records no engines" in line


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_video_prompts_equal_the_python_loop(runtime_build, exported_bundle, model_and_adapter, tmp_path, model):
    """Videos of the exported frame size (one vision call per temporal patch) beside an image, batch 2:
    fastv-run computes the video positions itself (Qwen2.5-VL: the temporal index scaled by time, from the
    dumped video_seconds; Qwen3-VL: one block per temporal patch between timestamp tokens, with DeepStack)
    and generates what the Python loop does; without video_seconds a timed bundle refuses the prompt with
    one line."""
    from fastv_export.adapters import Media
    from fastv_export.bundle import load_bundle
    from fastv_export.runtime.ort import OrtRunner
    from fastv_export.validate import _video_seconds

    bundle = exported_bundle(model, 2, "1/2")
    _, adapter = model_and_adapter(model)
    prompt = make_prompt(adapter, [6, 3], media=[Media("video", frames=8, fps=1.0), Media("image"),
                                                Media("video", frames=4, fps=3.0)])
    ids, mask = prompt.input_ids.numpy(), prompt.attention_mask.numpy()
    images, seconds = _images(prompt, adapter), _video_seconds(prompt)
    dump_inputs(tmp_path / "in", ids, mask, images, find_candidates(ids, adapter.image_token_ids()), seconds)
    out = cpp_json(runtime_build, bundle, tmp_path / "in", steps=8)
    b = load_bundle(bundle)
    gen = generate(OrtRunner(b), ids, mask, images, 8, eos_token_id=b.eos_token_id, video_seconds=seconds,
                   media=prompt.media)
    assert out["tokens"] == gen.tokens.tolist()
    assert out["kept_positions"] == gen.kept.tolist()
    if seconds is not None:
        dump_inputs(tmp_path / "no_seconds", ids, mask, images, find_candidates(ids, adapter.image_token_ids()))
        line = fail_line(run_cpp(runtime_build, bundle, tmp_path / "no_seconds"))
        assert "more videos than 'video_seconds'" in line


@pytest.mark.slow
def test_tiles_layout_bundles_are_refused_with_one_line(runtime_build, exported_bundle, model_and_adapter, tmp_path):
    """fastv-run does not compute LLaVA-OneVision's anyres pack index: its bundles are refused on load."""
    bundle = exported_bundle("tiny-llava-onevision", 2, "1/2")
    _, adapter = model_and_adapter("tiny-llava-onevision")
    prompt = make_prompt(adapter, [6], num_images=1)
    ids = prompt.input_ids.numpy()
    dump_inputs(tmp_path / "in", ids, prompt.attention_mask.numpy(), _images(prompt, adapter),
                find_candidates(ids, adapter.image_token_ids()))
    line = fail_line(run_cpp(runtime_build, bundle, tmp_path / "in"))
    assert "'image_tokens.vision_layout.kind' is \"tiles\"" in line and "Python runtime" in line


@pytest.mark.slow
def test_patch_grid_merge_sizes_must_agree(runtime_build, exported_bundle, tmp_path):
    """The vision feeds (image_tokens.vision_layout) and the positions (positions.spatial_merge_size) of a
    patch_grid bundle follow one merge size: a manifest giving two is refused by both loaders, naming the field."""
    from fastv_export.bundle import load_bundle
    from fastv_export.errors import FastVError

    dst = tmp_path / "bundle"
    shutil.copytree(exported_bundle("tiny-qwen2.5-vl"), dst)
    m = json.loads((dst / MANIFEST).read_text())
    m["image_tokens"]["vision_layout"]["spatial_merge_size"] = 1
    (dst / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FastVError, match=r"image_tokens\.vision_layout\.spatial_merge_size.*is 1, "
                                         r"positions\.spatial_merge_size says 2"):
        load_bundle(dst)
    line = fail_line(subprocess.run([str(runtime_build), "--bundle", str(dst), "--check"], capture_output=True,
                                    text=True))
    assert "image_tokens.vision_layout.spatial_merge_size" in line and "says 2" in line, line
