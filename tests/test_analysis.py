"""`fastv-export analyze` (paper §3): Eq. 2-4 on the collected attentions, an independent
recomputation from an uncached eager forward, the CLI's files and its bad-input errors."""
import json

import numpy as np
import pytest
import torch

from fastv_export import cli
from fastv_export.analysis.attention import TYPES, analyze_attention, plot_attention_maps
from fastv_export.errors import FastVError
from fastv_export.prompts import make_prompt

MAX_NEW = 6


def _prompts(adapter):
    # one single-row prompt and one left-padded batch of two rows (rows are analysed one by one)
    return [make_prompt(adapter, 8, num_images=1, seed=3), make_prompt(adapter, [5, 10], num_images=1, seed=4)]


@pytest.fixture(scope="module")
def attention_stats(model_and_adapter):
    """``attention_stats(name, include_first_token=True)``: analyze_attention of ``_prompts``, once per module."""
    cache = {}

    def get(name, include_first_token=True):
        key = (name, include_first_token)
        if key not in cache:
            model, adapter = model_and_adapter(name, "eager")
            cache[key] = analyze_attention(model, _prompts(adapter), MAX_NEW, include_first_token=include_first_token,
                                           progress=False)
        return cache[key]
    return get


def test_eq2_each_output_tokens_allocations_sum_to_one(preset, attention_stats):
    stats = attention_stats(preset)
    assert len(stats.prompts) == 3
    for rec in stats.prompts:
        n = len(rec.output_tokens)
        assert 1 <= n <= MAX_NEW
        assert rec.alpha.shape == (n, stats.num_layers, 4)            # every output token counted
        np.testing.assert_allclose(rec.alpha.sum(-1), 1.0, atol=1e-5)  # Eq. 2, every token, every layer
        assert (rec.alpha >= 0).all()
        # the first output token comes from the prefill's last row: no output token to attend to yet
        np.testing.assert_array_equal(rec.alpha[0, :, 3], 0.0)
        if n > 1:
            assert (rec.alpha[1:, :, 3] > 0).all()
        assert rec.type_sizes["out"] == n and rec.type_sizes["img"] > 0
    np.testing.assert_allclose(stats.allocation_share.sum(-1), 1.0, atol=1e-5)


def test_eq3_eq4_allocation_and_efficiency(preset, attention_stats, model_and_adapter):
    stats = attention_stats(preset)
    lam = np.stack([r.alpha.sum(0) for r in stats.prompts])                      # Eq. 3 per response
    sizes = np.array([[r.type_sizes[t] for t in TYPES] for r in stats.prompts], dtype=float)
    n = sizes[:, 3]
    np.testing.assert_allclose(stats.allocation, lam.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.allocation_share, (lam / n[:, None, None]).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.efficiency, (lam / sizes[:, None, :]).mean(0), rtol=1e-12)  # Eq. 4
    # eps * |type| == lambda, exactly per response (one response alone)
    model, adapter = model_and_adapter(preset, "eager")
    one = analyze_attention(model, [make_prompt(adapter, 7, seed=5)], 4, progress=False)
    size = np.array([one.prompts[0].type_sizes[t] for t in TYPES], dtype=float)
    np.testing.assert_allclose(one.efficiency * size, one.allocation, rtol=1e-12)
    np.testing.assert_allclose(one.allocation, one.prompts[0].alpha.sum(0), rtol=1e-12)
    d = stats.to_dict()
    json.dumps(d)
    assert len(d["layers"]) == stats.num_layers and d["include_first_token"] is True
    assert d["layers"][1]["efficiency"]["img"] == pytest.approx(stats.efficiency[1, 1])


@pytest.mark.parametrize("step", [0, 1, MAX_NEW - 1])
def test_independent_recomputation_from_an_uncached_forward(preset, step, attention_stats, model_and_adapter):
    """One decode step recomputed from a plain eager forward of the full sequence (prompt + the
    tokens generated before that step, no cache): per-type sums of the last row, every layer."""
    stats = attention_stats(preset)
    model, adapter = model_and_adapter(preset, "eager")
    prompt = _prompts(adapter)[0]
    rec = stats.prompts[0]
    if step >= len(rec.output_tokens):
        pytest.skip("response ended at EOS before this step")
    seg = prompt.segments[0]
    P = prompt.input_ids.shape[1]
    seq = torch.cat([prompt.input_ids, torch.tensor([rec.output_tokens[:step]], dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(input_ids=seq, attention_mask=torch.ones_like(seq), **prompt.vision, **adapter.text_inputs(seq),
                    output_attentions=True, use_cache=False)
    assert len(out.attentions) == stats.num_layers
    for j, att in enumerate(out.attentions):
        row = att[0, :, -1, :].double().mean(0)                  # the query row that produces token step+1
        by_hand = [row[seg.system[0]:seg.system[1]].sum(),
                   sum(row[a:b].sum() for a, b in seg.images),
                   row[seg.instruction[0]:seg.instruction[1]].sum(),
                   row[P:].sum()]
        np.testing.assert_allclose(rec.alpha[step, j], torch.stack(by_hand).numpy(), atol=1e-5)
    # the greedy token of that row is the one the analysis generated
    assert int(out.logits[0, -1].argmax()) == rec.output_tokens[step]


def test_first_token_can_be_left_out(attention_stats):
    full, decode_only = attention_stats("tiny-llava"), attention_stats("tiny-llava", include_first_token=False)
    for a, b in zip(full.prompts, decode_only.prompts):
        np.testing.assert_array_equal(b.alpha, a.alpha[1:])
        assert b.type_sizes["out"] == len(a.output_tokens) - 1
    assert decode_only.to_dict()["include_first_token"] is False


def test_example_maps_agree_with_the_collected_rows(attention_stats):
    stats = attention_stats("tiny-llava")
    rec, seg = stats.prompts[0], stats.example_segments
    P, n = rec.prompt_tokens, len(rec.output_tokens)
    maps = stats.example_maps
    assert maps.shape == (stats.num_layers, P + n - 1, P + n - 1)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(maps, 1), 0)                    # causal
    row = maps[:, P - 1 + 2]                                   # decode step 2
    assert row[:, seg.instruction[0]:seg.instruction[1]].sum(-1) == pytest.approx(rec.alpha[2, :, 2], abs=1e-5)


def test_library_errors(model_and_adapter):
    model, adapter = model_and_adapter("tiny-llava", "sdpa")
    with pytest.raises(FastVError, match="eager"):
        analyze_attention(model, [make_prompt(adapter, 5)], 2, progress=False)
    model, adapter = model_and_adapter("tiny-llava", "eager")
    with pytest.raises(FastVError, match="no image tokens"):
        analyze_attention(model, [make_prompt(adapter, 5, num_images=0)], 2, progress=False)
    with pytest.raises(FastVError, match="max_new_tokens"):
        analyze_attention(model, [make_prompt(adapter, 5)], 0, progress=False)
    with pytest.raises(FastVError, match="layers, queries, keys"):
        plot_attention_maps(np.zeros((3, 3)), make_prompt(adapter, 5).segments[0], "unused.png")


# --- CLI -------------------------------------------------------------------------------------


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """The real `fastv-export` main, with only the analyze subcommand registered (so that this test
    does not depend on the other subcommands' modules)."""
    assert cli.SUBCOMMANDS["analyze"] == "fastv_export.commands.analyze"
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"analyze": "fastv_export.commands.analyze"})

    def run(*argv):
        rc = cli.main(["analyze", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def test_cli_writes_stats_and_figures(run_cli, tmp_path):
    out = tmp_path / "new" / "analysis"
    rc, stdout, _ = run_cli("--prompts", 2, "--max-new-tokens", 5, "--out", out)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention_allocation.png", "attention_maps.png",
                                                     "attention_stats.json"]   # no temporary files left
    data = json.loads((out / "attention_stats.json").read_text())
    assert data["model"] == "tiny-llava" and data["num_prompts"] == 2 and len(data["layers"]) == 4
    for layer in data["layers"]:
        assert sum(layer["allocation_share"].values()) == pytest.approx(1.0, abs=1e-5)
    for name in ("attention_allocation.png", "attention_maps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "image tokens:" in stdout and "shallow layers (0-1)" in stdout and "deep layers (2-3)" in stdout
    assert len([ln for ln in stdout.splitlines() if ln.strip().split()[:1] in (["0"], ["1"], ["2"], ["3"])]) == 4


def _unsupported_checkpoint(tmp_path):
    d = tmp_path / "text-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return d


@pytest.mark.parametrize("case", ["prompts", "tokens", "images", "out-under-file", "out-is-file", "text-model"])
def test_cli_bad_input_exits_2_with_one_line(run_cli, tmp_path, case):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = {"prompts": ["--prompts", 0, "--out", tmp_path / "o"],
            "tokens": ["--max-new-tokens", 0, "--out", tmp_path / "o"],
            "images": ["--images", 0, "--out", tmp_path / "o"],
            "out-under-file": ["--out", blocker / "sub"],
            "out-is-file": ["--out", blocker],
            "text-model": ["--model", _unsupported_checkpoint(tmp_path), "--out", tmp_path / "o"]}[case]
    rc, stdout, stderr = run_cli(*args)
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastv-export analyze: error: "), stderr
    expected = {"prompts": "--prompts", "tokens": "--max-new-tokens", "images": "image tokens",
                "out-under-file": "--out", "out-is-file": "not a directory", "text-model": "unsupported"}[case]
    assert expected in lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
