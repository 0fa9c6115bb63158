"""fastv_export/runtime/vision_feeds.py (numpy, what a runtime computes on the host before each vision
call) against the Hugging Face helpers the Qwen2.5-VL tower itself calls, and the tower run as the graph
runs it (one masked attention per call) against the tower run by the model."""
import numpy as np
import pytest
import torch

from fastv_export.adapters import Media
from fastv_export.bundle import Manifest
from fastv_export.errors import FastVError
from fastv_export.graphs import spec
from fastv_export.prompts import make_prompt
from fastv_export.runtime.vision_feeds import patch_grid_feeds, vision_calls

GRIDS = [(12, 12), (4, 4), (8, 16), (16, 8), (20, 12), (6, 10), (2, 2), (14, 26)]


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("window", [56, 112, 28])
def test_patch_grid_feeds_equal_the_hf_helpers(h, w, window):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    layout = {"kind": "patch_grid", "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
              "window_size": window}
    feeds = patch_grid_feeds(np.zeros((h * w, 4), np.float32), h, w, layout)
    grid = torch.tensor([[1, h, w]])
    index, bounds = get_vision_window_index(grid, spatial_merge_size=2, window_size=window, patch_size=14)
    np.testing.assert_array_equal(feeds[spec.VISION_POSITION_IDS], get_vision_position_ids(grid, 2).numpy())
    np.testing.assert_array_equal(feeds[spec.WINDOW_INDEX], index.numpy())
    np.testing.assert_array_equal(feeds[spec.CU_WINDOW_SEQLENS], bounds.numpy())


def _layout(adapter) -> dict:
    return {"image_tokens": {"vision_layout": {"kind": adapter.vision_layout, **adapter.vision_layout_params()},
                             "grid_thw": list(adapter.image_grid)}}


def test_the_calls_of_a_prompt_give_the_models_own_features(model_and_adapter):
    """Images of three sizes and a video of another, split into one call per image and per temporal patch,
    each run as the graph runs it, concatenated: exactly the features the HF model computes per medium."""
    _, adapter = model_and_adapter("tiny-qwen2.5-vl")
    media = [Media("image", (168, 168)), Media("video", (112, 224), frames=4), Media("image", (224, 112)),
             Media("image", (56, 56))]
    prompt = make_prompt(adapter, [5], media=media)
    calls = vision_calls(Manifest(_layout(adapter)), [u.numpy() for u in prompt.vision_units(adapter)], prompt.media,
                         np.float32)
    assert len(calls) == 5 and all(list(c) == spec.vision_graph([0, 0], 0, "patch_grid").input_names for c in calls)
    with torch.no_grad():
        want = adapter.media_features(prompt.media, prompt.vision)[0]
        got = torch.cat([adapter.encode_unit(*[torch.from_numpy(v) for v in c.values()]) for c in calls])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_calls_are_refused_with_one_clear_error(model_and_adapter):
    _, adapter = model_and_adapter("tiny-qwen2.5-vl")
    man = _layout(adapter)
    px = np.zeros((144, 1176), np.float32)
    with pytest.raises(FastVError, match="make 2 vision calls .* got 1 pixel inputs"):
        vision_calls(Manifest(man), [px], [Media("video", frames=4)], np.float32)
    with pytest.raises(FastVError, match="takes 64 patch rows"):
        vision_calls(Manifest(man), [px], [Media("image", (112, 112))], np.float32)
    with pytest.raises(FastVError, match="multiples of 28 pixels"):
        vision_calls(Manifest(man), [px], [Media("image", (100, 112))], np.float32)
    man["image_tokens"]["vision_layout"]["kind"] = "mosaic"
    with pytest.raises(FastVError, match="'image_tokens.vision_layout.kind' is 'mosaic'"):
        vision_calls(Manifest(man), [px], None, np.float32)
