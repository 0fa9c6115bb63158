"""scripts/bench_scale.py: the random-weight checkpoints it writes (names, shapes and dtypes against the model
transformers builds from the written config.json, the published parameter counts of the real shapes, distinct
finite values, loadable by from_pretrained), the writer's peak memory, and the small shapes through export,
validate and build with the figures it prints equal to those it records."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_scale.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    return module


bench = _script()

#: parameters of the real checkpoints as their Hugging Face pages give them (llava-hf/llava-1.5-7b-hf 7.06B,
#: Qwen/Qwen2.5-VL-3B-Instruct 3.75B, Qwen/Qwen2.5-VL-7B-Instruct 8.29B; the 3B ties lm_head to the embedding)
PUBLISHED_BILLIONS = {"llava-1.5-7b": 7.06, "qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.29}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_real_shapes_have_the_published_parameter_counts(name):
    """The configs written in the script are the real ones: the model built from them on the meta device has
    the published parameter count (an error in one width or depth would move it)."""
    import torch
    import transformers

    config = bench.build_config(bench.SHAPES[name])
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    count = sum(p.numel() for p in model.parameters())            # shared (tied) parameters once
    assert round(count / 1e9, 2) == PUBLISHED_BILLIONS[name]
    written = sum(math.prod(shape) for shape, _ in bench.checkpoint_tensors(config).values())
    assert written == count


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """A few tensors' shapes from the config's numbers alone (embedding, attention, MLP, head)."""
    t = config.text_config
    head_dim = t.hidden_size // t.num_attention_heads
    layer = ("model.language_model.layers.0.")
    shapes = {"model.language_model.embed_tokens.weight": (t.vocab_size, t.hidden_size),
              layer + "self_attn.q_proj.weight": (t.num_attention_heads * head_dim, t.hidden_size),
              layer + "self_attn.k_proj.weight": (t.num_key_value_heads * head_dim, t.hidden_size),
              layer + "mlp.gate_proj.weight": (t.intermediate_size, t.hidden_size),
              layer + "mlp.down_proj.weight": (t.hidden_size, t.intermediate_size)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    return shapes


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-scale-ckpt")
    # shards of 16 MB: several files, so the index and the shard boundaries are exercised
    return {name: (bench.write_checkpoint(bench.SHAPES[name], root / name, shard_bytes=16 * 10 ** 6), root / name)[1]
            for name in ("small-llava", "small-qwen2.5-vl")}


@pytest.mark.parametrize("name", ["small-llava", "small-qwen2.5-vl"])
def test_written_checkpoint_matches_the_model_of_its_config(small_checkpoints, name):
    import torch
    import transformers
    from safetensors import safe_open

    ckpt = small_checkpoints[name]
    shape = bench.SHAPES[name]
    config = transformers.AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(p.name for p in ckpt.glob("*.safetensors")) == files
    found, total, dtypes, values = {}, 0, set(), {}
    for file in files:
        with safe_open(ckpt / file, "pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == file
                t = f.get_tensor(key)
                found[key], total = tuple(t.shape), total + t.numel() * t.element_size()
                dtypes.add(t.dtype)
                values[key] = t.float()
    assert found == expected
    assert {k: found[k] for k in _expected_shapes(config)} == _expected_shapes(config)
    assert dtypes == {getattr(torch, shape.dtype)} and config.dtype == getattr(torch, shape.dtype)
    assert index["metadata"]["total_size"] == total
    # random, finite, distinct: no two tensors of one shape equal, weights spread ~0.02, norms around 1
    for key, v in values.items():
        assert torch.isfinite(v).all(), key
        if v.numel() >= 64:
            centre = 1.0 if "norm" in key.split(".")[-2] and key.endswith("weight") else 0.0
            assert abs(v.mean().item() - centre) < 0.01 and 0.015 < v.std().item() < 0.025, key
    mats = [v for k, v in values.items() if k.endswith("q_proj.weight")]
    assert len(mats) > 1 and all(not torch.equal(mats[0], m) for m in mats[1:])


@pytest.mark.parametrize("name", ["small-llava", "small-qwen2.5-vl"])
def test_written_checkpoint_loads_and_gives_finite_logits(small_checkpoints, name):
    import torch
    import transformers

    ckpt = small_checkpoints[name]
    config = transformers.AutoConfig.from_pretrained(ckpt)
    model, info = getattr(transformers, config.architectures[0]).from_pretrained(ckpt, output_loading_info=True)
    assert not any(info.values()), info                           # nothing missing, unexpected or mismatched
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert max(tok.get_vocab().values()) < config.text_config.vocab_size
    ids = tok("What is in the image?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.text_config.vocab_size)
    assert torch.isfinite(logits).all() and logits.float().std() > 0


def test_writer_peak_memory_stays_near_one_shard(tmp_path):
    """A ~400 MB checkpoint written with 64 MB shards: the writing process's RSS grows by less than two shards."""
    code = textwrap.dedent(f"""
        import dataclasses, json, sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import bench_scale as bench
        from fastv_export import memory
        small = bench.SHAPES["small-llava"]
        shape = dataclasses.replace(small, text=dict(small.text, hidden_size=1024, intermediate_size=2816,
                                                     num_hidden_layers=10, num_attention_heads=8,
                                                     num_key_value_heads=8))
        config = bench.build_config(shape)
        bench.checkpoint_tensors(config)          # imports and the meta model once, before the baseline
        memory.release_freed()
        baseline, reset = memory.current_rss(), memory.reset_peak()
        info = bench.write_checkpoint(shape, __import__("pathlib").Path({str(tmp_path / "ckpt")!r}),
                                      shard_bytes=64 * 10 ** 6)
        print(json.dumps(dict(info, baseline=baseline, peak=memory.peak_rss(), reset=reset)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reset"], "the high-water mark could not be reset here"
    assert 350 * 10 ** 6 < out["bytes"] < 500 * 10 ** 6 and out["shards"] >= 6
    assert out["peak"] - out["baseline"] < 2 * 64 * 10 ** 6, out


def _printed_ratios(stdout: str) -> dict[tuple[str, str], float]:
    found = {}
    for m in re.finditer(r"^\[(\S+)\] (\w+): .*peak/weights (\d+\.\d+)x", stdout, re.M):
        found[(m.group(1), m.group(2))] = float(m.group(3))
    return found


@pytest.mark.slow
@pytest.mark.tensorrt
def test_small_shapes_run_export_validate_build(tmp_path, plugin_library):
    """small-llava (fp16: an fp16 checkpoint export validates, not refused as stale) through export, validate and
    build (CI time: the Qwen2.5-VL small shape runs the same code; `--shape small-qwen2.5-vl` by hand)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "small-llava", "--stages",
                           "export,validate,build", "--workdir", str(work), "--plugin-lib", str(plugin_library),
                           "--keep"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((work / "bench_scale.json").read_text())
    assert [s["shape"] for s in report["shapes"]] == ["small-llava"]
    assert report["machine"]["cores"] >= 1 and report["machine"]["memory_bytes"] > 0
    printed = _printed_ratios(proc.stdout)
    for entry in report["shapes"]:
        assert [s["stage"] for s in entry["stages"]] == ["export", "validate", "build"]
        bundle = work / f"{entry['shape']}-{entry['export_dtype']}-bundle"
        recorded = json.loads((bundle / "logs" / "stages.json").read_text())["stages"]
        for s in entry["stages"]:
            assert s["ok"] and s["peak_source"] == "stages.json"
            # the bundle's own record is what the report carries, and the printed ratio is peak / weights
            assert s["peak_rss_bytes"] == recorded[s["stage"]]["peak_rss_bytes"]
            assert s["weight_bytes"] == recorded[s["stage"]]["weight_bytes"] > 0
            assert printed[(entry["shape"], s["stage"])] == round(s["peak_rss_bytes"] / s["weight_bytes"], 2)
    validation = json.loads((work / "small-llava-fp16-bundle" / "validation" / "validation.json").read_text())
    assert validation  # written by a passing validate
    rows = (work / "bench_scale.md").read_text().splitlines()
    assert len(rows) == 2 + 3 and all("cores" in r for r in rows[2:])


def test_a_failing_stage_stops_with_its_one_line_error(tmp_path):
    """validate of a bundle that export never wrote (export not selected): the run stops there, exit 1, and the
    report carries the CLI's one-line error."""
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "small-llava", "--stages", "validate,build",
                           "--workdir", str(work)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((work / "bench_scale.json").read_text())
    stages = report["shapes"][0]["stages"]
    assert [s["stage"] for s in stages] == ["validate"] and not stages[0]["ok"]
    assert stages[0]["error"].startswith("fastv-export validate: error:") and "\n" not in stages[0]["error"]
    assert "validate FAILED" in proc.stdout
    assert not (work / "small-llava-checkpoint").exists()          # cleaned without --keep
