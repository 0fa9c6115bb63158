"""calibrate/: the demo task, the prefix-reuse sweep against from-scratch and independent
computations, the authors' re-rank-every-step mode, frontier, recommendation, resumable results,
calibration folders, the CLI's one-line errors, and calibrate as a leaf over the public API."""
from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from fastv_export import cli
from fastv_export.adapters import get_adapter
from fastv_export.calibrate import dataset, report, sweep
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.presets import load_model, shapes
from fastv_export.reference import apply_fastv
from fastv_export.reference.rerank import generate_rerank
from fastv_export.reference.selection import random_scores
from tests import independent


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny-llava")
    return model, get_adapter(model)


@pytest.fixture(scope="module")
def items(tiny):
    return dataset.synthetic_items(tiny[1], 2)


# ---- the demo task --------------------------------------------------------------------------------

def _cells_from_pixels(pixels: np.ndarray) -> dict[tuple[int, int], str]:
    """Read the grid back from the pixels: a cell's centre pixel is always inside its square."""
    rgb = pixels.transpose(1, 2, 0) * shapes.CLIP_STD + shapes.CLIP_MEAN
    cells = {}
    for r in range(shapes.GRID):
        for c in range(shapes.GRID):
            px = rgb[r * shapes.CELL + 7, c * shapes.CELL + 7]
            dist = {name: float(np.abs(px - np.array(col)).max()) for name, col in shapes.COLOURS.items()}
            name = min(dist, key=dist.get)
            if dist[name] < 0.25:
                cells[(r, c)] = name
    return cells


def test_demo_answers_follow_from_the_pixels():
    words = shapes.VOCAB
    for s in shapes.split("test", 150):
        cells = _cells_from_pixels(s.pixels)
        q = [words[t] for t in s.prompt if t not in (shapes.BOS_ID, shapes.IMAGE_ID)]
        a = [words[t] for t in s.answer]
        assert a[-1] == "</s>" and s.prompt.count(shapes.IMAGE_ID) == shapes.IMAGE_TOKENS == 64
        if q[0] == "what":
            assert a[:-1] == [cells.get((int(q[4]), int(q[6])), "none")]
        elif q[0] == "how":
            assert a[:-1] == [str(sum(v == q[2] for v in cells.values()))]
        else:
            (r, c), = [rc for rc, v in cells.items() if v == q[2]]
            assert a[:-1] == ["row", str(r), "col", str(c)]


def test_demo_splits_are_disjoint_and_deterministic():
    test = shapes.split("test", 50)
    assert all(s.seed >= shapes.TEST_SEED_OFFSET for s in test)
    again = shapes.split("test", 50)
    assert all(np.array_equal(a.pixels, b.pixels) and a.prompt == b.prompt for a, b in zip(test, again))
    assert {s.kind for s in test} == set(shapes.KINDS)
    assert 0.2 < shapes.chance_accuracy(shapes.split("test", 600)) < 0.5


def test_trained_demo_is_far_above_chance():
    from fastv_export.presets import demo

    model = load_model("tiny-llava-shapes")
    test = shapes.split("test", 120)
    acc = demo.accuracy(model, test)["all"]
    assert acc > shapes.chance_accuracy(shapes.split("test", 600)) + 0.3, acc


def test_demo_weights_missing_or_corrupt_give_one_clear_error(tmp_path):
    from fastv_export.presets import demo

    with pytest.raises(FastVError, match="missing .* train them with: python scripts/train_demo.py"):
        demo.build_trained(weights=tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(FastVError, match="does not hold the tiny-llava-shapes weights"):
        demo.build_trained(weights=tmp_path / "bad.safetensors")


# ---- prefix reuse == from scratch == independent ------------------------------------------------------

def test_prefix_reuse_equals_from_scratch(tiny, items):
    model, adapter = tiny
    spec = sweep.SweepSpec(ks=(0, 1, 3), ratios=("1/2", "9/10"), rankings=("last", "mean"), tokens=3)
    session = sweep.Session(model, spec)
    for item in items[:1]:
        with torch.no_grad():
            base_logits = model(**item.model_inputs()).logits[0, -1].float()
        _, results = sweep.evaluate_item(session, item, spec.configs())
        prefix = session.prefix(item)
        for cfg in spec.configs():
            logits, tokens = sweep.evaluate_from_scratch(model, item, cfg, spec.tokens)
            res = results[sweep.config_key(cfg)]
            assert res.tokens == tokens, cfg
            assert abs(res.kl - sweep.kl_divergence(base_logits, logits)) < 1e-5, cfg
            mine, _, _ = session.run_config(prefix, cfg, session.scores(prefix, cfg))
            assert torch.allclose(mine, logits, atol=1e-5, rtol=0), cfg


def test_prefix_reuse_equals_from_scratch_with_mrope():
    model = load_model("tiny-qwen2-vl")
    item = dataset.synthetic_items(get_adapter(model), 1)[0]
    spec = sweep.SweepSpec(ks=(0, 1, 3), ratios=("1/2", "9/10"), rankings=("last", "mean"), tokens=1)
    session = sweep.Session(model, spec)
    prefix = session.prefix(item)
    for cfg in spec.configs():
        mine, _, _ = session.run_config(prefix, cfg, session.scores(prefix, cfg))
        logits, _ = sweep.evaluate_from_scratch(model, item, cfg, 1)
        assert torch.allclose(mine, logits, atol=1e-5, rtol=0), cfg


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_sweep_tokens_equal_apply_fastv_generate(name):
    """Several greedy tokens per configuration, 1-D and M-RoPE positions (Qwen3-VL: K = 1 is inside its
    DeepStack layers, K = 2 after them): the sweep's tokens are those of Hugging Face generate under
    apply_fastv on the same prompt, and its baseline those of the unmodified model's generate."""
    model = load_model(name)
    adapter = get_adapter(model)
    items = dataset.synthetic_items(adapter, 1)
    spec = sweep.SweepSpec(ks=(0, 1, 2), ratios=("1/2", "9/10"), rankings=("last", "mean"), tokens=3)
    result = sweep.run_sweep(model, items, spec, progress=False)
    eos = adapter.text_config.eos_token_id

    def generate(inputs):
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=spec.tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0)[0, inputs["input_ids"].shape[1]:].tolist()
        return gen[:gen.index(eos) + 1] if eos in gen else gen

    differ = 0
    for it, item in zip(result.items, items):
        base = generate(item.model_inputs())
        assert it["baseline"]["tokens"] == base
        for cfg in spec.configs():
            with apply_fastv(model, cfg):
                want = generate(item.model_inputs())
            got = it["results"][sweep.config_key(cfg)]["tokens"]
            assert got == want, (item.name, cfg.describe(), got, want)
            differ += want != base
    assert differ, "no configuration changed the tokens: the comparison exercises nothing"


def test_prefix_reuse_equals_independent_eager_computation(tiny, items):
    model, adapter = tiny
    eager = load_model("tiny-llava", attn_implementation="eager")
    image_ids = set(adapter.image_token_ids())
    spec = sweep.SweepSpec(ks=(1, 2), ratios=("3/4",), rankings=("last", "mean"), tokens=1)
    session = sweep.Session(model, spec)
    for item in items:
        prefix = session.prefix(item)
        for cfg in spec.configs():
            logits, _, kept = session.run_config(prefix, cfg, session.scores(prefix, cfg))
            ref, ref_kept = independent.independent_pruned_logits(
                eager, get_adapter(eager), item.model_inputs(), cfg.k, cfg.ranking, cfg.keep_count, image_ids)
            assert torch.equal(kept, ref_kept), cfg
            assert torch.allclose(logits, ref[0, -1].float(), atol=1e-4, rtol=0), cfg


def test_ratio_zero_is_the_unpruned_model(tiny, items):
    model, adapter = tiny
    spec = sweep.SweepSpec(ks=(0, 2), ratios=(0,), rankings=("last", "mean"), tokens=4,
                           semantics=("prefill", "rerank"))
    result = sweep.run_sweep(model, items, spec, progress=False)
    for it, item in zip(result.items, items):
        with torch.no_grad():
            gen = model.generate(**item.model_inputs(), max_new_tokens=4, do_sample=False)
        hf = gen[0, item.input_ids.shape[1]:].tolist()
        assert it["baseline"]["tokens"] == hf
        for key, res in it["results"].items():
            assert abs(res["kl"]) < 1e-9 and res["top1"] and res["sequence"] and res["prefix"] == 1.0, key
            assert res["rerank_sequence"] and res["tokens"] == hf, key


# ---- the authors' re-rank-every-step mode ---------------------------------------------------------------

@pytest.mark.parametrize("k,ranking", [(2, "last"), (1, "mean"), (0, "random")])
def test_rerank_every_step_equals_independent_recomputation(tiny, items, k, ranking):
    model, adapter = tiny
    eager = load_model("tiny-llava", attn_implementation="eager")
    eager_adapter = get_adapter(eager)
    image_ids = set(adapter.image_token_ids())
    cfg = FastVConfig(k=k, ratio="3/4", ranking=ranking, seed=3)
    steps = 5
    changed = False
    for item in items:
        res = generate_rerank(model, cfg, max_new_tokens=steps, **item.model_inputs())
        ids = item.input_ids
        prev_kept = None
        for t in range(steps):
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **item.vision}
            # the whole sequence again, no cache, ranked with its newest row (independent code)
            logits, kept = independent.independent_pruned_logits(
                eager, eager_adapter, inputs, k, ranking, cfg.keep_count, image_ids,
                random_scores_fn=random_scores, seed=cfg.seed)
            token = int(logits[0, -1].argmax())
            assert int(res.tokens[0, t]) == token, (item.name, t)
            assert torch.equal(res.kept_per_step[t], kept), (item.name, t)
            cand = [p for p in kept[0].tolist() if int(ids[0, p]) in image_ids]
            changed |= prev_kept is not None and cand != prev_kept
            prev_kept = cand
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    if ranking != "random":
        assert changed, "the kept image tokens never changed between steps: re-ranking is not exercised"


# ---- frontier and recommendation ------------------------------------------------------------------------

def _random_table(rng: random.Random, n: int) -> report.Table:
    rows = []
    for i in range(n):
        q = round(rng.random(), 2)
        rows.append(report.Row(key=f"c{i}", k=1 + i % 3, r="1/2", ranking="last", kept_image_tokens=1.0,
                               image_tokens=2.0, kl=0.0, top1=q, sequence=q, prefix=q, accuracy=None,
                               rerank_sequence=None, rerank_accuracy=None, kept_attention=None,
                               eq5_ratio=round(rng.uniform(0.2, 1.0), 2), exact_ratio=0.5, exact_gflops=1.0,
                               kv_ratio=0.5))
    return report.Table("m", "d", 1, None, 1.0, rows)


def test_frontier_points_are_non_dominated_and_the_rest_dominated():
    rng = random.Random(0)
    for _ in range(200):
        table = _random_table(rng, rng.randint(1, 12))
        front = {r.key for r in report.pareto_front(table.rows, "top1")}
        assert front
        for r in table.rows:
            dominated = any(o.eq5_ratio <= r.eq5_ratio and o.top1 >= r.top1 and
                            (o.eq5_ratio, o.top1) != (r.eq5_ratio, r.top1) for o in table.rows)
            assert (r.key in front) == (not dominated), (r, table.rows)


def test_recommendation_satisfies_its_constraint_and_is_optimal():
    rng = random.Random(1)
    for _ in range(200):
        table = _random_table(rng, rng.randint(1, 12))
        limit, floor = rng.uniform(0.2, 1.0), rng.uniform(0.0, 1.0)
        feasible = [r for r in table.rows if r.eq5_ratio <= limit]
        if feasible:
            rec = report.recommend(table, "top1", max_flops_ratio=limit).row
            assert rec.eq5_ratio <= limit and rec.top1 == max(r.top1 for r in feasible)
        else:
            with pytest.raises(FastVError, match="no swept configuration meets"):
                report.recommend(table, "top1", max_flops_ratio=limit)
        meeting = [r for r in table.rows if r.top1 >= floor]
        if meeting:
            rec = report.recommend(table, "top1", min_agreement=floor).row
            assert rec.top1 >= floor and rec.eq5_ratio == min(r.eq5_ratio for r in meeting)
        else:
            with pytest.raises(FastVError, match="no swept configuration meets"):
                report.recommend(table, "top1", min_agreement=floor)


# ---- resumable results ------------------------------------------------------------------------------------

def test_interrupted_sweep_resumes_with_the_same_numbers(tiny, items, tmp_path, monkeypatch):
    model, _ = tiny
    spec = sweep.SweepSpec(ks=(2,), ratios=("1/2",), rankings=("last",), tokens=2)
    three = items + dataset.synthetic_items(tiny[1], 3)[2:]
    full = sweep.run_sweep(model, three, spec, results=tmp_path / "a.jsonl", progress=False)
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])   # killed mid-write
    calls = []
    real = sweep.evaluate_item
    monkeypatch.setattr(sweep, "evaluate_item", lambda *a: calls.append(1) or real(*a))
    resumed = sweep.run_sweep(model, three, spec, results=tmp_path / "b.jsonl", progress=False)
    assert len(calls) == 2
    assert resumed.items == full.items
    other = sweep.SweepSpec(ks=(1,), ratios=("1/2",), rankings=("last",), tokens=2)
    with pytest.raises(FastVError, match="different sweep"):
        sweep.run_sweep(model, three, other, results=tmp_path / "b.jsonl", progress=False)


# ---- calibration folders and bad input -----------------------------------------------------------------

def _demo_folder(tmp_path, n=3, bad_image=False):
    from PIL import Image

    samples = shapes.split("test", n)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i, s in enumerate(samples):
            rgb = s.pixels.transpose(1, 2, 0) * shapes.CLIP_STD + shapes.CLIP_MEAN
            Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(tmp_path / f"{i}.png")
            prompt = [t for t in s.prompt if t != shapes.IMAGE_ID]
            prompt.insert(1, shapes.IMAGE_ID)                         # one placeholder, expanded on load
            f.write(json.dumps({"image": f"{i}.png", "prompt_ids": prompt, "answer_ids": s.answer}) + "\n")
    if bad_image:
        (tmp_path / "0.png").write_bytes(b"not a png")
    return samples


def test_folder_calibration_set_matches_the_demo_items(tmp_path):
    model = load_model("tiny-llava-shapes")
    samples = _demo_folder(tmp_path)
    got = dataset.load_items(str(tmp_path), get_adapter(model), 10, model="tiny-llava-shapes")   # its processor
    assert len(got) == len(samples)
    for item, s in zip(got, samples):
        assert item.input_ids[0].tolist() == s.prompt and item.answer == s.answer
        assert np.abs(item.vision["pixel_values"][0].numpy() - s.pixels).max() < 0.02   # uint8 rounding
    with pytest.raises(FastVError, match="go through the checkpoint's processor: pass --model DIR"):
        dataset.load_items(str(tmp_path), get_adapter(model), 10)


def test_folder_text_prompts_of_a_preset_go_through_its_serving_files(tmp_path):
    """Text prompts in the demo's words: the preset's tokenizer and template-free text make the trained prompt."""
    model = load_model("tiny-llava-shapes")
    samples = _demo_folder(tmp_path, n=2)
    lines = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for rec, s in zip(lines, samples):
            f.write(json.dumps({"image": rec["image"], "prompt": "<image> " + s.question,
                                "answer": s.answer_text.replace(" </s>", "")}) + "\n")
    got = dataset.load_items(str(tmp_path), get_adapter(model), 10, model="tiny-llava-shapes")
    for item, s in zip(got, samples):
        assert item.input_ids[0].tolist() == s.prompt and item.answer == s.answer


def _cli_error(argv, capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_cli_bad_input_gives_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "calibration set is empty" in _cli_error(["calibrate", "--size", "0", "--out", out], capsys)
    _demo_folder(tmp_path, n=2, bad_image=True)
    err = _cli_error(["calibrate", "--data", str(tmp_path), "--out", out, "--no-progress"], capsys)
    assert "cannot read image" in err and "0.png" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "prompts.jsonl").write_text("\n")
    assert "holds no prompts" in _cli_error(["calibrate", "--data", str(tmp_path / "empty"), "--out", out], capsys)
    err = _cli_error(["calibrate", "--size", "2", "--k", "2", "--r", "9/10", "--ranking", "last", "--tokens", "5",
                      "--semantics", "prefill", "--min-agreement", "1.01", "--out", out, "--no-progress"], capsys)
    assert "no swept configuration meets" in err
    assert "K=5 is out of range" in _cli_error(["calibrate", "--k", "5", "--size", "1", "--out", out], capsys)
    assert "shorter than the longest reference answer" in _cli_error(
        ["calibrate", "--tokens", "2", "--size", "20", "--out", out, "--no-progress"], capsys)


def test_cli_demo_sweep_writes_table_plot_and_recommendation(tmp_path, capsys):
    out = tmp_path / "calib"
    rc = cli.main(["calibrate", "--size", "6", "--k", "0,2", "--r", "1/2,9/10", "--ranking", "last", "--tokens", "5",
                   "--max-flops-ratio", "0.8", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "recommended under eq5_ratio <= 0.8" in text
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["metric"] == "accuracy" and len(doc["rows"]) == 4
    assert doc["recommendation"]["eq5_ratio"] <= 0.8
    assert all(r["rerank_accuracy"] is not None for r in doc["rows"])
    assert (out / "calibration.csv").read_text().count("\n") == 5
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert Fraction(doc["rows"][0]["r"]) == Fraction(1, 2) and doc["rows"][0]["ranking"] == "random"


@pytest.mark.slow
def test_cli_exports_the_recommended_configuration(tmp_path, capsys):
    from fastv_export.bundle import load_bundle

    out, bundle = tmp_path / "calib", tmp_path / "bundle"
    rc = cli.main(["calibrate", "--size", "4", "--k", "1,2", "--r", "1/2,3/4", "--ranking", "last", "--semantics",
                   "prefill", "--metric", "top1", "--min-agreement", "0.5", "--export", str(bundle), "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    rec = json.loads((out / "calibration.json").read_text())["recommendation"]
    fastv = load_bundle(bundle).fastv
    assert (fastv.k, f"{fastv.r.numerator}/{fastv.r.denominator}", fastv.ranking) == (rec["k"], rec["r"], rec["ranking"])
    assert rec["ort_prefill_ms"] > 0 and "ONNX Runtime prefill" in capsys.readouterr().out


def test_cli_mrope_sweep_over_several_tokens(tmp_path, capsys):
    out = tmp_path / "calib"
    rc = cli.main(["calibrate", "--model", "tiny-qwen2-vl", "--tokens", "3", "--size", "2", "--k", "1,2", "--r",
                   "1/2", "--ranking", "last", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["metric"] == "top1" and len(doc["rows"]) == 2
    assert all(0 <= r["sequence"] <= 1 and r["rerank_sequence"] is not None for r in doc["rows"])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 2
    for rec in records:
        for tokens in [rec["baseline"]["tokens"]] + [r["tokens"] for r in rec["results"].values()]:
            assert len(tokens) == 3 or tokens[-1] == 2, tokens     # 3 greedy tokens unless </s> (id 2) came first


# ---- calibrate as a leaf over the public API ---------------------------------------------------------

CALIBRATE_DIR = Path(sweep.__file__).parent
#: the files scanned and the package each belongs to (its own privates are allowed): calibrate/ and its command
LEAF_FILES = [(f, "fastv_export.calibrate") for f in sorted(CALIBRATE_DIR.glob("*.py"))] + [
    (Path(cli.__file__).parent / "commands" / "calibrate.py", "fastv_export.commands")]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(source: str, own: str) -> list[str]:
    """``from X import _y`` and ``name._y`` on a name an import bound, for every X outside package ``own``."""
    tree = ast.parse(source)
    bound: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not alias.name.startswith(own):
                    bound.add(alias.asname or alias.name.split(".")[0])
                    found += [f"import {alias.name}" for part in alias.name.split(".") if _is_private(part)]
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith(own):
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _is_private(alias.name) or any(_is_private(p) for p in (node.module or "").split(".")):
                    found.append(f"from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(ast.unparse(node))
    return found


def test_calibrate_uses_no_private_name_of_another_package():
    # the scan itself finds both forms (so an empty result below means something)
    assert _private_uses("from fastv_export.reference.fastv import _gather_seq", "fastv_export.calibrate")
    assert _private_uses("from fastv_export.calibrate import report\nreport._x(1)", "fastv_export.commands")
    assert _private_uses("import fastv_export.reference.fastv as f\nf._gather(1)", "fastv_export.calibrate")
    assert not _private_uses("from fastv_export.calibrate import sweep\nsweep._until_eos", "fastv_export.calibrate")
    assert len(LEAF_FILES) >= 4
    found = {f"{path.name}: {use}" for path, own in LEAF_FILES for use in _private_uses(path.read_text(), own)}
    assert not found, sorted(found)


def test_importing_calibrate_registers_nothing():
    """Every module of fastv_export.calibrate imported in a fresh interpreter, and with them the adapters,
    the reference and the export modules they rest on: transformers' attention and mask interfaces are
    unchanged (implementations are registered when first used)."""
    code = """
import importlib, pkgutil
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

def mappings():
    return dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)

before = mappings()
import fastv_export.calibrate as package
names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
for name in names:
    importlib.import_module("fastv_export.calibrate." + name)
import fastv_export.adapters, fastv_export.reference, fastv_export.export.modules
after = mappings()
print("MODULES", names)
print("ADDED", sorted(set(after[0]) - set(before[0])), sorted(set(after[1]) - set(before[1])))
print("SAME", before == after)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "MODULES ['dataset', 'report', 'sweep']" in proc.stdout, proc.stdout
    assert "SAME True" in proc.stdout, proc.stdout
