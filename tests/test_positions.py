"""The manifest's position rules (numpy) against the models' own position computation."""
import pytest
import torch

from fastv_export.adapters import Media
from fastv_export.bundle import Manifest
from fastv_export.bundle.write import image_tokens_section, positions_section
from fastv_export.prompts import make_prompt
from fastv_export.runtime.positions import decode_positions, prefill_positions


def _manifest(adapter):
    """The manifest sections the positions follow, as the export writes them."""
    return Manifest({"positions": positions_section(adapter),
                     "image_tokens": image_tokens_section(adapter, vision_input={})})


def test_prefill_and_decode_positions_match_hf_generate(preset, model_and_adapter):
    _check_positions(model_and_adapter, preset, None)


@pytest.mark.parametrize("media", [
    [Media("video", frames=8, fps=1.0), Media("image")],                      # temporal index 0, 4, 8, 12 (2.5)
    [Media("image"), Media("video", frames=16, fps=3.0), Media("video", frames=4, fps=0.5)],
], ids=["video-then-image", "image-and-two-videos"])
@pytest.mark.parametrize("preset_name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_video_positions_match_hf_generate(preset_name, media, model_and_adapter):
    """Qwen3-VL: each temporal patch of a video is its own block after its timestamp text (temporal index
    0, its offset the position after the timestamp), as HF's get_rope_index splits video_grid_thw."""
    _check_positions(model_and_adapter, preset_name, media)


@pytest.mark.parametrize("media", [
    [Media("image", (112, 224)), Media("image", (224, 168))],
    [Media("video", (168, 112), frames=4, fps=1.0), Media("image", (56, 280)), Media("image")],
], ids=["two-image-sizes", "video-and-images-of-other-sizes"])
def test_positions_of_media_of_any_size_match_hf_generate(media, model_and_adapter):
    """Qwen2.5-VL (vision layout patch_grid): each medium's positions follow its own grid, from the media
    given to the runtime."""
    _check_positions(model_and_adapter, "tiny-qwen2.5-vl", media)


def _check_positions(model_and_adapter, preset, media):
    model, adapter = model_and_adapter(preset)
    prompt = make_prompt(adapter, [4, 9], num_images=2, seed=3, media=media)
    seen = []
    layer = adapter.layers()[0]
    h = layer.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["position_embeddings"][0]),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**prompt.model_inputs(), max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    man = _manifest(adapter)
    ids, mask = prompt.input_ids.numpy(), prompt.attention_mask.numpy()
    seconds = prompt.vision.get("second_per_grid_ts")
    pos = prefill_positions(man, ids, mask, None if seconds is None else seconds.tolist(),
                            prompt.media if media is not None else None)
    rotary = adapter.text_model().rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    cos = rotary(x, torch.from_numpy(pos))[0]
    real = prompt.attention_mask.bool()
    assert torch.allclose(cos[real], seen[0][real], atol=1e-6)
    for step in range(2):
        dp = torch.from_numpy(decode_positions(pos, step))
        assert torch.allclose(rotary(x, dp)[0], seen[1 + step], atol=1e-6)
