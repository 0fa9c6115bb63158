"""The PyTorch reference FastV against independent computations (issue 3 acceptance)."""
import pytest
import torch

from fastv_export import FastVConfig, FastVError, apply_fastv
from fastv_export.adapters import Media
from fastv_export.prompts import make_prompt
from fastv_export.reference import generate_rerank, greedy_decode, prefill
from fastv_export.reference.selection import random_scores

from tests.independent import independent_pruned_logits, python_select


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, use_cache=False, **kw).logits


def _greedy(model, inputs, n=8):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("ratio", [0, "0/7"])
def test_r0_is_the_unmodified_model(preset, ratio, model_and_adapter):
    model, adapter = model_and_adapter(preset)
    p = make_prompt(adapter, [7, 4], num_images=1, seed=1).model_inputs()
    base_logits = _logits(model, p)
    base_seq, base_steps = _greedy(model, p)
    with apply_fastv(model, FastVConfig(k=1, ratio=ratio)):
        assert torch.equal(_logits(model, p), base_logits)
        seq, steps = _greedy(model, p)
    assert torch.equal(seq, base_seq) and torch.equal(steps, base_steps)


def test_prompt_without_image_tokens_is_unmodified(preset, model_and_adapter):
    model, adapter = model_and_adapter(preset)
    p = make_prompt(adapter, [9, 5], num_images=0, seed=2)
    inputs = {"input_ids": p.input_ids, "attention_mask": p.attention_mask, **p.extra}
    base_seq, base_steps = _greedy(model, inputs)
    with apply_fastv(model, FastVConfig(k=2, ratio="3/4")) as h:
        seq, steps = _greedy(model, inputs)
        assert h.kept_positions is None
    assert torch.equal(seq, base_seq) and torch.equal(steps, base_steps)


CASES = [  # (k, ratio, ranking, batch text lengths, images)
    (2, "1/2", "last", [8], 1),
    (1, "3/4", "mean", [8], 1),
    (3, "9/10", "last", [6, 11], 1),
    (2, "2/3", "mean", [5, 9, 3], 1),
    (2, "1/2", "random", [8, 3], 1),
    (2, "1/2", "last", [8], 2),    # two images: one pool of 2 x M candidates
    (1, "1/3", "mean", [4, 7], 2),
]


# eager: the same attention kernels as the independent computation, so 1e-5 is the bar;
# sdpa: the unmodified model itself differs from eager by ~2e-5 on these logits (fp32).
@pytest.mark.parametrize("attn,tol", [("eager", 1e-5), ("sdpa", 1e-4)])
@pytest.mark.parametrize("k,ratio,ranking,lengths,images", CASES)
def test_pruned_prefill_equals_independent_computation(preset, k, ratio, ranking, lengths, images, attn, tol,
                                                       model_and_adapter):
    model, adapter = model_and_adapter(preset, attn)
    eager, eager_adapter = model_and_adapter(preset, "eager")
    prompt = make_prompt(adapter, lengths, num_images=images, seed=3)
    inputs = prompt.model_inputs()
    cfg = FastVConfig(k=k, ratio=ratio, ranking=ranking, seed=5)
    ref_logits, ref_kept = independent_pruned_logits(
        eager, eager_adapter, inputs, k, ranking, cfg.keep_count, set(adapter.image_token_ids()),
        random_scores_fn=random_scores, seed=5)
    with apply_fastv(model, cfg) as h:
        logits = _logits(model, inputs)
        kept = h.kept_positions
        m = h.candidates.shape[1]
    assert m == images * adapter.image_tokens_per_image()
    assert torch.equal(kept, ref_kept)
    assert logits.shape == ref_logits.shape
    # padded query rows produce garbage in both; compare real tokens only
    valid = torch.stack([prompt.attention_mask[r, kept[r]] for r in range(kept.shape[0])]).bool()
    err = (logits - ref_logits).abs()[valid].max().item()
    assert err <= tol, err


def test_layers_after_k_run_on_kept_tokens_and_cache_two_lengths(preset, model_and_adapter):
    model, adapter = model_and_adapter(preset)
    prompt = make_prompt(adapter, [10], num_images=1, seed=4)
    n = prompt.input_ids.shape[1]
    k, cfg = 2, FastVConfig(k=2, ratio="3/4")
    seen = {}
    # outputs of each layer: n tokens before K, n' from K on
    hooks = [layer.register_forward_hook(
        lambda mod, args, out, i=i: seen.setdefault(i, []).append(
            (out[0] if isinstance(out, tuple) else out).shape[1]))
        for i, layer in enumerate(adapter.layers())]
    calls = []
    attn = adapter.layers()[k - 1].self_attn
    h_attn = attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        with apply_fastv(model, cfg) as h, torch.no_grad():
            out = model(**prompt.model_inputs(), use_cache=True)
            n_kept = h.kept_positions.shape[1]
            m = adapter.image_tokens_per_image()
            assert n_kept == n - m + cfg.keep_count(m)
            cache = out.past_key_values
            for i in range(len(adapter.layers())):
                assert cache.layers[i].keys.shape[2] == (n if i < k else n_kept), i
                assert seen[i] == [n if i < k else n_kept]
            assert len(calls) == 1, "layer K-1 must run once"
            # every other layer keeps the model's own attention implementation
            assert all(layer.self_attn.config._attn_implementation == "sdpa"
                       for i, layer in enumerate(adapter.layers()) if i != k - 1)
    finally:
        h_attn.remove()
        for hk in hooks:
            hk.remove()
    assert attn.config._attn_implementation == "sdpa"   # restored


@pytest.mark.parametrize("ranking", ["last", "mean"])
def test_kv_cache_generation_equals_recompute_without_cache(preset, ranking, model_and_adapter):
    model, adapter = model_and_adapter(preset)
    prompt = make_prompt(adapter, [6], num_images=1, seed=6)
    inputs = prompt.model_inputs()
    steps = 16
    with apply_fastv(model, FastVConfig(k=2, ratio="1/2", ranking=ranking)) as h:
        seq, step_logits = _greedy(model, inputs, steps)
        kept = h.kept_positions.clone()
        h.force_selection(kept)
        n = prompt.input_ids.shape[1]
        for t in range(steps):
            ids = seq[:, :n + t]
            full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids), **adapter.text_inputs(ids))
            logits = _logits(model, full)[:, -1]
            err = (logits - step_logits[:, t]).abs().max().item()
            assert err <= 1e-4, (t, err)
            assert int(logits.argmax(-1)) == int(seq[0, n + t])


def _cut(row: list[int], eos: int | None) -> list[int]:
    return row[:row.index(eos) + 1] if eos is not None and eos in row else row


def test_greedy_decode_from_a_prefill_equals_generate(preset, model_and_adapter):
    """reference.decode: one prefill, then its own decode loop over the cache at (max prompt position of
    the row) + 1 + t, RoPE or M-RoPE: the tokens of Hugging Face generate, for two unpadded rows."""
    model, adapter = model_and_adapter(preset)
    inputs = make_prompt(adapter, [7, 7], num_images=1, seed=6).model_inputs()
    eos = adapter.text_config.eos_token_id
    state = prefill(model, inputs)
    assert state.positions.dim() == adapter.position_rank and state.positions.shape[-1] == inputs["input_ids"].shape[1]
    got = greedy_decode(model, state, 6, eos_token_id=eos)
    seq, _ = _greedy(model, inputs, 6)
    want = [_cut(row, eos) for row in seq[:, inputs["input_ids"].shape[1]:].tolist()]
    assert got == want
    with apply_fastv(model, FastVConfig(k=1, ratio="1/2")):
        with pytest.raises(FastVError, match="cannot run under apply_fastv"):
            greedy_decode(model, prefill(model, inputs), 2)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_rerank_with_nothing_dropped_is_generate(name, model_and_adapter):
    """R = 0 under the re-rank-every-step decode: the unmodified model's tokens, several of them (Qwen2-VL's
    per-token mm_token_type_ids grow with the sequence)."""
    model, adapter = model_and_adapter(name)
    inputs = make_prompt(adapter, [6], num_images=1, seed=3).model_inputs()
    res = generate_rerank(model, FastVConfig(k=1, ratio=0), max_new_tokens=5, **inputs)
    seq, _ = _greedy(model, inputs, 5)
    assert res.tokens[0].tolist() == seq[0, inputs["input_ids"].shape[1]:].tolist()


def test_batch_with_left_padding_equals_each_prompt_alone(preset, model_and_adapter):
    model, adapter = model_and_adapter(preset)
    prompt = make_prompt(adapter, [3, 12, 7], num_images=1, seed=7)
    cfg = FastVConfig(k=2, ratio="1/2", ranking="mean")
    with apply_fastv(model, cfg) as h:
        seq, logits = _greedy(model, prompt.model_inputs(), 8)
        kept_batch = h.kept_positions.clone()
        n = prompt.input_ids.shape[1]
        for r in range(3):
            single = prompt.row(r, adapter, 1)
            s_seq, s_logits = _greedy(model, single.model_inputs(), 8)
            pad = n - single.input_ids.shape[1]
            assert torch.equal(s_seq[0], seq[r, pad:])
            assert (s_logits[0] - logits[r]).abs().max().item() <= 1e-4
            pruned_real = kept_batch[r][kept_batch[r] >= pad] - pad
            assert torch.equal(h.kept_positions[0], pruned_real)


def test_random_ranking_is_seeded_and_reproducible(preset, model_and_adapter):
    model, adapter = model_and_adapter(preset)
    inputs = make_prompt(adapter, [5], num_images=1, seed=8).model_inputs()
    kept = {}
    for seed in (0, 0, 1):
        with apply_fastv(model, FastVConfig(k=1, ratio="1/2", ranking="random", seed=seed)) as h:
            _logits(model, inputs)
            kept.setdefault(seed, []).append(h.kept_positions.clone())
    assert torch.equal(kept[0][0], kept[0][1])
    assert not torch.equal(kept[0][0], kept[1][0])


def test_k0_random_prunes_before_the_first_layer(preset, model_and_adapter):
    model, adapter = model_and_adapter(preset)
    inputs = make_prompt(adapter, [5], num_images=1, seed=9).model_inputs()
    with apply_fastv(model, FastVConfig(k=0, ratio="1/2", ranking="random")) as h, torch.no_grad():
        out = model(**inputs, use_cache=True)
        assert all(layer.keys.shape[2] == h.kept_positions.shape[1] for layer in out.past_key_values.layers)


def test_ties_go_to_the_lower_position(preset):
    """Zero key projection in layer K-1: every key is equal, attention is uniform, all candidate
    scores tie exactly, so the lowest candidate positions must be kept."""
    from fastv_export.presets import load_model
    model = load_model(preset)
    from fastv_export.adapters import get_adapter
    adapter = get_adapter(model)
    attn = adapter.layers()[1].self_attn
    with torch.no_grad():
        attn.k_proj.weight.zero_()
        if attn.k_proj.bias is not None:
            attn.k_proj.bias.zero_()
    prompt = make_prompt(adapter, [5], num_images=1, seed=10)
    for ranking in ("last", "mean"):
        cfg = FastVConfig(k=2, keep=5, ranking=ranking)
        with apply_fastv(model, cfg) as h:
            _logits(model, prompt.model_inputs())
            cand = h.candidates[0].tolist()
            if ranking == "last":
                assert len(set(h.candidate_scores[0].tolist())) == 1
            kept = set(h.kept_positions[0].tolist())
        assert [c for c in cand if c in kept] == cand[:5]


def test_python_selection_helper_breaks_ties_low():
    assert python_select([0.5, 0.5, 0.9, 0.5], [3, 4, 5, 6], 8, 2) == [0, 1, 2, 3, 5, 7]


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_k_ratio_keep(model_and_adapter):
    model, adapter = model_and_adapter("tiny-llava")
    with pytest.raises(FastVError, match="K=4 is out of range"):
        apply_fastv(model, FastVConfig(k=4))
    for bad in (1, 1.0, -0.1, "3/2", "abc"):
        with pytest.raises(FastVError, match="R must"):
            FastVConfig(k=1, ratio=bad)
    with pytest.raises(FastVError, match="K = 0"):
        FastVConfig(k=0, ratio=0.5, ranking="last")
    inputs = make_prompt(adapter, [5], num_images=1).model_inputs()
    with apply_fastv(model, FastVConfig(k=1, keep=65)):
        with pytest.raises(FastVError, match="keep=65 is more than the 64 image tokens"):
            _logits(model, inputs)


def test_batch_rows_with_different_image_counts(model_and_adapter):
    model, adapter = model_and_adapter("tiny-llava")
    p = make_prompt(adapter, [5, 5], num_images=1)
    ids = p.input_ids.clone()
    ids[1, ids[1] == adapter.image_token_ids()[0]] = 11  # row 1 loses its image
    with apply_fastv(model, FastVConfig(k=1)):
        with pytest.raises(FastVError, match="different numbers of image tokens"):
            model(input_ids=ids, attention_mask=p.attention_mask)


def test_unsupported_architecture_and_missing_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastv_export.presets import load_model
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=1))
    with pytest.raises(FastVError, match="unsupported architecture 'LlamaForCausalLM'.*LlavaForConditional"):
        apply_fastv(tiny, FastVConfig(k=0, ratio=0.5, ranking="random"))
    with pytest.raises(FastVError, match="neither a built-in preset"):
        load_model(tmp_path / "nope")
    tiny.config.architectures = ["LlamaForCausalLM"]
    tiny.save_pretrained(tmp_path / "llama")
    with pytest.raises(FastVError, match="unsupported architecture"):
        load_model(tmp_path / "llama")


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastv_export.cli import main
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=1, architectures=["LlamaForCausalLM"])).save_pretrained(llama)
    capsys.readouterr()  # save_pretrained's progress bar
    cases = [(["generate", "--k", "4"], "K=4 is out of range"),
             (["generate", "--r", "1"], "R must lie in [0, 1)"),
             (["generate", "--r", "-0.1"], "R must lie in [0, 1)"),
             (["generate", "--keep", "65"], "keep=65 is more than the 64 image tokens"),
             (["generate", "--model", str(tmp_path / "missing")], "neither a built-in preset"),
             (["generate", "--model", str(llama)], "unsupported architecture 'LlamaForCausalLM'")]
    for argv, message in cases:
        assert main(argv + ["--max-new-tokens", "1", "--repeats", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)


# ---- prompts with images of different sizes and videos: one candidate pool ---------------------------
MEDIA_PRESETS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-llava-onevision", "tiny-internvl"]
_QWEN_MEDIA = {
    "two-image-sizes": [Media("image", (224, 168)), Media("image", (112, 140))],
    "video": [Media("video", frames=8, fps=1.0)],
    "image-and-video": [Media("image", (112, 112)), Media("video", frames=6, fps=4.0)],
}
# Qwen3-VL: a video of 4 frames is 2 temporal patches of the exported 12 x 12 grid, each its own block after
# its timestamp text; images and video frames take DeepStack rows in position order (image, video, image)
_QWEN3_MEDIA = {
    "two-image-sizes": _QWEN_MEDIA["two-image-sizes"],
    "video": [Media("video", frames=4, fps=1.0)],
    "image-and-video": [Media("image"), Media("video", frames=4), Media("image", (112, 112))],
}
MEDIA = {"tiny-qwen2-vl": _QWEN_MEDIA, "tiny-qwen2.5-vl": _QWEN_MEDIA, "tiny-qwen3-vl": _QWEN3_MEDIA,
         "tiny-llava-onevision": {
    "two-image-sizes": [Media("image", (28, 56)), Media("image", (50, 40))],    # 2 and 4 anyres tiles
    "video": [Media("video", frames=6)],
    "image-and-video": [Media("image"), Media("video", frames=4)],
}, "tiny-internvl": {
    "two-image-sizes": [Media("image", (56, 112)), Media("image", (100, 60))],   # 3 and 7 tiles
    "video": [Media("video", frames=5)],
    "image-and-video": [Media("image"), Media("video", frames=3)],
}}
LAYOUTS = ["two-image-sizes", "video", "image-and-video"]


@pytest.mark.slow   # eager forward passes on every media layout of four families
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset_name", MEDIA_PRESETS)
def test_media_prompts_r0_identity_and_independent_computation(preset_name, layout, model_and_adapter):
    model, adapter = model_and_adapter(preset_name)
    eager, eager_adapter = model_and_adapter(preset_name, "eager")
    media = MEDIA[preset_name][layout]
    prompt = make_prompt(adapter, [5, 9], media=media, seed=11)
    inputs = prompt.model_inputs()
    ids = set(adapter.image_token_ids())
    tokens = sum(t in ids for m in media for t in adapter.media_prompt_tokens(m))
    base = _logits(model, inputs)
    with apply_fastv(model, FastVConfig(k=1, ratio=0)):
        assert torch.equal(_logits(model, inputs), base)
    for k, ratio, ranking in ((2, "1/2", "last"), (1, "9/10", "mean")):
        cfg = FastVConfig(k=k, ratio=ratio, ranking=ranking)
        ref_logits, ref_kept = independent_pruned_logits(eager, eager_adapter, inputs, k, ranking, cfg.keep_count,
                                                         set(adapter.image_token_ids()))
        with apply_fastv(eager, cfg) as h:
            logits = _logits(eager, inputs)
            assert h.candidates.shape[1] == tokens
        assert torch.equal(h.kept_positions, ref_kept)
        valid = torch.stack([prompt.attention_mask[r, ref_kept[r]] for r in range(2)]).bool()
        err = (logits - ref_logits).abs()[valid].max().item()
        assert err <= 1e-5, (k, ratio, ranking, err)


@pytest.mark.slow   # 16 recomputes per media layout of four families
@pytest.mark.parametrize("layout", ["two-image-sizes", "video"])
@pytest.mark.parametrize("preset_name", MEDIA_PRESETS)
def test_media_prompts_kv_cache_generation_equals_recompute(preset_name, layout, model_and_adapter):
    model, adapter = model_and_adapter(preset_name)
    prompt = make_prompt(adapter, [6], media=MEDIA[preset_name][layout], seed=12)
    inputs = prompt.model_inputs()
    steps, n = 16, prompt.input_ids.shape[1]
    # a generated image-token id would count as a placeholder in the recompute (the model refuses a
    # prompt with more placeholders than features): such ids are never generated here
    image_ids = list(adapter.image_token_ids())
    with apply_fastv(model, FastVConfig(k=2, ratio="1/2", ranking="mean")) as h, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, suppress_tokens=image_ids)
        seq, step_logits = out.sequences, torch.stack(out.logits, dim=1)      # raw logits, before suppression
        h.force_selection(h.kept_positions.clone())
        for t in range(steps):
            ids = seq[:, :n + t]
            full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids), **adapter.text_inputs(ids))
            logits = _logits(model, full)[:, -1]
            assert (logits - step_logits[:, t]).abs().max().item() <= 1e-4, t
            logits[:, image_ids] = float("-inf")
            assert int(logits.argmax(-1)) == int(seq[0, n + t])


def test_video_positions_follow_time_in_qwen2_5_vl(model_and_adapter):
    """Qwen2.5-VL spaces a video's temporal positions by tokens_per_second x seconds per temporal
    patch: the same video at another fps changes the model's output (so the prompts carry the fps)."""
    model, adapter = model_and_adapter("tiny-qwen2.5-vl")
    slow = make_prompt(adapter, [5], media=[Media("video", frames=8, fps=1.0)], seed=13).model_inputs()
    fast = dict(slow, second_per_grid_ts=slow["second_per_grid_ts"] / 4)
    assert not torch.allclose(_logits(model, slow), _logits(model, fast))


def test_media_errors_are_clear(model_and_adapter):
    _, llava = model_and_adapter("tiny-llava")
    _, qwen = model_and_adapter("tiny-qwen2.5-vl")
    with pytest.raises(FastVError, match="default-sized images only"):
        make_prompt(llava, [5], media=[Media("video", frames=4)])
    with pytest.raises(FastVError, match="multiples of 28 pixels"):
        make_prompt(qwen, [5], media=[Media("image", (100, 112))])
    with pytest.raises(FastVError, match="multiple of 2 frames"):
        make_prompt(qwen, [5], media=[Media("video", frames=5)])
    with pytest.raises(FastVError, match="one frame"):
        Media("image", frames=3)
    _, onevision = model_and_adapter("tiny-llava-onevision")
    with pytest.raises(FastVError, match="same number of frames"):
        make_prompt(onevision, [5], media=[Media("video", frames=4), Media("video", frames=6)])


def test_processed_image_is_one_vision_graph_input(preset, model_and_adapter, tmp_path):
    """A real image through the preset's front end (the processor its bundle carries) has the shape of one
    vision-graph call and encodes to the image-token count of the prompt."""
    from PIL import Image

    from fastv_export.frontend.processor import model_view
    from fastv_export.presets.serving import preset_frontend

    _, adapter = model_and_adapter(preset)
    if adapter.name == "llava_onevision":
        h, w = adapter.default_size()
    elif hasattr(adapter, "image_grid"):
        h = w = adapter.image_grid[1] * adapter.config.vision_config.patch_size
    elif hasattr(adapter, "tile"):
        h = w = adapter.tile                                               # one InternVL tile
    else:
        h, w = 50, 40                                                      # resized and cropped to the exported size
    Image.new("RGB", (w, h), (30, 60, 200)).save(tmp_path / "img.png")       # the size the bundle's graph takes
    processed = preset_frontend(preset, model_view(adapter)).process_image(str(tmp_path / "img.png"))
    px = processed.units[0]
    media = [Media()]
    unit = adapter.vision_units(media, adapter.media_inputs(media, torch.Generator().manual_seed(0)))[0]
    assert tuple(px.shape) == tuple(unit.shape)
    with torch.no_grad():
        assert adapter.encode_image(torch.from_numpy(px).float()).shape[0] == adapter.image_tokens_per_image()
    assert processed.count == adapter.image_tokens_per_image()


# ---- Qwen3-VL DeepStack: K inside the DeepStack layers (tiny-qwen3-vl injects after layers 0 and 1) ----
QWEN3_VIDEO_AND_IMAGE = [Media("video", frames=4), Media("image")]


@pytest.mark.parametrize("media", [None, QWEN3_VIDEO_AND_IMAGE], ids=["two-images", "video-and-image"])
@pytest.mark.parametrize("ranking", ["last", "mean"])
def test_deepstack_k_inside_kv_cache_generation_equals_recompute(ranking, media, model_and_adapter):
    model, adapter = model_and_adapter("tiny-qwen3-vl")
    assert adapter.deepstack_layers() == 2
    prompt = make_prompt(adapter, [5, 8], num_images=2, seed=21, media=media)
    inputs = prompt.model_inputs()
    steps = 16
    with apply_fastv(model, FastVConfig(k=1, ratio="1/2", ranking=ranking)) as h:
        seq, step_logits = _greedy(model, inputs, steps)
        h.force_selection(h.kept_positions.clone())
        n = prompt.input_ids.shape[1]
        for t in range(steps):
            ids = seq[:, :n + t]
            mask = torch.cat([prompt.attention_mask, torch.ones(ids.shape[0], t, dtype=torch.long)], dim=1)
            full = dict(inputs, input_ids=ids, attention_mask=mask, **adapter.text_inputs(ids))
            logits = _logits(model, full)[:, -1]
            assert (logits - step_logits[:, t]).abs().max().item() <= 1e-4, t
            assert torch.equal(logits.argmax(-1), seq[:, n + t])


@pytest.mark.parametrize("media", [None, [Media("image"), *QWEN3_VIDEO_AND_IMAGE]],
                         ids=["image", "image-video-image"])
def test_deepstack_k_inside_equals_hf_model_on_hand_pruned_layers(media, model_and_adapter):
    """K = 1: layer 0 runs on all tokens (its DeepStack rows on every visual position), layers 1..3 run
    on the kept tokens and the unmodified HF text model injects the kept positions' rows, picked here by
    position, into layer 1. Computed by calling the HF text model on the hand-pruned hidden states with a
    hand-pruned visual mask and rows (its own loop and injection), so no FastV code is involved. With a
    video between two images, HF's rows interleave image and video features in position order."""
    model, adapter = model_and_adapter("tiny-qwen3-vl", "eager")
    prompt = make_prompt(adapter, [6], num_images=1, seed=22, media=media)
    inputs = prompt.model_inputs()
    cfg = FastVConfig(k=1, ratio="2/3", ranking="last")
    with apply_fastv(model, cfg) as h:
        logits = _logits(model, inputs)
        kept = h.kept_positions[0].tolist()
    text = adapter.text_model()
    seen = {}
    hooks = [text.register_forward_pre_hook(lambda m, a, kw: seen.update(text=kw), with_kwargs=True),
             text.layers[1].register_forward_pre_hook(
                 lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"]), with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    vmask, rows = seen["text"]["visual_pos_masks"][0], seen["text"]["deepstack_visual_embeds"]
    visual = [p for p in range(vmask.shape[0]) if bool(vmask[p])]
    kept_visual = [p for p in kept if p in visual]
    # a stand-in "layer 0" that returns the captured layer-1 input at the kept positions; the HF loop then
    # injects level 0 (all zero here: layer 0's injection is already in the captured states) and level 1
    pruned_rows = [torch.zeros(len(kept_visual), rows[0].shape[1]),
                   torch.stack([rows[1][visual.index(p)] for p in kept_visual])]
    layer0 = text.layers[0]
    captured = seen["hidden"][:, kept]

    class Replay(torch.nn.Module):
        def forward(self, hidden_states, *a, **kw):
            return captured

    pos = seen["text"]["position_ids"][:, :, kept]
    text.layers[0] = Replay()
    try:
        with torch.no_grad():
            out = text(inputs_embeds=captured, position_ids=pos, attention_mask=None, use_cache=False,
                       visual_pos_masks=torch.tensor([[p in kept_visual for p in kept]]),
                       deepstack_visual_embeds=pruned_rows).last_hidden_state
            expected = adapter.lm_head()(out)
    finally:
        text.layers[0] = layer0
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-5


def test_deepstack_rows_matter(model_and_adapter):
    model, adapter = model_and_adapter("tiny-qwen3-vl")
    inputs = make_prompt(adapter, [6], num_images=1, seed=23).model_inputs()
    text = adapter.text_model()
    with torch.no_grad():
        base = model(**inputs, use_cache=False).logits
        text._deepstack_process = lambda hidden, mask, rows: hidden    # no DeepStack at all
        try:
            without = model(**inputs, use_cache=False).logits
        finally:
            del text._deepstack_process
    assert (base - without).abs().max().item() > 1e-2


def test_qwen3_video_prompt_has_the_processor_layout(model_and_adapter):
    """A Qwen3-VL video of 6 frames at 2 fps (3 temporal patches at 0.25, 1.25 and 2.25 s): per temporal
    patch, 3 timestamp text ids (different per patch, plain text ids), vision_start, the 36 video tokens of
    one 12 x 12 frame, vision_end; video_grid_thw is one row (3, 12, 12) per video, as the model takes it."""
    from fastv_export.prompts import TEXT_TOKEN_RANGE

    model, adapter = model_and_adapter("tiny-qwen3-vl")
    c = model.config
    tokens = adapter.media_prompt_tokens(Media("video", frames=6, fps=2.0))
    block = 3 + 1 + 36 + 1
    assert len(tokens) == 3 * block
    stamps = [tokens[i * block:i * block + 3] for i in range(3)]
    for i in range(3):
        frame = tokens[i * block + 3:(i + 1) * block]
        assert frame == [c.vision_start_token_id] + [c.video_token_id] * 36 + [c.vision_end_token_id]
    assert len({tuple(s) for s in stamps}) == 3
    assert all(TEXT_TOKEN_RANGE[0] <= t < TEXT_TOKEN_RANGE[1] for s in stamps for t in s)
    inputs = adapter.media_inputs([Media("video", frames=6)], torch.Generator().manual_seed(0))
    assert inputs["video_grid_thw"].tolist() == [[3, 12, 12]]
    with pytest.raises(FastVError, match="multiple of 2 frames"):
        make_prompt(adapter, [5], media=[Media("video", frames=5)])
