"""fastv_export.export: the exported graphs (one TokenSelect node with its function body, the models'
own layer indices), the manifest's dim names, an R = 0 export against the unmodified model, and the
`export` command's bad-argument errors.

Exports take ~10-20 s each on 2 cores: they come from the session's ``exported_bundle`` fixture."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import onnx
import pytest
import torch

from fastv_export.bundle import load_bundle
from fastv_export.prompts import make_prompt
from tests.helpers import run_cli


@pytest.mark.slow
def test_pre_k_holds_one_token_select_with_function_body(exported_bundle):
    m = onnx.load(str(exported_bundle("tiny-llava", 2, "1/2") / "pre_k.onnx"))
    nodes = [n for n in m.graph.node if n.op_type == "TokenSelect"]
    assert len(nodes) == 1 and nodes[0].domain == "fastv"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"fastv" and attrs["plugin_version"] == b"1"
    assert any(f.name == "TokenSelect" and f.domain == "fastv" for f in m.functions)
    names = [i.name for i in m.graph.input]
    assert names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names and "candidate_positions" in names
    post = onnx.load(str(exported_bundle("tiny-llava", 2, "1/2") / "post_k.onnx"))
    assert [i.name for i in post.graph.input][3] == "past_key_values.2.key"   # the model's own layer index
    assert post.graph.output[0].name == "logits"


@pytest.mark.slow
def test_manifest_names_every_dynamic_dim(exported_bundle):
    """Each graph's I/O reads in the manifest as batch / seq / kept_seq / past_seq / total_seq, with
    no exporter symbols (s0, s1 + s2) left, and post-K returns the last position's logits only."""
    m = json.loads((exported_bundle("tiny-llava", 2, "1/2") / "manifest.json").read_text())
    shapes = {(g, io["name"]): io["shape"] for g, d in m["graphs"].items() for io in d["inputs"] + d["outputs"]}
    leftovers = {key: s for key, s in shapes.items() if any(re.search(r"\bs\d+", str(d)) for d in s)}
    assert not leftovers, leftovers
    vocab = m["source_model"]["vocab_size"]
    assert shapes[("post_k", "logits")] == ["batch", 1, vocab]
    assert shapes[("pre_k", "hidden_states")][:2] == ["batch", "kept_seq"]
    assert shapes[("post_k", "hidden_states")][:2] == ["batch", "seq"]
    assert shapes[("post_k", "present.3.value")][2] == "total_seq" == shapes[("post_k", "attention_mask")][1]
    assert shapes[("embed", "inputs_embeds")][:2] == ["batch", "seq"]


@pytest.mark.slow
def test_r0_export_gives_the_unmodified_models_tokens(exported_bundle, model_and_adapter):
    path = exported_bundle("tiny-qwen2-vl", 2, "0")
    model, adapter = model_and_adapter("tiny-qwen2-vl")
    prompt = make_prompt(adapter, [12], num_images=1, seed=1)
    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.ort import OrtRunner
    px = prompt.vision["pixel_values"].numpy()
    gen = generate(OrtRunner(load_bundle(path)), prompt.input_ids.numpy(), prompt.attention_mask.numpy(), [px], 16)
    model.generation_config.eos_token_id, eos = None, model.generation_config.eos_token_id
    try:
        with torch.no_grad():
            ref = model.generate(**prompt.model_inputs(), max_new_tokens=16, do_sample=False)
    finally:
        model.generation_config.eos_token_id = eos
    assert np.array_equal(gen.tokens, ref[:, prompt.input_ids.shape[1]:].numpy())


# ---- bad input: one clear line, non-zero exit, nothing written --------------------------------------
def test_bad_export_arguments(tmp_path, capsys):
    checks = [
        (["export", "--k", "9", "--out", str(tmp_path / "o1")], "K=9 is out of range"),
        (["export", "--r", "1.5", "--out", str(tmp_path / "o2")], "R must lie in [0, 1)"),
        (["export", "--out", str(tmp_path / "no" / "such" / "dir")], "does not exist"),
        (["export", "--out", "/proc/fastv-bundle"], "cannot write"),   # unwritable even for root
    ]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root ignores directory permissions
        checks.append((["export", "--out", str(ro / "b")], "cannot write"))
    for argv, message in checks:
        rc, err = run_cli(capsys, argv)
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_export_over_an_existing_bundle_needs_force(exported_bundle, capsys):
    good = exported_bundle("tiny-llava", 2, "1/2")
    before = sorted(p.name for p in good.parent.iterdir())
    rc, err = run_cli(capsys, ["export", "--out", str(good)])
    assert rc == 2 and "already exists; pass --force" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in good.parent.iterdir()) == before
