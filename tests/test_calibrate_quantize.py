"""calibrate's quantization axis: bytes of weights from the shapes (and against exported files), points of a
quantized model compared with the unquantized unpruned model, the Pareto front over weights x FLOPs on hand-made
points, --max-weight-bytes, and the one-line refusals."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from fastv_export import cli
from fastv_export.adapters import get_adapter
from fastv_export.calibrate import dataset, report, sweep
from fastv_export.errors import FastVError
from fastv_export.presets import load_model
from tests.helpers import run_cli

DEMO = "tiny-llava-shapes"


def _linear_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of the decoder layers' Linear weights, found by name (not through the adapter)."""
    return [tuple(p.shape) for n, p in model.named_parameters()
            if ".layers." in n and "vision" not in n and n.endswith("proj.weight") and p.dim() == 2]


def _expected_bytes(shapes, scheme: str) -> int:
    if scheme == "none":
        return sum(4 * o * i for o, i in shapes)
    if scheme == "int8":                                   # one int8 per weight + one fp32 scale per output row
        return sum(o * i + 4 * o for o, i in shapes)
    assert scheme == "int4"                                # two weights a byte + one fp32 scale per 128 inputs per row
    return sum(math.ceil(o * i / 2) + 4 * o * math.ceil(i / 128) for o, i in shapes)


# ---- bytes of weights ------------------------------------------------------------------------------------------

def test_weight_bytes_follow_from_the_shapes():
    model = load_model(DEMO)
    shapes = _linear_shapes(model)
    assert len(shapes) == 4 * 7 and sorted(shapes) == sorted(sweep.decoder_linear_shapes(model))
    for scheme in ("none", "int8", "int4"):
        assert report.weight_bytes(shapes, scheme) == _expected_bytes(shapes, scheme), scheme
    # odd sizes: a short last block, an odd number of int4 values
    assert report.weight_bytes([(3, 300)], "int4") == 450 + 4 * 3 * 3
    assert report.weight_bytes([(3, 5)], "int4") == 8 + 4 * 3
    assert report.weight_bytes([(3, 300)], "int8") == 900 + 4 * 3
    assert report.weight_bytes([(3, 300)], "none", "fp16") == 1800
    with pytest.raises(FastVError, match="unknown quantization scheme 'int3'"):
        report.weight_bytes([(3, 300)], "int3")


@pytest.mark.parametrize("text,value", [("300MB", 300 * 10**6), ("1.5GiB", 3 * 2**29), ("2e3", 2000),
                                        ("512 kib", 512 * 1024), ("1000", 1000), ("0.5mb", 500000), ("7B", 7)])
def test_parse_bytes(text, value):
    assert report.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "-3MB", "0", "3 parsecs", "1.5 GiBs", ""])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(FastVError, match="is not a size"):
        report.parse_bytes(text)


# ---- the sweep with a quantized model -----------------------------------------------------------------------------

def _int8_model():
    """The demo with its decoder Linear weights rounded to int8 per output row (this test's own quantizer)."""
    model = load_model(DEMO)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".layers." in n and "vision" not in n and n.endswith("proj.weight"):
                scale = p.abs().amax(dim=1, keepdim=True) / 127
                p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)
    return model


def _kl(p_logits, q_logits) -> float:
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def test_quantized_points_are_compared_with_the_unquantized_unpruned_model(tmp_path):
    model = load_model(DEMO)
    before = {n: p.clone() for n, p in model.named_parameters()}
    items = dataset.demo_items(3)
    spec = sweep.SweepSpec(ks=(2,), ratios=(0, "1/2"), rankings=("last",), tokens=5, quantize=("none", "int8"))
    asked = []
    result = sweep.run_sweep(model, items, spec, results=tmp_path / "r.jsonl", progress=False,
                             quantized_model=lambda s: asked.append(s) or _int8_model())
    assert asked == ["int8"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())      # the caller's model untouched
    qmodel = _int8_model()
    with torch.no_grad():
        for it, item in zip(result.items, items):
            ref = model(**item.model_inputs()).logits[0, -1]
            quant = qmodel(**item.model_inputs()).logits[0, -1]
            unpruned = it["results"]["int8 K=2 R=0/1 last"]
            assert unpruned["kl"] == pytest.approx(_kl(ref, quant), abs=1e-6)
            assert it["quantized"]["int8"]["kl"] == pytest.approx(_kl(ref, quant), abs=1e-6)
            assert unpruned["top1"] == (int(ref.argmax()) == int(quant.argmax()))
            assert it["results"]["K=2 R=0/1 last"]["kl"] == pytest.approx(0, abs=1e-9)
            assert it["results"]["K=2 R=1/2 last"]["kl"] > 0
    table = report.summarize(result, DEMO, "demo", get_adapter(model).decoder_shape(), _linear_shapes(model))
    rows = {r.key: r for r in table.rows}
    assert set(rows) == {"K=2 R=0/1 last", "K=2 R=1/2 last", "int8 K=2 R=0/1 last", "int8 K=2 R=1/2 last"}
    shapes = _linear_shapes(model)
    for r in table.rows:
        assert r.weight_bytes == _expected_bytes(shapes, r.quantize)
        acc = sum(it["results"][r.key]["correct"] for it in result.items) / 3
        assert r.accuracy == pytest.approx(acc) and r.accuracy_se == pytest.approx(math.sqrt(acc * (1 - acc) / 3))
    assert rows["int8 K=2 R=1/2 last"].eq5_ratio == rows["K=2 R=1/2 last"].eq5_ratio < 1
    assert rows["int8 K=2 R=1/2 last"].kv_bytes == rows["K=2 R=1/2 last"].kv_bytes < rows["K=2 R=0/1 last"].kv_bytes
    paths = report.write_outputs(table, tmp_path / "out", "accuracy")
    doc = json.loads(paths["json"].read_text())
    assert {r["quantize"] for r in doc["rows"]} == {"none", "int8"}
    assert doc["weight_frontier"] and doc["quantized"]["int8"]["weight_bytes"] == _expected_bytes(shapes, "int8")
    assert paths["weights_png"].read_bytes()[:4] == b"\x89PNG"
    md = paths["md"].read_text()
    assert "Pareto front over bytes of weights" in md and "| int8 K=2 R=1/2 last | int8 |" in md
    # resumed: nothing asked again, the same numbers
    again = sweep.run_sweep(model, items, spec, results=tmp_path / "r.jsonl", progress=False,
                            quantized_model=lambda s: pytest.fail("asked for a quantized model"))
    assert again.items == result.items


# ---- the Pareto front over weights x FLOPs, and the budget ----------------------------------------------------------

def _row(key, scheme, wbytes, flops, acc):
    return report.Row(key=key, k=2, r="1/2", ranking="last", kept_image_tokens=1.0, image_tokens=2.0, kl=0.0,
                      top1=acc, sequence=acc, prefix=acc, accuracy=acc, rerank_sequence=None, rerank_accuracy=None,
                      kept_attention=None, eq5_ratio=flops, exact_ratio=flops, exact_gflops=1.0, kv_ratio=0.5,
                      quantize=scheme, weight_bytes=wbytes, accuracy_se=0.01)


HAND = [_row("A", "none", 1000, 1.0, 0.93), _row("B", "none", 1000, 0.75, 0.91), _row("C", "int8", 300, 1.0, 0.93),
        _row("D", "int8", 300, 0.75, 0.91), _row("E", "int4", 150, 0.75, 0.90), _row("F", "int4", 150, 1.0, 0.89),
        _row("G", "int4", 150, 0.6, 0.80), _row("H", "int8", 300, 0.6, 0.79)]


def test_weight_front_of_hand_made_points():
    # A loses to C (fewer bytes, same FLOPs and accuracy), B to D, F to E, H to G
    assert [r.key for r in report.weight_front(HAND, "accuracy")] == ["G", "E", "D", "C"]
    rng = random.Random(3)
    for _ in range(300):
        rows = [_row(f"p{i}", "int4", rng.choice([150, 300, 1000]), rng.choice([0.6, 0.75, 1.0]),
                     rng.choice([0.8, 0.9, 0.93])) for i in range(rng.randint(1, 10))]
        front = {r.key for r in report.weight_front(rows, "accuracy")}
        for r in rows:
            beaten = any(o.weight_bytes <= r.weight_bytes and o.eq5_ratio <= r.eq5_ratio and o.accuracy >= r.accuracy
                         and (o.weight_bytes, o.eq5_ratio, o.accuracy) != (r.weight_bytes, r.eq5_ratio, r.accuracy)
                         for o in rows)
            assert (r.key in front) == (not beaten)


def test_max_weight_bytes_recommends_the_most_accurate_point_that_fits():
    table = report.Table("m", "d", 100, 0.93, 1.0, HAND)
    assert report.recommend(table, "accuracy", max_weight_bytes=10**6).row.key == "C"     # A ties: C weighs less
    assert report.recommend(table, "accuracy", max_weight_bytes=300).row.key == "C"
    assert report.recommend(table, "accuracy", max_weight_bytes=299).row.key == "E"
    assert report.recommend(table, "accuracy", max_weight_bytes=300, max_flops_ratio=0.8).row.key == "D"
    # within a tolerance the cheapest (FLOPs, then bytes) of the near-best wins
    assert report.recommend(table, "accuracy", max_weight_bytes=299, tolerance=0.1).row.key == "G"
    assert report.recommend(table, "accuracy", max_weight_bytes=10**6, tolerance=0.021).row.key == "D"
    with pytest.raises(FastVError) as e:
        report.recommend(table, "accuracy", max_weight_bytes=149)
    msg = str(e.value)
    assert "\n" not in msg and "no swept point fits --max-weight-bytes 149" in msg and "150 bytes" in msg


# ---- the command line -----------------------------------------------------------------------------------------------

def _cli_error(argv, capsys) -> str:
    """The one-line refusal (exit 2) of ``fastv-export argv``."""
    rc, err = run_cli(capsys, argv)
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_cli_refuses_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    err = _cli_error(["calibrate", "--quantize", "none,int3", "--out", out], capsys)
    assert "unknown quantization scheme 'int3'" in err and "int8" in err and "int4" in err
    assert "is not a size" in _cli_error(["calibrate", "--max-weight-bytes", "lots", "--out", out], capsys)
    err = _cli_error(["calibrate", "--size", "1", "--k", "2", "--r", "1/2", "--ranking", "last", "--semantics",
                      "prefill", "--max-weight-bytes", "1KB", "--out", out, "--no-progress"], capsys)
    expected = _expected_bytes(_linear_shapes(load_model(DEMO)), "none")
    assert "no swept point fits --max-weight-bytes 1000" in err and f"needs {expected} bytes" in err


@pytest.mark.slow
def test_cli_quantization_axis_from_exported_bundles(tmp_path, capsys, monkeypatch):
    """The real thing: int8 and int4 bundles exported, their computed bytes against the manifest's count of the
    quantized tensors and the measured decoder graph files, and the recommendation under a budget."""
    out = tmp_path / "calib"
    argv = ["calibrate", "--size", "2", "--k", "2", "--r", "1/2", "--ranking", "last", "--semantics", "prefill",
            "--quantize", "int8,int4", "--max-weight-bytes", "400KB", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    doc = json.loads((out / "calibration.json").read_text())
    shapes = _linear_shapes(load_model(DEMO))
    rows = {r["quantize"]: r for r in doc["rows"]}
    assert set(rows) == {"int8", "int4"}
    rest = {}
    for scheme, row in rows.items():
        assert row["weight_bytes"] == _expected_bytes(shapes, scheme)
        bundle = out / "quantized" / scheme
        manifest = json.loads((bundle / "manifest.json").read_text())["quantization"]
        assert manifest["scheme"] == scheme and manifest["weight_bytes"]["quantized"] == row["weight_bytes"]
        files = sum((bundle / f).stat().st_size for f in ("pre_k.onnx", "post_k.onnx"))
        assert files > row["weight_bytes"]
        rest[scheme] = files - row["weight_bytes"]
    # everything else in the two decoder graphs is the same: the files differ by the computed bytes (plus a few
    # bytes of protobuf per quantized weight: names, attributes)
    assert abs(rest["int8"] - rest["int4"]) <= 64 * len(shapes), rest
    assert doc["recommendation"]["quantize"] == "int4" and "int4 K=2 R=1/2 last" in text
    # again: the bundles are reused, not exported
    from fastv_export.export import onnx_export
    monkeypatch.setattr(onnx_export, "export_bundle", lambda *a, **k: pytest.fail("exported again"))
    assert cli.main(argv + ["--results", str(tmp_path / "again.jsonl")]) == 0
