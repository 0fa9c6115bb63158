"""fastv_export.runtime (OrtRunner, generate, encode_images) and the `run` command: generation driven
by manifest.json alone (plain onnxruntime), `run` from a PNG through the front end (a preset's serving
files, the trained demo's answers, a checkpoint's tokenizer), and bad run arguments.

All but the first test drive an exported bundle (the session's ``exported_bundle`` fixture, or an
export of their own), hence slow."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastv_export import FastVConfig
from fastv_export.bundle import load_bundle
from fastv_export.cli import main as cli
from fastv_export.errors import FastVError
from fastv_export.prompts import make_prompt
from tests.helpers import run_cli


def test_candidates_and_image_shapes_are_checked_before_any_graph_runs():
    """No bundle needed: every image token of a row is a candidate (one pool, ascending), rows must
    agree on their number, and pixel values of another shape than the manifest's vision input are
    refused before the vision graph runs."""
    from fastv_export.bundle import Bundle
    from fastv_export.runtime.generate import encode_images, find_candidates
    from fastv_export.runtime.runner import Runner

    ids = np.array([[1, 7, 7, 2, 7], [7, 3, 7, 7, 4]])
    np.testing.assert_array_equal(find_candidates(ids, [7]), [[1, 2, 4], [0, 2, 3]])
    with pytest.raises(FastVError, match="different numbers of image tokens"):
        find_candidates(np.array([[7, 1], [1, 1]]), [7])

    class NoGraphs(Runner):
        def infer(self, graph, feeds):
            raise AssertionError(f"{graph} must not run")

    runner = NoGraphs(Bundle(Path("unused"), {"precision": "fp32", "source_model": {"hidden_size": 8},
                                              "image_tokens": {"vision_input": {"shape": [1, 3, 32, 32]}}}))
    with pytest.raises(FastVError, match=r"this bundle's vision graph takes \[1, 3, 32, 32\]"):
        encode_images(runner, [np.zeros((1, 3, 40, 40), np.float32)])
    no_images = encode_images(runner, [])
    assert no_images.shape == (0, 8) and no_images.dtype == np.float32


@pytest.mark.slow
def test_manifest_alone_drives_generation(exported_bundle, model_and_adapter):
    """Plain onnxruntime calls driven by manifest.json only (no fastv_export runtime objects)."""
    import onnxruntime as ort

    path = exported_bundle("tiny-llava", 2, "1/2")
    man = json.loads((path / "manifest.json").read_text())
    sess = {g: ort.InferenceSession(str(path / d["file"])) for g, d in man["graphs"].items()}
    model, adapter = model_and_adapter("tiny-llava")
    prompt = make_prompt(adapter, [9], num_images=1, seed=5)
    ids = prompt.input_ids.numpy()
    mask = np.ones_like(ids)
    kv = man["kv_cache"]
    k, layers = man["fastv"]["k"], man["source_model"]["num_layers"]

    def empty(rng):
        z = np.zeros((1, kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
        return {f"past_key_values.{i}.{t}": z for i in rng for t in ("key", "value")}

    feats = sess["vision"].run(None, {"pixel_values": prompt.vision["pixel_values"].numpy()})[0]
    emb = sess["embed"].run(None, {"input_ids": ids, "image_features": feats})[0]
    pos = (np.cumsum(mask, 1) - 1).astype(np.int64)                 # manifest positions.prefill rule
    cands = np.nonzero(np.isin(ids[0], man["image_tokens"]["token_ids"]))[0][None].astype(np.int64)
    names = [o.name for o in sess["pre_k"].get_outputs()]
    o = dict(zip(names, sess["pre_k"].run(None, {"inputs_embeds": emb, "attention_mask": mask, "position_ids": pos,
                                                 "candidate_positions": cands, **empty(range(k))})))
    pre_past = {n.replace("present", "past_key_values"): v for n, v in o.items() if n.startswith("present")}
    post_mask = mask[:, o["kept_indices"][0]]
    pnames = [x.name for x in sess["post_k"].get_outputs()]
    r = dict(zip(pnames, sess["post_k"].run(None, {"hidden_states": o["hidden_states"], "attention_mask": post_mask,
                                                   "position_ids": o["selected_position_ids"],
                                                   **empty(range(k, layers))})))
    tokens = []
    for step in range(12):
        nxt = int(r["logits"][0, -1].argmax())
        tokens.append(nxt)
        post_past = {n.replace("present", "past_key_values"): v for n, v in r.items() if n.startswith("present")}
        e = sess["embed"].run(None, {"input_ids": np.array([[nxt]]), "image_features": np.zeros((0, feats.shape[1]),
                                                                                                np.float32)})[0]
        mask = np.concatenate([mask, [[1]]], 1)
        post_mask = np.concatenate([post_mask, [[1]]], 1)
        p = np.array([[pos.max() + 1 + step]], dtype=np.int64)            # manifest positions.decode rule
        o = dict(zip(names, sess["pre_k"].run(None, {"inputs_embeds": e, "attention_mask": mask, "position_ids": p,
                                                     "candidate_positions": np.zeros((1, 0), np.int64), **pre_past})))
        pre_past = {n.replace("present", "past_key_values"): v for n, v in o.items() if n.startswith("present")}
        r = dict(zip(pnames, sess["post_k"].run(None, {"hidden_states": o["hidden_states"],
                                                       "attention_mask": post_mask,
                                                       "position_ids": o["selected_position_ids"], **post_past})))
    from fastv_export import apply_fastv
    model.generation_config.eos_token_id, eos = None, model.generation_config.eos_token_id
    try:
        with apply_fastv(model, FastVConfig(k=2, ratio="1/2")), torch.no_grad():
            ref = model.generate(**prompt.model_inputs(), max_new_tokens=12, do_sample=False)
    finally:
        model.generation_config.eos_token_id = eos
    assert tokens == ref[0, ids.shape[1]:].tolist()


@pytest.mark.slow
def test_image_of_the_wrong_size_is_rejected(exported_bundle):
    from fastv_export.errors import FastVError
    from fastv_export.runtime.generate import encode_images
    from fastv_export.runtime.ort import OrtRunner
    rt = OrtRunner(load_bundle(exported_bundle("tiny-llava", 2, "1/2")))
    with pytest.raises(FastVError, match="this bundle's vision graph takes"):
        encode_images(rt, [np.zeros((1, 3, 40, 40), np.float32)])


# ---- the run command ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_run_arguments(exported_bundle, tmp_path, capsys):
    good = exported_bundle("tiny-llava", 2, "1/2")
    png = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png)
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    checks = [
        (["run", str(good), "--image", str(png), "--prompt", "  "], "--prompt is empty"),
        (["run", str(good), "--image", str(not_image), "--prompt", "hi"], "cannot be read as an image"),
        (["run", str(good), "--image", str(tmp_path / "none.png"), "--prompt", "hi"], "does not exist"),
    ]
    for argv, message in checks:
        rc, err = run_cli(capsys, argv)
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_run_generates_from_a_png(exported_bundle, tmp_path, capsys):
    from PIL import Image
    png = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(png)
    rc = cli(["run", str(exported_bundle("tiny-llava", 2, "1/2")), "--image", str(png), "--prompt", "What is it?",
              "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "tokens:" in out and "kept" in out


WORDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "USER:": 10, "ASSISTANT:": 11, "what": 12, "is": 13, "it": 14, "?": 15,
         "<image>": 500}


def _checkpoint_with_tokenizer(root: Path) -> Path:
    """tiny-llava saved as a local checkpoint with a word-level tokenizer built in code (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastv_export.presets import load_model

    path = root / "ckpt"
    load_model("tiny-llava").save_pretrained(path)
    tok = Tokenizer(models.WordLevel(WORDS, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            additional_special_tokens=["<image>"]).save_pretrained(path)
    return path


@pytest.mark.slow
def test_run_uses_the_checkpoint_tokenizer_and_places_images_at_the_mark(tmp_path, capsys, model_and_adapter):
    from PIL import Image

    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.ort import OrtRunner
    ckpt = _checkpoint_with_tokenizer(tmp_path)
    out = tmp_path / "bundle"
    assert cli(["export", "--model", str(ckpt), "--k", "2", "--r", "1/2", "--out", str(out)]) == 0
    text = (out / "manifest.json").read_text()
    source = json.loads(text)["source_model"]
    assert str(tmp_path) not in text                        # no absolute path of this machine in the manifest
    assert source["name"] == ckpt.name and (out / source["checkpoint"]).resolve() == ckpt.resolve()
    png = tmp_path / "img.png"
    Image.new("RGB", (50, 40), (30, 60, 200)).save(png)
    capsys.readouterr()
    rc = cli(["run", str(out), "--image", str(png), "--prompt", "USER: <image> what is it ? ASSISTANT:",
              "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    # the prompt built by hand from the vocabulary: USER:, 64 image tokens, the words (no chat template: the text as
    # written; no BOS: this tokenizer adds none, as its processor's call would not either)
    ids = np.array([[10] + [500] * 64 + [12, 13, 14, 15, 11]], dtype=np.int64)
    # the checkpoint has no image processor config: the family's CLIP processor for the exported size (HF's class)
    from transformers import CLIPImageProcessorPil

    side = load_bundle(out).vision_input_shape[-1]
    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    pixels = processor(images=Image.open(png).convert("RGB"), return_tensors="np")["pixel_values"]
    gen = generate(OrtRunner(load_bundle(out)), ids, np.ones_like(ids), [pixels], 6, eos_token_id=2)
    assert f"prompt: {ids.shape[1]} tokens" in printed
    assert f"tokens: {gen.tokens[0].tolist()}" in printed
    rc, err = run_cli(capsys, ["run", str(out), "--image", str(png), "--prompt", "<image> and <image>"])
    assert rc == 2 and "2 image placeholder(s) (<image>) but 1 image(s)" in err
    # the bundle moved away and its checkpoint deleted: it serves from its own files, the same tokens
    moved = tmp_path / "elsewhere" / "bundle"
    moved.parent.mkdir()
    out.rename(moved)
    shutil.rmtree(ckpt)
    argv = ["run", str(moved), "--image", str(png), "--prompt", "USER: <image> what is it ? ASSISTANT:",
            "--max-new-tokens", "6"]
    assert cli(argv) == 0
    assert f"tokens: {gen.tokens[0].tolist()}" in capsys.readouterr().out
    rc, err = run_cli(capsys, argv + ["--model", str(tmp_path / "elsewhere")])     # --model: a dir without files
    assert rc == 2 and "holds no tokenizer files" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_a_repeated_decode_state_decodes_every_row_as_the_single_prompt(exported_bundle, model_and_adapter):
    """DecodeState.repeat (batch-decode benchmarks): one prefill's caches repeated to 3 rows decode to the
    same tokens in every row as the single prompt's own generation, and the caches grow by one token a step."""
    from fastv_export.runtime.generate import decode, generate
    from fastv_export.runtime.ort import OrtRunner
    from fastv_export.validate import _images

    bundle = load_bundle(exported_bundle("tiny-qwen2.5-vl", 2, "1/2"))
    _, adapter = model_and_adapter("tiny-qwen2.5-vl")
    prompt = make_prompt(adapter, [7], num_images=1)
    ids, mask = prompt.input_ids.numpy(), prompt.attention_mask.numpy()
    runner = OrtRunner(bundle)
    whole = generate(runner, ids, mask, _images(prompt, adapter), 8)
    state = generate(runner, ids, mask, _images(prompt, adapter), 1).state.repeat(3)
    kept = whole.kept.shape[1]
    tokens, _ = decode(runner, state, 8)
    assert np.stack(tokens, axis=1).tolist() == [whole.tokens[0].tolist()] * 3
    assert state.positions.shape == (3, 3, ids.shape[1]) and state.post_mask.shape == (3, kept + 7)
    assert all(v.shape[0] == 3 and v.shape[2] == kept + 7 for v in state.post_past.values())


# ---- sampling and the per-token callback -----------------------------------------------------------------
@pytest.mark.slow
def test_sampler_and_per_token_callback_in_generate(exported_bundle, model_and_adapter):
    """generate(..., sampler, on_token) on a bundle (batch 2): temperature 0 gives the greedy tokens; a seeded
    sampler's tokens are those a fresh sampler of the same seed draws from the returned step logits; the
    callback sees exactly the tokens returned, in order; returning True stops after that token and the
    tokens are the prefix of the full generation."""
    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.ort import OrtRunner
    from fastv_export.runtime.sampling import Sampler, SamplingParams
    from fastv_export.validate import _images

    runner = OrtRunner(load_bundle(exported_bundle("tiny-llava", 2, "1/2")))
    _, adapter = model_and_adapter("tiny-llava")
    prompt = make_prompt(adapter, [9, 12], num_images=1, seed=3)
    ids, mask, images = prompt.input_ids.numpy(), prompt.attention_mask.numpy(), _images(prompt, adapter)

    greedy = generate(runner, ids, mask, images, 8)
    zero = generate(runner, ids, mask, images, 8, sampler=Sampler(SamplingParams(temperature=0.0, seed=9), 2))
    assert np.array_equal(zero.tokens, greedy.tokens)
    assert greedy.tokens.tolist() == np.stack([x.argmax(-1) for x in greedy.step_logits], axis=1).tolist()

    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=11)
    seen: list[tuple[int, list[int]]] = []
    full = generate(runner, ids, mask, images, 8, sampler=Sampler(params, 2),
                    on_token=lambda step, tok: seen.append((step, tok.tolist())))
    assert seen == [(i, full.tokens[:, i].tolist()) for i in range(8)]
    again = Sampler(params, 2)
    assert full.tokens.tolist() == np.stack([again(x) for x in full.step_logits], axis=1).tolist()
    assert not np.array_equal(full.tokens, greedy.tokens)       # sampling at temperature 1.5 left the greedy path

    calls = []
    stopped = generate(runner, ids, mask, images, 8, sampler=Sampler(params, 2),
                       on_token=lambda step, tok: calls.append(step) or step == 2)
    assert calls == [0, 1, 2] and stopped.tokens.tolist() == full.tokens[:, :3].tolist()
    assert len(stopped.step_logits) == 3

    # several end-of-sequence ids (a generation config's list): each row stops at the first of any of them,
    # then pads; an id that never comes changes nothing
    first, third = int(greedy.tokens[0, 0]), int(greedy.tokens[1, 2])
    ends = generate(runner, ids, mask, images, 8, eos_token_id=[first, third])
    want = [row[:next(i for i, t in enumerate(row) if t in (first, third)) + 1] for row in greedy.tokens.tolist()]
    for got, w in zip(ends.tokens.tolist(), want):
        assert got[:len(w)] == w and set(got[len(w):]) <= {runner.bundle.pad_token_id}
    unused = next(t for t in range(1000) if t not in greedy.tokens)
    assert np.array_equal(generate(runner, ids, mask, images, 8, eos_token_id=[unused]).tokens, greedy.tokens)


# ---- the trained demo through `run`: its words, its answers ------------------------------------------------
@pytest.mark.slow
def test_run_gives_the_trained_demo_its_answers(exported_bundle, tmp_path, capsys):
    """tiny-llava-shapes' bundle served like any other: a PNG of a held-out sample and its question in the demo's
    words (the chat template renders ``<image> question``) make exactly the prompt the model was trained on
    (``<s>``, 64 image tokens, the words), and `run` answers what the reference FastV (the bundle's K and R)
    answers from the same pixels, which are the trained answers on most questions."""
    from PIL import Image

    from fastv_export.presets import demo, load_model, shapes
    from fastv_export.reference.fastv import apply_fastv

    bundle = exported_bundle("tiny-llava-shapes", 2, "1/2")
    model = load_model("tiny-llava-shapes")
    samples = [shapes.make_sample(shapes.TEST_SEED_OFFSET + i, kind) for i, kind in
               enumerate(["colour", "count", "where", "colour", "count", "where"])]
    right = 0
    for i, s in enumerate(samples + [samples[0]]):
        question = s.question if i < len(samples) else "what colour at row 1 col 2 ?"
        rgb = (np.clip(s.pixels.transpose(1, 2, 0) * shapes.CLIP_STD + shapes.CLIP_MEAN, 0, 1) * 255).round()
        png = tmp_path / f"{i}.png"
        Image.fromarray(rgb.astype(np.uint8)).save(png)
        capsys.readouterr()
        assert cli(["run", str(bundle), "--image", str(png), "--prompt", question, "--max-new-tokens", "6",
                    "--json"]) == 0
        row = json.loads(capsys.readouterr().out)["rows"][0]
        prompt = [shapes.BOS_ID] + [shapes.IMAGE_ID] * shapes.IMAGE_TOKENS + shapes.encode(question)
        assert row["prompt_tokens"] == len(prompt)
        # the reference: the same prompt ids, the PNG's pixels normalised independently of the front end
        pixels = shapes.normalise(rgb.astype(np.float32) / 255.0)
        sample = shapes.Sample(s.seed, s.kind, pixels, prompt, [])
        with apply_fastv(model, FastVConfig(k=2, ratio="1/2")):
            want = demo.greedy_answers(model, [sample])[0]
        assert row["tokens"] == want, (question, row, want)
        assert row["text"] == " ".join(shapes.VOCAB[t] for t in want if t != shapes.EOS_ID)
        right += i < len(samples) and want == s.answer
    assert right >= 4, right                                   # the trained answers, on most held-out questions
