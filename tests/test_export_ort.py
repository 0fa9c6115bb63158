"""Export -> ONNX Runtime -> validation against the PyTorch reference (issue 4 acceptance).

Exports take ~10-20 s each on 2 cores, so CI runs a pairwise cover of the acceptance matrix
(every preset, ranking, K in {1, 2, last} and R in {0, 1/2, 3/4, 9/10} appear); the full matrix
runs with scripts/validate_matrix.py."""
from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fastv_export import FastVConfig
from fastv_export.bundle import load_bundle, sha256
from fastv_export.cli import main as cli
from fastv_export.export.onnx_export import ExportOptions, export_bundle
from fastv_export.prompts import make_prompt
from fastv_export.validate import validate_bundle

from .conftest import model_and_adapter

ROOT = Path(__file__).resolve().parent.parent / ".test-bundles"


@functools.lru_cache(maxsize=None)
def bundle(model: str, k: int, ratio: str, ranking: str = "last", dtype: str = "fp32") -> Path:
    ROOT.mkdir(exist_ok=True)
    out = ROOT / f"{model}-k{k}-r{ratio.replace('/', '_')}-{ranking}-{dtype}"
    export_bundle(out, FastVConfig(k=k, ratio=ratio, ranking=ranking),
                  ExportOptions(model=model, dtype=dtype, force=True))
    return out


PAIRWISE = [  # (model, K, R, ranking)
    ("tiny-llava", 2, "1/2", "last"),
    ("tiny-llava", 1, "9/10", "mean"),
    ("tiny-llava", 3, "3/4", "last"),
    ("tiny-qwen2-vl", 2, "3/4", "mean"),
    ("tiny-qwen2-vl", 1, "1/2", "last"),
    ("tiny-qwen2-vl", 3, "9/10", "mean"),
    ("tiny-qwen2-vl", 2, "0", "last"),
]


@pytest.mark.parametrize("model,k,ratio,ranking", PAIRWISE)
def test_export_then_validate_passes(model, k, ratio, ranking):
    path = bundle(model, k, ratio, ranking)
    for name in ("vision.onnx", "embed.onnx", "pre_k.onnx", "post_k.onnx"):
        onnx.checker.check_model(str(path / name), full_check=True)
    report = validate_bundle(path, max_new_tokens=32, batch_sizes=(1, 3))
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]
    for case in report["cases"]:
        assert case["tokens_identical"] and case["max_logits_error"] <= 1e-4


def test_pre_k_holds_one_token_select_with_function_body():
    m = onnx.load(str(bundle("tiny-llava", 2, "1/2") / "pre_k.onnx"))
    nodes = [n for n in m.graph.node if n.op_type == "TokenSelect"]
    assert len(nodes) == 1 and nodes[0].domain == "fastv"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"fastv" and attrs["plugin_version"] == b"1"
    assert any(f.name == "TokenSelect" and f.domain == "fastv" for f in m.functions)
    names = [i.name for i in m.graph.input]
    assert names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names and "candidate_positions" in names
    post = onnx.load(str(bundle("tiny-llava", 2, "1/2") / "post_k.onnx"))
    assert [i.name for i in post.graph.input][3] == "past_key_values.2.key"   # the model's own layer index
    assert post.graph.output[0].name == "logits"


def test_manifest_names_every_dynamic_dim():
    """Each graph's I/O reads in the manifest as batch / seq / kept_seq / past_seq / total_seq, with
    no exporter symbols (s0, s1 + s2) left, and post-K returns the last position's logits only."""
    m = json.loads((bundle("tiny-llava", 2, "1/2") / "manifest.json").read_text())
    shapes = {(g, io["name"]): io["shape"] for g, d in m["graphs"].items() for io in d["inputs"] + d["outputs"]}
    leftovers = {key: s for key, s in shapes.items() if any(re.search(r"\bs\d+", str(d)) for d in s)}
    assert not leftovers, leftovers
    vocab = m["source_model"]["vocab_size"]
    assert shapes[("post_k", "logits")] == ["batch", 1, vocab]
    assert shapes[("pre_k", "hidden_states")][:2] == ["batch", "kept_seq"]
    assert shapes[("post_k", "hidden_states")][:2] == ["batch", "seq"]
    assert shapes[("post_k", "present.3.value")][2] == "total_seq" == shapes[("post_k", "attention_mask")][1]
    assert shapes[("embed", "inputs_embeds")][:2] == ["batch", "seq"]


def test_r0_export_gives_the_unmodified_models_tokens():
    path = bundle("tiny-qwen2-vl", 2, "0")
    model, adapter = model_and_adapter("tiny-qwen2-vl")
    prompt = make_prompt(adapter, [12], num_images=1, seed=1)
    from fastv_export.runtime.ort import OrtRuntime
    rt = OrtRuntime(load_bundle(path))
    px = prompt.vision["pixel_values"].numpy()
    gen = rt.generate(prompt.input_ids.numpy(), prompt.attention_mask.numpy(), [px], 16)
    model.generation_config.eos_token_id, eos = None, model.generation_config.eos_token_id
    try:
        with torch.no_grad():
            ref = model.generate(**prompt.model_inputs(), max_new_tokens=16, do_sample=False)
    finally:
        model.generation_config.eos_token_id = eos
    assert np.array_equal(gen.tokens, ref[:, prompt.input_ids.shape[1]:].numpy())


def test_fp16_export_validates_within_stated_tolerance():
    path = bundle("tiny-llava", 2, "1/2", "last", "fp16")
    report = validate_bundle(path, max_new_tokens=16, batch_sizes=(1,))
    assert report["precision"] == "fp16" and report["tolerances"]["logits"] == 1e-1
    assert report["passed"], json.dumps(report["cases"], indent=1)[:3000]


def _copy(src: Path, tmp_path: Path, name: str = "b") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("validation"))
    return dst


def _rewrite_checksum(path: Path, file: str) -> None:
    man = json.loads((path / "manifest.json").read_text())
    man["files"][file] = {"sha256": sha256(path / file), "bytes": (path / file).stat().st_size}
    (path / "manifest.json").write_text(json.dumps(man))


def test_a_perturbed_post_k_weight_fails_validation(tmp_path):
    path = _copy(bundle("tiny-llava", 2, "1/2"), tmp_path)
    m = onnx.load(str(path / "post_k.onnx"))
    init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.05
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(path / "post_k.onnx"))
    _rewrite_checksum(path, "post_k.onnx")          # a consistent bundle with one wrong weight
    report = validate_bundle(path, max_new_tokens=8, batch_sizes=(1,))
    assert not report["passed"]
    assert not report["cases"][0]["graphs"]["post_k"]["passed"]
    assert cli(["validate", str(path), "--max-new-tokens", "4", "--batch-sizes", "1"]) == 1


def test_a_borderline_swap_is_reported_and_the_forced_selection_passes(tmp_path, monkeypatch):
    """Ties constructed in the reference scores (zero key projection in layer K-1: uniform
    attention); the graphs are made to keep a different tied candidate. Validation must report the
    swap as borderline and pass on the forced-selection rerun."""
    from fastv_export import runtime_ort
    from fastv_export.presets import build_preset

    path = bundle("tiny-llava", 2, "1/2")
    model = build_preset("tiny-llava")
    layer = model.model.language_model.layers[1].self_attn
    with torch.no_grad():
        layer.k_proj.weight.zero_()
    monkeypatch.setattr("fastv_export.validate.load_model", lambda *a, **k: model)
    original = runtime_ort.OrtRuntime.generate

    def swapped(self, input_ids, attention_mask, images, max_new_tokens, forced_kept=None, **kw):
        if forced_kept is None:
            cands = self.candidates(input_ids)
            m = cands.shape[1]
            keep = m - m // 2
            kept = np.sort(np.concatenate([np.setdiff1d(np.arange(input_ids.shape[1]), cands[0]),
                                           cands[0, :keep - 1], cands[0, keep:keep + 1]]))[None]
            kept = np.repeat(kept, input_ids.shape[0], axis=0)
            return original(self, input_ids, attention_mask, images, max_new_tokens, forced_kept=kept, **kw)
        return original(self, input_ids, attention_mask, images, max_new_tokens, forced_kept=forced_kept, **kw)

    monkeypatch.setattr(runtime_ort.OrtRuntime, "generate", swapped)
    # the graphs were exported from the unmodified weights: re-export pre_k from this model
    from fastv_export.export.onnx_export import export_graphs
    from fastv_export.adapters import get_adapter
    tmp = _copy(path, tmp_path)
    eager = build_preset("tiny-llava", attn_implementation="eager")
    with torch.no_grad():
        eager.model.language_model.layers[1].self_attn.k_proj.weight.zero_()
    export_graphs(get_adapter(eager), FastVConfig(k=2, ratio="1/2"), torch.float32, tmp, 18)
    for f in ("vision.onnx", "embed.onnx", "pre_k.onnx", "post_k.onnx"):
        _rewrite_checksum(tmp, f)
    report = validate_bundle(tmp, max_new_tokens=8, batch_sizes=(1,))
    case = report["cases"][0]
    assert not case["selection_identical"]
    assert {s["kept_by"] for s in case["borderline_swaps"]} == {"reference", "graphs"}
    assert case["forced_tokens_identical"] and case["forced_max_logits_error"] <= 1e-4
    assert report["passed"]


def test_manifest_alone_drives_generation():
    """Plain onnxruntime calls driven by manifest.json only (no fastv_export runtime objects)."""
    import onnxruntime as ort

    path = bundle("tiny-llava", 2, "1/2")
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


# ---- bad input: one clear line, non-zero exit, nothing written --------------------------------------
def _run_cli(capsys, argv):
    capsys.readouterr()   # drop what earlier steps (e.g. a bundle export's progress bar) printed
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_bad_bundles_fail_with_one_line(tmp_path, capsys):
    good = bundle("tiny-llava", 2, "1/2")
    cases = {}
    b = _copy(good, tmp_path, "missing")
    (b / "post_k.onnx").unlink()
    cases["missing"] = (b, "post_k.onnx is missing")
    b = _copy(good, tmp_path, "truncated")
    data = (b / "pre_k.onnx").read_bytes()
    (b / "pre_k.onnx").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (b, "truncated")
    b = _copy(good, tmp_path, "truncated_rehashed")
    (b / "pre_k.onnx").write_bytes(data[: len(data) // 2])
    _rewrite_checksum(b, "pre_k.onnx")
    cases["truncated_rehashed"] = (b, "not a readable ONNX file")
    b = _copy(good, tmp_path, "checksum")
    raw = bytearray((b / "embed.onnx").read_bytes())
    raw[-1] ^= 1
    (b / "embed.onnx").write_bytes(bytes(raw))
    cases["checksum"] = (b, "sha256 does not match")
    b = _copy(good, tmp_path, "schema")
    man = json.loads((b / "manifest.json").read_text())
    man["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(man))
    cases["schema"] = (b, "'schema_version' is 99")
    for what, (path, message) in cases.items():
        before = sorted(p.name for p in path.iterdir())
        rc, err = _run_cli(capsys, ["validate", str(path), "--max-new-tokens", "2", "--batch-sizes", "1"])
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (what, err)
        assert sorted(p.name for p in path.iterdir()) == before, what


def test_bad_run_and_export_arguments(tmp_path, capsys):
    good = bundle("tiny-llava", 2, "1/2")
    png = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png)
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    checks = [
        (["run", str(good), "--image", str(png), "--prompt", "  "], "--prompt is empty"),
        (["run", str(good), "--image", str(not_image), "--prompt", "hi"], "cannot be read as an image"),
        (["run", str(good), "--image", str(tmp_path / "none.png"), "--prompt", "hi"], "does not exist"),
        (["export", "--k", "9", "--out", str(tmp_path / "o1")], "K=9 is out of range"),
        (["export", "--r", "1.5", "--out", str(tmp_path / "o2")], "R must lie in [0, 1)"),
        (["export", "--out", str(good)], "already exists; pass --force"),
        (["export", "--out", str(tmp_path / "no" / "such" / "dir")], "does not exist"),
        (["export", "--out", "/proc/fastv-bundle"], "cannot write"),   # unwritable even for root
    ]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    import os
    if os.geteuid() != 0:  # root ignores directory permissions
        checks.append((["export", "--out", str(ro / "b")], "cannot write"))
    for argv, message in checks:
        rc, err = _run_cli(capsys, argv)
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_run_generates_from_a_png(tmp_path, capsys):
    from PIL import Image
    png = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(png)
    rc = cli(["run", str(bundle("tiny-llava", 2, "1/2")), "--image", str(png), "--prompt", "What is it?",
              "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "tokens:" in out and "kept" in out


def test_image_of_the_wrong_size_is_rejected():
    from fastv_export.errors import FastVError
    from fastv_export.runtime.ort import OrtRuntime
    rt = OrtRuntime(load_bundle(bundle("tiny-llava", 2, "1/2")))
    with pytest.raises(FastVError, match="this bundle's vision graph takes"):
        rt.image_features([np.zeros((1, 3, 40, 40), np.float32)])


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


def test_run_uses_the_checkpoint_tokenizer_and_places_images_at_the_mark(tmp_path, capsys):
    from PIL import Image

    from fastv_export.runtime.ort import OrtRuntime
    ckpt = _checkpoint_with_tokenizer(tmp_path)
    out = tmp_path / "bundle"
    assert cli(["export", "--model", str(ckpt), "--k", "2", "--r", "1/2", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["source_model"]["name"] == str(ckpt.resolve())
    png = tmp_path / "img.png"
    Image.new("RGB", (50, 40), (30, 60, 200)).save(png)
    capsys.readouterr()
    rc = cli(["run", str(out), "--image", str(png), "--prompt", "USER: <image> what is it ? ASSISTANT:",
              "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    # the prompt built by hand from the vocabulary: BOS, USER:, 64 image tokens, the words
    ids = np.array([[1, 10] + [500] * 64 + [12, 13, 14, 15, 11]], dtype=np.int64)
    from fastv_export.adapters import get_adapter
    from fastv_export.presets import load_model
    pixels = get_adapter(load_model("tiny-llava")).preprocess_image(Image.open(png))
    gen = OrtRuntime(load_bundle(out)).generate(ids, np.ones_like(ids), [pixels], 6, eos_token_id=2)
    assert f"prompt: {ids.shape[1]} tokens" in printed
    assert f"tokens: {gen.tokens[0].tolist()}" in printed
    rc, err = _run_cli(capsys, ["run", str(out), "--image", str(png), "--prompt", "<image> and <image>"])
    assert rc == 2 and "marks 2 <image> but 1 --image" in err
