"""fastv_export.validate: export -> ONNX Runtime -> validation against the PyTorch reference (issue 4
acceptance), an fp16 bundle within its stated tolerance, a perturbed weight caught, a borderline swap
reported and passed on the forced-selection rerun.

Exports take ~10-20 s each on 2 cores, so CI runs a pairwise cover of the acceptance matrix
(every preset, ranking, K in {1, 2, last} and R in {0, 1/2, 3/4, 9/10} appear); the full matrix
runs with scripts/validate_matrix.py."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from fastv_export import FastVConfig
from fastv_export.bundle import load_bundle
from fastv_export.cli import main as cli
from fastv_export.errors import FastVError
from fastv_export.validate import validate_bundle
from tests.helpers import NEW_FAMILIES, PAIRWISE, PAIRWISE_NEW, copy_bundle, rewrite_checksum


@pytest.mark.slow   # validates an exported bundle
@pytest.mark.parametrize("model,k,ratio,ranking", PAIRWISE + PAIRWISE_NEW)
def test_export_then_validate_passes(model, k, ratio, ranking, exported_bundle):
    path = exported_bundle(model, k, ratio, ranking)
    for name in ("vision.onnx", "embed.onnx", "pre_k.onnx", "post_k.onnx"):
        onnx.checker.check_model(str(path / name), full_check=True)
    report = validate_bundle(path, max_new_tokens=32, batch_sizes=(1, 2) if model in NEW_FAMILIES else (1, 3))
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]
    for case in report["cases"]:
        assert case["tokens_identical"] and case["max_logits_error"] <= 1e-4


@pytest.mark.slow   # validates an exported bundle
def test_fp16_export_validates_within_stated_tolerance(exported_bundle):
    path = exported_bundle("tiny-llava", 2, "1/2", "last", "fp16")
    report = validate_bundle(path, max_new_tokens=16, batch_sizes=(1,))
    assert report["precision"] == "fp16" and report["tolerances"]["logits"] == 1e-1
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]


@pytest.mark.slow   # validates an exported bundle
def test_a_perturbed_post_k_weight_fails_validation(exported_bundle, tmp_path):
    path = copy_bundle(exported_bundle("tiny-llava", 2, "1/2"), tmp_path)
    m = onnx.load(str(path / "post_k.onnx"))
    init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.05
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(path / "post_k.onnx"))
    rewrite_checksum(path, "post_k.onnx")          # a consistent bundle with one wrong weight
    report = validate_bundle(path, max_new_tokens=8, batch_sizes=(1,))
    assert not report["passed"]
    assert not report["cases"][0]["graphs"]["post_k"]["passed"]
    assert cli(["validate", str(path), "--max-new-tokens", "4", "--batch-sizes", "1"]) == 1


@pytest.mark.slow   # validates an exported bundle
def test_a_borderline_swap_is_reported_and_the_forced_selection_passes(exported_bundle, tmp_path, monkeypatch):
    """Ties constructed in the reference scores (zero key projection in layer K-1: uniform
    attention); the graphs are made to keep a different tied candidate. Validation must report the
    swap as borderline and pass on the forced-selection rerun."""
    from fastv_export.presets import build_preset
    from fastv_export.runtime.ort import OrtRunner
    from fastv_export.runtime.runner import Runner
    from fastv_export.validate import forced_selection

    path = exported_bundle("tiny-llava", 2, "1/2")
    model = build_preset("tiny-llava")
    layer = model.model.language_model.layers[1].self_attn
    with torch.no_grad():
        layer.k_proj.weight.zero_()
    monkeypatch.setattr("fastv_export.validate.load_model", lambda *a, **k: model)

    class SwappingRunner(Runner):
        """The ONNX Runtime graphs, except that a pruning pre_k keeps the (tied) candidate just
        after the cut-off instead of the last one before it."""
        name = "swapping"

        def __init__(self, bundle):
            super().__init__(bundle)
            self.inner = OrtRunner(bundle)

        def infer(self, graph, feeds):
            cands = feeds.get("candidate_positions")
            if graph != "pre_k" or cands is None or cands.shape[1] == 0:
                return self.inner.infer(graph, feeds)
            b, n = feeds["attention_mask"].shape
            m = cands.shape[1]
            keep = m - m // 2
            kept = np.sort(np.concatenate([np.setdiff1d(np.arange(n), cands[0]),
                                           cands[0, :keep - 1], cands[0, keep:keep + 1]]))[None]
            return forced_selection(np.repeat(kept, b, axis=0))(self.inner, feeds)

    # the graphs were exported from the unmodified weights: re-export pre_k from this model
    from fastv_export.export.onnx_export import export_graphs
    from fastv_export.adapters import get_adapter
    tmp = copy_bundle(path, tmp_path)
    eager = build_preset("tiny-llava", attn_implementation="eager")
    with torch.no_grad():
        eager.model.language_model.layers[1].self_attn.k_proj.weight.zero_()
    export_graphs(get_adapter(eager), FastVConfig(k=2, ratio="1/2"), torch.float32, tmp, 18)
    for f in ("vision.onnx", "embed.onnx", "pre_k.onnx", "post_k.onnx"):
        rewrite_checksum(tmp, f)
    report = validate_bundle(tmp, max_new_tokens=8, batch_sizes=(1,), runner=SwappingRunner(load_bundle(tmp)))
    case = report["cases"][0]
    assert not case["selection_identical"]
    assert {s["kept_by"] for s in case["borderline_swaps"]} == {"reference", "graphs"}
    assert case["forced_tokens_identical"] and case["forced_max_logits_error"] <= 1e-4
    assert report["passed"]


@pytest.mark.slow   # validates an exported bundle
@pytest.mark.parametrize("layout", ["two-image-sizes", "video"])
def test_qwen2_5_vl_media_prompts_validate_end_to_end(exported_bundle, layout):
    """Qwen2.5-VL (vision layout patch_grid): two images of different sizes (neither the exported one), or
    a video of 8 frames (4 temporal patches, time-scaled positions) of another size with an image beside it,
    batch 1 and 2: one vision call per image and per temporal patch with host-computed grid inputs, each
    medium's positions from its own grid; tokens and logits equal the reference, and the vision graph's
    features equal the HF model's own on each whole medium."""
    from fastv_export.adapters import Media

    media = {"two-image-sizes": [Media("image", (112, 224)), Media("image", (224, 168))],
             "video": [Media("video", (168, 112), frames=8, fps=1.0), Media("image")]}[layout]
    path = exported_bundle("tiny-qwen2.5-vl", 2, "1/2", "last")
    report = validate_bundle(path, max_new_tokens=16, batch_sizes=(1, 2), media=media)
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]
    tokens = {"two-image-sizes": 8 * 16 // 4 + 16 * 12 // 4, "video": 4 * 12 * 8 // 4 + 36}[layout]
    assert [c["image_tokens"] for c in report["cases"]] == [tokens] * 2


@pytest.mark.slow   # validates an exported bundle
@pytest.mark.parametrize("layout", ["two-image-sizes", "video"])
def test_llava_onevision_media_prompts_validate_end_to_end(exported_bundle, layout):
    """LLaVA-OneVision (vision layout tiles): two images of different sizes (5 and 3 anyres tiles, 88 and 52
    tokens with their newlines), or a video of 4 frames (pooled, one newline) with an image of a size off the
    pinpoints, batch 1 and 2: one vision call per image (its tiles) and per video (its frames), the rows of
    each picked by the host-computed pack index; tokens and logits equal the reference, and the vision
    graph's features equal the HF model's own packed features."""
    from fastv_export.adapters import Media

    media = {"two-image-sizes": [Media("image", (56, 56)), Media("image", (28, 56))],
             "video": [Media("video", frames=4), Media("image", (40, 30))]}[layout]
    path = exported_bundle("tiny-llava-onevision", 2, "1/2", "last")
    report = validate_bundle(path, max_new_tokens=16, batch_sizes=(1, 2), media=media)
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]
    assert [c["image_tokens"] for c in report["cases"]] == [{"two-image-sizes": 140, "video": 89}[layout]] * 2


@pytest.mark.slow   # validates an exported bundle
@pytest.mark.parametrize("layout", ["two-image-sizes", "video"])
def test_internvl_media_prompts_validate_end_to_end(exported_bundle, layout):
    """InternVL's tower sees each tile alone, so a bundle's one-tile vision graph serves images of any
    size (3 and 7 tiles here) and videos (one tile per frame), batch 1 and 2."""
    from fastv_export.adapters import Media

    media = {"two-image-sizes": [Media("image", (56, 112)), Media("image", (100, 60))],
             "video": [Media("video", frames=6), Media("image")]}[layout]
    path = exported_bundle("tiny-internvl", 2, "1/2", "last")
    report = validate_bundle(path, max_new_tokens=16, batch_sizes=(1, 2), media=media)
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]
    assert [c["image_tokens"] for c in report["cases"]] == [16 * (10 if layout == "two-image-sizes" else 7)] * 2


@pytest.mark.slow   # validates an exported bundle
@pytest.mark.parametrize("k,ratio,ranking", [(1, "9/10", "last"), (2, "1/2", "last")],
                         ids=["k1-inside-deepstack", "k2"])
def test_qwen3_vl_video_and_image_prompts_validate_end_to_end(exported_bundle, k, ratio, ranking):
    """Qwen3-VL: a video of 4 frames (2 temporal patches of the exported 12 x 12 grid, each its own block after
    its timestamp text) then an image, batch 1 and 2, K = 1 (between the DeepStack layers 0 and 1) and K = 2:
    one vision call per temporal patch and per image, the DeepStack levels placed at the video and image
    tokens in position order; tokens and logits equal the reference (the HF model with FastV), and the vision
    graph's features and DeepStack levels equal the HF model's own on the whole video and image."""
    from fastv_export.adapters import Media

    media = [Media("video", frames=4, fps=2.0), Media("image")]
    path = exported_bundle("tiny-qwen3-vl", k, ratio, ranking)
    report = validate_bundle(path, max_new_tokens=16, batch_sizes=(1, 2), media=media)
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]
    assert [c["image_tokens"] for c in report["cases"]] == [2 * 36 + 36] * 2
    for case in report["cases"]:
        assert case["tokens_identical"] and case["max_logits_error"] <= 1e-4
        assert case["graphs"]["vision"]["passed"] and case["graphs"]["embed"]["passed"]


@pytest.mark.slow   # validates an exported bundle
@pytest.mark.parametrize("model,media,message", [
    ("tiny-qwen2.5-vl", [("image", (224, 170)), ("image", None)], "must be positive multiples of 28 pixels"),
    ("tiny-qwen2-vl", [("image", (224, 168))], r"takes images .* of the exported grid 12 x 12"),
    ("tiny-llava-onevision", [("video", (56, 56))], r"video frames are one tile, 28 x 28 pixels"),
    ("tiny-qwen3-vl", [("video", (168, 112))], r"takes images \(and video frames\) of the exported grid 12 x 12"),
], ids=["qwen2.5-off-grid-size", "qwen2-other-size", "onevision-video-off-tile", "qwen3-video-other-size"])
def test_media_the_vision_graph_cannot_take_are_refused_clearly(exported_bundle, model, media, message):
    from fastv_export.adapters import Media

    path = exported_bundle(model, 2, "1/2", "last")
    media = [Media(kind, size, frames=4 if kind == "video" else 1) for kind, size in media]
    with pytest.raises(FastVError, match=message):
        validate_bundle(path, max_new_tokens=2, batch_sizes=(1,), media=media)


@pytest.mark.slow   # validates an exported bundle
@pytest.mark.parametrize("graph,prefix", [("pre_k", "kept_deepstack_embeds"), ("embed", "deepstack_embeds")])
def test_deepstack_levels_that_do_not_reach_the_decoder_fail_validation(graph, prefix, exported_bundle):
    """tiny-qwen3-vl with K = 1 (inside the DeepStack layers 0 and 1): zeroing the DeepStack levels on
    their way into the decoder (embed's placed levels, or pre_k's kept level 1 for post_k) must make the
    bundle's logits disagree with the reference, so validation sees the DeepStack wiring."""
    from fastv_export.graphs import spec
    from fastv_export.runtime.ort import OrtRunner

    path = exported_bundle("tiny-qwen3-vl", 1, "9/10", "last")
    levels = {"pre_k": spec.KEPT_DEEPSTACK_EMBEDS, "embed": spec.DEEPSTACK_EMBEDS}[graph]
    assert levels == prefix

    class Dropping(OrtRunner):
        def infer(self, name, feeds):
            out = super().infer(name, feeds)
            if name == graph:
                out = {n: np.zeros_like(v) if n.startswith(levels + ".") else v for n, v in out.items()}
            return out

    bundle = load_bundle(path)
    assert bundle.deepstack_layers == 2
    assert spec.level_name(spec.KEPT_DEEPSTACK_EMBEDS, 1) in spec.graph_specs(bundle)["pre_k"].output_names
    report = validate_bundle(path, max_new_tokens=4, batch_sizes=(1,), runner=Dropping(bundle))
    assert not report["passed"]
    assert report["cases"][0]["max_logits_error"] > 1e-3


@pytest.mark.slow   # validates an exported bundle
def test_validate_command_takes_the_prompts_media(exported_bundle, capsys):
    """`fastv-export validate BUNDLE --media ...`: the prompts hold those media (two sizes and a video of
    another size here, Qwen2.5-VL), the table names them; a malformed --media is one error, exit 2."""
    from fastv_export.cli import main as cli
    from tests.helpers import run_cli

    path = exported_bundle("tiny-qwen2.5-vl", 2, "1/2", "last")
    capsys.readouterr()
    rc = cli(["validate", str(path), "--media", "image@112x224,video:4@112x168", "--batch-sizes", "1",
              "--max-new-tokens", "4", "--report-dir", str(path.parent / "media-report")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "media per prompt: image 112x224, video of 4 frames 112x168" in out
    tokens = 8 * 16 // 4 + 2 * 8 * 12 // 4
    assert f" {tokens} " in out.splitlines()[3] and "PASS" in out
    rc, err = run_cli(capsys, ["validate", str(path), "--media", "image@12x"])
    assert rc == 2 and "--media 'image@12x': expected image, image@HxW" in err


# ---- the comparison rule (no bundle) ---------------------------------------------------------------------
def test_allclose_rule_passes_rounding_that_grows_with_magnitude_and_fails_a_real_mismatch():
    """|a - b| <= atol + rtol x |b|, b the reference: logits of magnitude ~10 carrying a relative error of 2e-5
    (absolute up to 2e-4, what float32 graphs of a Qwen2.5-VL-style checkpoint show) fail on atol alone and
    pass with the rtol term; an error of 1e-3 on a logit of 0.5 fails either way; the worst absolute and
    relative errors and the error-to-tolerance ratio are those computed here."""
    from fastv_export.validate import compare_close

    rng = np.random.default_rng(0)
    ref = rng.uniform(-12.0, 12.0, size=(2, 5, 64)).astype(np.float32)
    ref[0, 0, 0] = 10.0
    run = (ref.astype(np.float64) * (1 + 2e-5)).astype(np.float32)
    ref64 = ref.astype(np.float64)
    diff = np.abs(run.astype(np.float64) - ref64)
    assert diff.max() > 1.5e-4                                  # beyond an absolute 1e-4
    assert not compare_close(run, ref, atol=1e-4, rtol=0.0).passed
    close = compare_close(run, ref, atol=1e-4, rtol=1e-4)
    assert close.passed
    assert close.max_abs_error == pytest.approx(diff.max(), rel=1e-12)
    assert close.max_rel_error == pytest.approx((diff / np.abs(ref64)).max(), rel=1e-12)
    assert close.error_to_tolerance == pytest.approx((diff / (1e-4 + 1e-4 * np.abs(ref64))).max(), rel=1e-12)
    assert close.error_to_tolerance <= 1

    bad = run.copy()
    bad[1, 2, 3] = ref[1, 2, 3] = 0.5
    bad[1, 2, 3] += 1e-3                                        # a real mismatch at a small logit
    close = compare_close(bad, ref, atol=1e-4, rtol=1e-4)
    assert not close.passed and close.error_to_tolerance > 1
    assert close.max_abs_error == pytest.approx(1e-3, rel=1e-4)
    # the reference is b: the rule is not symmetric, as numpy.isclose's
    a, b = np.array([1.0 + 2.1e-4]), np.array([1.0])
    assert compare_close(a, b, 1e-4, 1e-4).passed == bool(np.isclose(a, b, rtol=1e-4, atol=1e-4)[0])
    assert not compare_close(np.array([np.nan]), np.array([1.0]), 1.0, 1.0).passed
    assert not compare_close(np.zeros((2, 3)), np.zeros((3, 2)), 1.0, 1.0).passed


def test_tolerances_by_precision_and_the_overrides():
    from fastv_export.validate import TOLERANCES, tolerances

    assert tolerances("fp32") == TOLERANCES["fp32"]
    assert (TOLERANCES["fp32"]["logits"], TOLERANCES["fp32"]["rtol"]) == (1e-4, 1e-4)
    fp16 = tolerances("fp16", rtol=0.0)
    assert fp16["rtol"] == 0.0 and fp16["logits"] == 1e-1 and fp16["graph"] == 1e-2 and fp16["graph_scaled"]
    assert tolerances("fp32", atol=1e-3)["logits"] == tolerances("fp32", atol=1e-3)["graph"] == 1e-3
    for name, value in (("atol", -1.0), ("rtol", float("nan"))):
        with pytest.raises(FastVError, match=rf"^{name} \(--{name}\) must be a finite number >= 0"):
            tolerances("fp32", **{name: value})


@pytest.mark.slow   # validates an exported bundle
def test_validate_command_tolerances(exported_bundle, tmp_path, capsys, monkeypatch):
    """`validate --atol/--rtol`: graphs whose logits carry a relative error of 9e-5 (rounding that grows with the
    magnitude; tokens unchanged) pass with the fp32 defaults (atol 1e-4 + rtol 1e-4 x |reference|) and fail
    with --rtol 0 (the old absolute-only rule); the report states the tolerances used and the worst absolute
    and relative errors; a negative --atol is one line, exit 2."""
    from fastv_export.graphs import spec
    from fastv_export.runtime.ort import OrtRunner
    from tests.helpers import run_cli

    class Scaling(OrtRunner):
        def infer(self, name, feeds):
            out = super().infer(name, feeds)
            if name == "post_k":
                out[spec.LOGITS] = (out[spec.LOGITS].astype(np.float64) * (1 + 9e-5)).astype(np.float32)
            return out

    path = exported_bundle("tiny-llava", 2, "1/2")
    monkeypatch.setattr("fastv_export.runtime.runners.open_runner", lambda bundle, kind: Scaling(bundle))
    argv = ["validate", str(path), "--max-new-tokens", "6", "--batch-sizes", "1", "--report-dir", str(tmp_path)]
    capsys.readouterr()
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "logits atol 0.0001, graphs atol 0.0001, rtol 0.0001" in out and "PASS" in out
    report = json.loads((tmp_path / "validation.json").read_text())
    case = report["cases"][0]
    assert report["tolerances"]["rtol"] == 1e-4 and case["logits_close"] and case["tokens_identical"]
    assert case["max_logits_error"] > 1e-4 and case["max_logits_rel_error"] > 5e-5   # near-zero logits: larger
    assert case["graphs"]["post_k"]["max_rel_error"] > 5e-5 and case["graphs"]["post_k"]["passed"]

    assert cli(argv + ["--rtol", "0"]) == 1
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "validation.json").read_text())
    assert report["tolerances"]["rtol"] == 0.0 and not report["cases"][0]["logits_close"] and "FAILED" in out
    assert report["cases"][0]["tokens_identical"]

    rc, err = run_cli(capsys, argv + ["--atol", "-1"])
    assert rc == 2 and "atol (--atol) must be a finite number >= 0" in err and len(err.splitlines()) == 1
