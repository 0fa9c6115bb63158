"""LLaVA-OneVision dynamic anyres: the host layout (``runtime.anyres.anyres_layout``) and the adapter's
``encode_tiles`` / ``vision_units`` against the HF model's own feature code (tile counts,
token counts, features at the image and video tokens), the sizes the model would resize, bad input,
and a dynamo ONNX export with dynamic tile and token counts."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastv_export.adapters.base import Media
from fastv_export.errors import FastVError
from fastv_export.prompts import make_prompt
from fastv_export.runtime.anyres import anyres_layout

PRESET = "tiny-llava-onevision"
IMAGE_SIZES = [(56, 56), (28, 56), (56, 28), (28, 28), (40, 30), (30, 50), (17, 56), (56, 9), (1, 56), (56, 1),
               (1, 1), (300, 7), (29, 29),
               (24, 56), (56, 24),                 # odd unpadding margins
               (343, 392), (392, 343), (147, 392)]  # unpadded side x.9999999, whose rounding moves the margin
#: a sweep of sizes (every aspect class, odd and even margins), checked in one test
SWEEP_SIZES = [(h, w) for h in (3, 11, 20, 27, 33, 45, 57, 70, 90) for w in (2, 13, 22, 31, 42, 55, 64, 81, 120)]


@pytest.fixture
def onevision(model_and_adapter):
    """(model, adapter) of the tiny LLaVA-OneVision preset, eager attention."""
    return model_and_adapter(PRESET, "eager")


def _hf_image_features(model, px_tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The model's own packed features of one image: [tokens, D]."""
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=px_tiles[None], image_sizes=torch.tensor([list(size)]))
    return out.pooler_output[0]


def _encode(adapter, px: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return adapter.encode_tiles(px, torch.from_numpy(index))


def test_anyres_params_from_config(onevision):
    _, adapter = onevision
    cfg = adapter.config
    assert adapter.anyres_params() == {"tile": 28, "patches_per_side": 4,
                                       "pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
                                       "max_num_patches": 9, "pooled_side": 2}


def test_anyres_module_is_numpy_only():
    """The layout is runtime code: importing it pulls in neither torch nor transformers."""
    code = ("import sys, fastv_export.runtime.anyres; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_image_layout_matches_model(onevision, size):
    """Tile count, token count and features of one image equal the model's own anyres code."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    model, adapter = onevision
    cfg = model.config
    tiles, index = anyres_layout("image", *size, 1, adapter.anyres_params())
    assert tiles == image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    assert index.dtype == np.int64 and index.ndim == 1
    assert len(index) == adapter._count(Media("image", size))
    px = torch.randn(tiles, 3, adapter.tile, adapter.tile)
    torch.testing.assert_close(_encode(adapter, px, index), _hf_image_features(model, px, size))


def test_image_layout_sweep_matches_model(onevision):
    """Many sizes in one go: token count and features equal the model's own packing."""
    model, adapter = onevision
    params = adapter.anyres_params()
    for size in SWEEP_SIZES:
        tiles, index = anyres_layout("image", *size, 1, params)
        px = torch.randn(tiles, 3, adapter.tile, adapter.tile)
        ref = _hf_image_features(model, px, size)
        assert len(index) == ref.shape[0], size
        torch.testing.assert_close(_encode(adapter, px, index), ref, msg=lambda m: f"{size}: {m}")


def _variant(adapter, **config):
    """A random tiny model of ``adapter``'s config with ``config`` fields replaced, and its adapter."""
    from transformers import LlavaOnevisionForConditionalGeneration

    cfg = copy.deepcopy(adapter.config)
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(1)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    return model, type(adapter)(model)


def test_pinpoint_ties_follow_model_order(onevision):
    """Two pinpoints that keep and waste the same: the model takes the first listed; so does the layout
    (1 x 2 tiles for one order, 2 x 1 for the other)."""
    _, adapter = onevision
    t = adapter.tile
    for pinpoints in ([[t, 2 * t], [2 * t, t]], [[2 * t, t], [t, 2 * t]]):
        model, var = _variant(adapter, image_grid_pinpoints=pinpoints)
        for size in [(t, t), (10, 10), (t + 3, t - 2)]:
            tiles, index = anyres_layout("image", *size, 1, var.anyres_params())
            px = torch.randn(tiles, 3, t, t)
            torch.testing.assert_close(_encode(var, px, index), _hf_image_features(model, px, size))


def test_several_feature_layers_follow_model(onevision):
    """A config that concatenates two tower layers (the projector takes both): image and video
    features still equal the model's."""
    _, adapter = onevision
    t = adapter.tile
    model, var = _variant(adapter, vision_feature_layer=[0, -2])
    params = var.anyres_params()
    tiles, index = anyres_layout("image", 40, 30, 1, params)
    px = torch.randn(tiles, 3, t, t)
    torch.testing.assert_close(_encode(var, px, index), _hf_image_features(model, px, (40, 30)))
    tiles, index = anyres_layout("video", t, t, 3, params)
    px = torch.randn(tiles, 3, t, t)
    with torch.no_grad():
        ref = model.model.get_video_features(pixel_values_videos=px[None]).pooler_output[0]
    torch.testing.assert_close(_encode(var, px, index), ref)


def test_untiled_images_follow_model(onevision):
    """Several images of one sample (the processor's ``batch_num_images`` > 1) are one tile each, packed
    as the tile's features then one newline: ``tiled=False``."""
    model, adapter = onevision
    t = adapter.tile
    sizes = [(56, 56), (28, 56), (40, 30)]
    px = torch.randn(len(sizes), 5, 3, t, t)
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=px, image_sizes=torch.tensor(sizes),
                                             batch_num_images=torch.tensor([len(sizes)])).pooler_output
    for i, size in enumerate(sizes):
        tiles, index = anyres_layout("image", *size, 1, adapter.anyres_params(), tiled=False)
        assert tiles == 1
        torch.testing.assert_close(_encode(adapter, px[i, :tiles], index), ref[i])


def test_two_images_of_different_sizes_in_one_prompt(onevision):
    """Per-medium pixels, layouts and encodings, concatenated, equal the model's features of the
    prompt's images (two sizes, so the second image's pixel row is padded)."""
    model, adapter = onevision
    media = [Media("image", (56, 56)), Media("image", (28, 56))]
    prompt = make_prompt(adapter, [5], media=media)
    params = adapter.anyres_params()
    units = adapter.vision_units(prompt.media, prompt.vision)
    assert [u.shape[0] for u in units] == [5, 3]
    ours = []
    for m, px in zip(prompt.media, units):
        tiles, index = anyres_layout(m.kind, *m.size, m.frames, params)
        assert tiles == px.shape[0]
        ours.append(_encode(adapter, px, index))
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=prompt.vision["pixel_values"],
                                             image_sizes=prompt.vision["image_sizes"]).pooler_output
    torch.testing.assert_close(torch.cat(ours), torch.cat(list(ref)))


def test_mixed_prompt_features_at_media_tokens(onevision):
    """Images and videos interleaved in one prompt: the encodings in prompt order equal what the
    model's forward places at the image and video tokens of the language model's input."""
    model, adapter = onevision
    media = [Media("image", (40, 30)), Media("video", frames=4), Media("image", (28, 56)), Media("video", frames=4)]
    prompt = make_prompt(adapter, [5], media=media)
    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**prompt.model_inputs())
    finally:
        handle.remove()
    ids = prompt.input_ids[0]
    is_media = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    ref = captured["embeds"][0][is_media]

    params = adapter.anyres_params()
    units = adapter.vision_units(prompt.media, prompt.vision)
    assert [u.shape[0] for u in units] == [5, 4, 3, 4]
    torch.testing.assert_close(units[3], prompt.vision["pixel_values_videos"][1])
    ours = []
    for m, px in zip(prompt.media, units):
        size = m.size or (adapter.tile, adapter.tile)
        tiles, index = anyres_layout(m.kind, *size, m.frames, params)
        assert tiles == px.shape[0]
        ours.append(_encode(adapter, px, index))
    torch.testing.assert_close(torch.cat(ours), ref)


@pytest.mark.parametrize("frames", [1, 4, 6])
def test_video_layout_matches_model(onevision, frames):
    model, adapter = onevision
    s = adapter.tile
    tiles, index = anyres_layout("video", s, s, frames, adapter.anyres_params())
    assert tiles == frames
    assert len(index) == adapter._count(Media("video", frames=frames))
    px = torch.randn(frames, 3, s, s)
    with torch.no_grad():
        ref = model.model.get_video_features(pixel_values_videos=px[None]).pooler_output[0]
    torch.testing.assert_close(_encode(adapter, px, index), ref)


def _interpolations(monkeypatch) -> list[int]:
    """Patch torch's interpolate to count its calls (the model resizes an anyres feature map with it)."""
    calls: list[int] = []
    original = torch.nn.functional.interpolate

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    return calls


def test_sizes_the_model_resizes_are_refused(onevision, monkeypatch):
    """A config with up to 3 x 3 tiles and a 4-tile limit (64 features): for every size, either the model
    resizes the feature map and the layout refuses it with a FastVError, or the features match exactly.
    The sizes include unpadded maps just under and just over the 1.1 ratio (6 x 12 features: 1.06;
    8 x 10: 1.12)."""
    _, adapter = onevision
    t = adapter.tile
    big, big_adapter = _variant(adapter, vision_aspect_ratio="anyres_max_4",
                                image_grid_pinpoints=[[t * i, t * j] for i in range(1, 4) for j in range(1, 4)])
    params = big_adapter.anyres_params()
    assert params["max_num_patches"] == 4
    calls = _interpolations(monkeypatch)
    refused, matched = [], []
    sizes = [(h, w) for h in (20, 28, 40, 56, 70, 84) for w in (10, 20, 28, 35, 42, 56, 84)]
    sizes += [(29, 57), (57, 29), (42, 57), (57, 42)]
    for size in sizes:
        tiles, _ = anyres_layout("image", *size, 1, {**params, "max_num_patches": 100})
        px = torch.randn(tiles, 3, t, t)
        calls.clear()
        ref = _hf_image_features(big, px, size)
        if calls:
            with pytest.raises(FastVError, match=rf"{size[0]} x {size[1]} image is too large .* limit of 4 tiles"):
                anyres_layout("image", *size, 1, params)
            refused.append(size)
        else:
            _, index = anyres_layout("image", *size, 1, params)
            torch.testing.assert_close(_encode(big_adapter, px, index), ref)
            matched.append(ref.shape[0])
    assert (42, 57) in refused and (57, 42) in refused and (84, 84) in refused
    assert 16 + 6 * 13 in matched and 16 + 12 * 7 in matched    # the 6 x 12 and 12 x 6 maps, newlines added


def test_default_size_over_a_one_tile_limit_is_refused(onevision):
    _, adapter = onevision
    params = {**adapter.anyres_params(), "max_num_patches": 1}
    with pytest.raises(FastVError, match=r"56 x 56 image is too large .* limit of 1 tiles.*resize the image"):
        anyres_layout("image", 56, 56, 1, params)
    anyres_layout("image", 28, 28, 1, params)    # 4 x 4 features: within one tile


@pytest.mark.parametrize("args, match", [
    (("image", 0, 56, 1), "positive size"),
    (("image", 56, -3, 1), "positive size"),
    (("video", 28, 28, 0), "frames >= 1"),
    (("video", 56, 56, 4), "video frames are one tile, 28 x 28"),
    (("image", 56, 56, 2), "an image has one frame"),
    (("audio", 56, 56, 1), "must be 'image' or 'video'"),
    (("image", 56.0, 56, 1), "height must be a whole number"),
])
def test_bad_input_is_a_fastv_error(onevision, args, match):
    _, adapter = onevision
    with pytest.raises(FastVError, match=match):
        anyres_layout(*args, adapter.anyres_params())


def test_bad_params_are_a_fastv_error(onevision):
    _, adapter = onevision
    params = adapter.anyres_params()
    with pytest.raises(FastVError, match="lack"):
        anyres_layout("image", 56, 56, 1, {k: v for k, v in params.items() if k != "pinpoints"})
    with pytest.raises(FastVError, match="multiple of the 28 px tile"):
        anyres_layout("image", 56, 56, 1, {**params, "pinpoints": [[28, 42]]})


class _EncodeTiles(torch.nn.Module):
    """The vision graph's core: (pixel_values [T, 3, S, S], pack_index [M]) -> features [M, D]."""

    def __init__(self, adapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model    # registers the weights

    def forward(self, pixel_values: torch.Tensor, pack_index: torch.Tensor) -> torch.Tensor:
        return self.adapter.encode_tiles(pixel_values, pack_index)


def test_encode_tiles_dynamo_onnx_dynamic_tiles(onevision, tmp_path):
    """Exported once (5 tiles, 88 rows), the graph takes any tile and index count in onnxruntime."""
    import onnxruntime as ort
    from torch.export import Dim

    _, adapter = onevision
    params = adapter.anyres_params()
    s = adapter.tile
    tiles, index = anyres_layout("image", 56, 56, 1, params)
    module = _EncodeTiles(adapter).eval()
    path = tmp_path / "encode_tiles.onnx"
    with torch.no_grad():
        program = torch.onnx.export(module, (torch.randn(tiles, 3, s, s), torch.from_numpy(index)), None,
                                    input_names=["pixel_values", "pack_index"], output_names=["features"],
                                    dynamo=True, opset_version=18, verbose=False,
                                    dynamic_shapes={"pixel_values": {0: Dim.DYNAMIC}, "pack_index": {0: Dim.DYNAMIC}})
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for kind, size, frames in [("image", (28, 56), 1), ("image", (40, 30), 1), ("video", (s, s), 6),
                               ("video", (s, s), 1)]:
        tiles, index = anyres_layout(kind, *size, frames, params)
        px = torch.randn(tiles, 3, s, s)
        got = session.run(None, {"pixel_values": px.numpy(), "pack_index": index})[0]
        np.testing.assert_allclose(got, _encode(adapter, px, index).numpy(), rtol=0, atol=1e-5)
