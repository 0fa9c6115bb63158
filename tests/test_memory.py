"""fastv_export.memory and the memory-lean stages (issue 23 items 2-3): each stage's peak RSS measured (high-water mark
reset per stage) and recorded in BUNDLE/logs/stages.json, the estimate checked before a stage starts (refused in one
line with the available memory faked), and validation never holding the PyTorch model and an ONNX Runtime session at
the same time. Small allocations only (<= ~0.3 GB)."""
from __future__ import annotations

import gc
import json
import logging
import resource
import weakref

import numpy as np
import pytest

from fastv_export import memory
from fastv_export.errors import FastVError
from tests.helpers import copy_bundle, run_cli

MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ measuring
def _touch(nbytes: int) -> np.ndarray:
    a = np.empty(nbytes, dtype=np.uint8)
    a[::4096] = 1                                          # every page resident
    return a


def test_peak_of_a_stage_sees_its_allocation_and_is_reset_for_the_next():
    if not memory.reset_peak():
        pytest.skip("this kernel does not let the high-water mark be reset (/proc/self/clear_refs)")
    with memory.measure("big") as big:
        a = _touch(256 * MiB)
        rss_with_it = memory.current_rss()                # VmRSS while the allocation is alive
        del a
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # the kernel's peak, before the next reset
    with memory.measure("small") as small:
        b = _touch(64 * MiB)   # over glibc's largest mmap threshold (32 MiB): fresh pages, not freed ones reused
        del b
    assert big.peak_reset and small.peak_reset
    # independent: the allocation is resident at once, so the stage's peak is at least start + 256 MiB
    assert big.peak_rss_bytes >= big.start_rss_bytes + 250 * MiB
    assert big.peak_rss_bytes >= rss_with_it - 4 * MiB          # (per-thread RSS counters lag by a few pages)
    # getrusage reports the same high-water mark (reset by clear_refs too)
    assert abs(maxrss - big.peak_rss_bytes) <= 8 * MiB
    # the second stage's peak was reset: it does not carry the first stage's 256 MiB
    assert small.peak_rss_bytes < big.peak_rss_bytes - 150 * MiB
    assert small.peak_rss_bytes >= small.start_rss_bytes + 60 * MiB
    assert big.seconds >= 0 and big.finished.endswith("Z")


def test_stage_log_keeps_earlier_stages_and_replaces_a_rerun(tmp_path):
    a = memory.StageRecord("export", peak_rss_bytes=10, peak_reset=True)
    memory.record_stages(tmp_path, a)
    memory.record_stages(tmp_path, memory.StageRecord("validate", peak_rss_bytes=20, peak_reset=True))
    memory.record_stages(tmp_path, memory.StageRecord("validate", peak_rss_bytes=30, peak_reset=True))
    data = json.loads((tmp_path / "logs" / "stages.json").read_text())
    assert {k: v["peak_rss_bytes"] for k, v in data["stages"].items()} == {"export": 10, "validate": 30}
    # a stage that replaced the directory hands over the log it read before
    memory.record_stages(tmp_path, memory.StageRecord("build", peak_rss_bytes=5), previous={"x": {"peak_rss_bytes": 1}})
    assert set(memory.read_stage_log(tmp_path)) == {"x", "build"}


# ------------------------------------------------------------------------------------------------ available
@pytest.mark.parametrize("text,expected", [("12345", 12345), ("512M", 512 * MiB), ("1.5G", 3 << 29),
                                           ("2GiB", 2 << 30), ("64k", 64 << 10)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


def test_parse_size_rejects_words():
    with pytest.raises(FastVError, match="FASTV_EXPORT_MEMORY_AVAILABLE"):
        memory.parse_size("lots")


def test_available_memory_is_memavailable_or_the_env_override(monkeypatch):
    monkeypatch.delenv(memory.AVAILABLE_ENV, raising=False)
    real = memory.available_memory()
    with open("/proc/meminfo") as f:
        mem_available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 < real.bytes <= mem_available + 512 * MiB          # never more than MemAvailable (it moves a little)
    monkeypatch.setenv(memory.AVAILABLE_ENV, "3M")
    assert memory.available_memory() == memory.Available(3 * MiB, memory.AVAILABLE_ENV)


def _cgroup_tree(tmp_path, v2: bool, limit: str, usage: str):
    proc = tmp_path / "cgroup"
    if v2:
        proc.write_text("0::/user.slice/job\n")
        d = tmp_path / "fs" / "user.slice" / "job"
        names = ("memory.max", "memory.current")
    else:
        proc.write_text("12:cpu,cpuacct:/job\n7:memory:/job\n")
        d = tmp_path / "fs" / "memory" / "job"
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    d.mkdir(parents=True)
    (d / names[0]).write_text(limit + "\n")
    (d / names[1]).write_text(usage + "\n")
    return tmp_path / "fs", proc


@pytest.mark.parametrize("v2", [True, False])
def test_cgroup_headroom_is_limit_minus_usage(tmp_path, v2):
    root, proc = _cgroup_tree(tmp_path, v2, str(4 << 30), str(1 << 30))
    assert memory.cgroup_headroom(root, proc) == 3 << 30


@pytest.mark.parametrize("v2,limit", [(True, "max"), (False, str(0x7FFFFFFFFFFFF000))])
def test_cgroup_without_a_limit_gives_none(tmp_path, v2, limit):
    root, proc = _cgroup_tree(tmp_path, v2, limit, str(1 << 30))
    assert memory.cgroup_headroom(root, proc) is None


# ------------------------------------------------------------------------------------------------ estimates
def test_parameter_count_matches_the_built_model():
    from fastv_export.presets import load_model

    model = load_model("tiny-llava")
    assert memory.parameter_count("tiny-llava") == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_a_checkpoint_reads_no_weights(tmp_path):
    from fastv_export.presets import load_model

    model = load_model("tiny-qwen2-vl")
    model.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"")                                   # the weights are not read: config only
    assert memory.parameter_count(tmp_path) == sum(p.numel() for p in model.parameters())


def test_estimates_follow_the_stated_ratios(exported_bundle):
    from fastv_export.bundle import load_bundle

    n = memory.parameter_count("tiny-llava")
    est = memory.export_estimate("tiny-llava", "fp16")
    assert est.bytes == int(memory.BASE_BYTES + 1.4 * 2 * n)
    assert memory.validate_estimate("tiny-llava").weight_bytes == 4 * n
    path = exported_bundle()
    graph_bytes = {}
    for onnx_file in path.glob("*.onnx"):
        data = onnx_file.with_name(onnx_file.name + ".data")
        graph_bytes[onnx_file.stem] = onnx_file.stat().st_size + (data.stat().st_size if data.exists() else 0)
    est = memory.build_estimate(load_bundle(path))
    assert est.weight_bytes == max(graph_bytes.values())
    assert est.bytes == int(memory.BASE_BYTES + 4.0 * max(graph_bytes.values()))


def test_check_fits_passes_refuses_or_is_overridden():
    est = memory.Estimate("export", 10 * MiB, 1.4, "fp32 weights")
    plenty = memory.Available(1 << 40, "test")
    assert memory.check_fits(est, "do this", available=plenty) is plenty
    short = memory.Available(100 * MiB, "test")
    with pytest.raises(FastVError) as e:
        memory.check_fits(est, "export with --dtype fp16", available=short)
    line = str(e.value)
    assert "\n" not in line and "export needs about 1.01 GiB" in line and "100.0 MiB is available" in line
    assert "--dtype fp16" in line and memory.OVERRIDE_FLAG in line
    assert memory.check_fits(est, "x", ignore=True, available=short) is short


# ------------------------------------------------------------------------------------------------ the commands
def test_export_that_does_not_fit_stops_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(memory.AVAILABLE_ENV, "64M")
    out = tmp_path / "b"
    rc, err = run_cli(capsys, ["export", "--out", str(out)])
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "export needs about" in err and "64.0 MiB is available (FASTV_EXPORT_MEMORY_AVAILABLE)" in err
    assert "--dtype fp16" in err and "--ignore-memory-check" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rc, err = run_cli(capsys, ["export", "--dtype", "fp16", "--out", str(out)])
    assert rc == 2 and "--dtype fp16" not in err and "more memory" in err and not out.exists()


def test_export_under_a_real_address_space_limit_stops_in_one_line(tmp_path):
    """The too-big case for real: the CLI in a process whose address space is limited (ulimit -v) below what
    bench-llava's fp32 export needs (1.4 x 1 GiB + 1 GiB) stops with the one line, exit 2, nothing written."""
    import subprocess
    import sys

    limit = 2400 << 20

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "fastv_export.cli", "export", "--model", "bench-llava", "--out", "b"],
                          cwd=tmp_path, capture_output=True, text=True, preexec_fn=limited, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "export needs about 2.40 GiB" in err and "(ulimit -v)" in err and "--dtype fp16" in err, err
    assert list(tmp_path.iterdir()) == []


def test_pipeline_that_cannot_validate_stops_before_exporting(tmp_path, capsys, monkeypatch):
    # validation's need is checked first, before anything is exported
    monkeypatch.setenv(memory.AVAILABLE_ENV, str(memory.validate_estimate("tiny-llava").bytes - 1))
    out = tmp_path / "b"
    rc, err = run_cli(capsys, ["pipeline", "--no-plugin", "--dtype", "fp16", "--out", str(out)])
    assert rc == 2 and len(err.splitlines()) == 1 and "validate needs about" in err, err
    assert "--skip-validation" in err and not out.exists()


@pytest.mark.slow   # exports tiny-llava (~15 s)
def test_override_exports_anyway_and_records_the_peak(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setenv(memory.AVAILABLE_ENV, "64M")
    out = tmp_path / "b"
    with caplog.at_level(logging.INFO, logger="fastv_export"):
        rc, err = run_cli(capsys, ["-v", "export", "--out", str(out), "--ignore-memory-check"])
    assert rc == 0, err
    assert "export needs about" in caplog.text and "going on (--ignore-memory-check)" in caplog.text
    assert "export: peak RSS" in caplog.text               # -v logs the stage's peak
    rec = json.loads((out / "logs" / "stages.json").read_text())["stages"]["export"]
    # the start is read just before the reset: pages freed in between lower the reset mark a little
    assert rec["peak_rss_bytes"] >= rec["start_rss_bytes"] - 4 * MiB and rec["start_rss_bytes"] > 0
    assert rec["available_bytes"] == 64 * MiB and rec["estimate_bytes"] > 64 * MiB
    # the log is outside the manifest: the bundle still verifies, and lists no log file
    from fastv_export.bundle import load_bundle
    assert not any(name.startswith("logs") for name in load_bundle(out).files)


@pytest.mark.slow   # validates a tiny bundle
def test_validate_and_build_refuse_in_one_line_and_validate_records_its_peak(exported_bundle, tmp_path, capsys,
                                                                             monkeypatch, caplog):
    path = copy_bundle(exported_bundle(), tmp_path)
    manifest = (path / "manifest.json").read_bytes()
    monkeypatch.setenv(memory.AVAILABLE_ENV, "1M")
    rc, err = run_cli(capsys, ["validate", str(path), "--max-new-tokens", "2", "--batch-sizes", "1"])
    assert rc == 2 and len(err.splitlines()) == 1 and "validate needs about" in err and "skip" in err, err
    assert not (path / "validation").exists() and not (path / "logs").exists()
    rc, err = run_cli(capsys, ["build", str(path), "--no-plugin", "--backend", "tensorrt-rtx"])
    assert rc == 2 and len(err.splitlines()) == 1 and "build needs about" in err and "largest graph" in err, err
    assert (path / "manifest.json").read_bytes() == manifest and not list(path.glob("*.engine"))
    monkeypatch.delenv(memory.AVAILABLE_ENV)
    with caplog.at_level(logging.INFO, logger="fastv_export"):
        rc, err = run_cli(capsys, ["-v", "validate", str(path), "--max-new-tokens", "2", "--batch-sizes", "1"])
    assert rc == 0, err
    assert "validate: peak RSS" in caplog.text
    rec = memory.read_stage_log(path)["validate"]
    assert rec["peak_rss_bytes"] > 0 and rec["extra"] == {"passed": True, "runner": "onnxruntime"}


# ------------------------------------------------------------------------------------------------ lean validation
@pytest.mark.slow   # validates a tiny bundle
def test_validation_never_holds_the_model_and_a_session_together(exported_bundle, monkeypatch):
    """Every PyTorch model validation loads is dead (weakref) when an ONNX Runtime session opens, and every
    session is dead when a model is loaded: the old order (model loaded, then all four sessions) fails this."""
    import onnxruntime as ort

    import fastv_export.validate as validate

    models: list[weakref.ref] = []
    sessions: list[weakref.ref] = []
    overlaps: list[str] = []
    real_load, real_session = validate.load_model, ort.InferenceSession

    def alive(refs):
        gc.collect()
        return [r for r in refs if r() is not None]

    def load_model(*args, **kwargs):
        if alive(sessions):
            overlaps.append(f"a model loaded while {len(alive(sessions))} sessions are open")
        model = real_load(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    class Session(real_session):
        def __init__(self, *args, **kwargs):
            if alive(models):
                overlaps.append(f"a session opened while {len(alive(models))} models are alive")
            super().__init__(*args, **kwargs)
            sessions.append(weakref.ref(self))

    monkeypatch.setattr(validate, "load_model", load_model)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    report = validate.validate_bundle(exported_bundle(), max_new_tokens=4, batch_sizes=(1, 2))
    assert report["passed"]
    assert len(sessions) == 4 and len(models) >= 1, (len(sessions), len(models))
    assert overlaps == []


# ------------------------------------------------------------------------------------------------ lean export
def test_a_graph_made_whole_from_its_data_file_equals_the_graph(exported_bundle, tmp_path):
    """The export's streamed one-file writer (weights copied from <graph>.onnx.data in chunks) gives the same graph
    as onnx's own: same nodes, inputs, outputs and initializers (compared as arrays), and ONNX Runtime loads it."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from fastv_export.export.onnx_export import _write_whole

    original = onnx.load(str(exported_bundle() / "post_k.onnx"))
    external = tmp_path / "post_k.onnx"
    onnx.save_model(onnx.ModelProto.FromString(original.SerializeToString()), str(external),   # (converts in place)
                    save_as_external_data=True, all_tensors_to_one_file=True,
                    location="post_k.onnx.data", size_threshold=0)
    whole = tmp_path / "whole.onnx"
    assert _write_whole(external, tmp_path / "post_k.onnx.data", whole, chunk=4096)   # many chunks per tensor
    got = onnx.load(str(whole))
    assert list(got.graph.node) == list(original.graph.node)
    assert got.graph.input == original.graph.input and got.graph.output == original.graph.output
    arrays = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    expected = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    assert arrays.keys() == expected.keys() and len(expected) > 10
    assert all(arrays[k].dtype == expected[k].dtype and np.array_equal(arrays[k], expected[k]) for k in expected)
    ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------- checkpoint file pages
def test_dropping_file_pages_releases_a_read_only_mapping_and_keeps_its_bytes(tmp_path):
    """A read-only map of a 64 MiB file, every page read (resident), is released by the page dropper; its bytes
    read again are the file's (an independent read)."""
    import mmap

    data = np.random.default_rng(0).integers(0, 256, 64 * MiB, dtype=np.uint8)
    path = tmp_path / "shard.bin"
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, dtype=np.uint8)
    before = memory.current_rss()
    assert int(view[::4096].sum()) >= 0                         # fault every page in
    resident = memory.current_rss()
    assert resident - before > 48 * MiB
    with memory.dropping_file_pages([path], interval_s=0.01):
        pass
    assert memory.current_rss() < resident - 48 * MiB
    assert np.array_equal(view, data)
    del view
    mm.close()


def test_dropping_file_pages_never_loses_a_written_page_of_a_private_map(tmp_path):
    """A private copy-on-write map (safetensors maps shards so) whose first page the process wrote keeps that write
    through the page dropper; the file is unchanged."""
    import mmap

    path = tmp_path / "shard.bin"
    path.write_bytes(bytes(8 * MiB))
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    mm[:5] = b"hello"
    mm[4096 * 7: 4096 * 7 + 3] = b"abc"
    with memory.dropping_file_pages([path], interval_s=0.01):
        pass
    assert mm[:5] == b"hello" and mm[4096 * 7: 4096 * 7 + 3] == b"abc" and mm[5:4096] == bytes(4091)
    mm.close()
    assert path.read_bytes() == bytes(8 * MiB)


def test_a_checkpoint_loads_the_same_weights_with_its_pages_dropped(tmp_path):
    """load_model on a checkpoint directory (pages dropped while loading) gives the weights a plain
    from_pretrained gives, bit for bit, in bf16 -> fp32 and fp16 -> fp16."""
    import torch
    import transformers

    from fastv_export.presets import build_preset, load_model

    src = build_preset("tiny-llava")
    ckpt = tmp_path / "ckpt"
    src.to(torch.bfloat16).save_pretrained(ckpt)
    assert list(ckpt.glob("*.safetensors"))
    for dtype in (None, torch.float16):
        got = load_model(str(ckpt), dtype=dtype).state_dict()
        want = transformers.LlavaForConditionalGeneration.from_pretrained(
            ckpt, local_files_only=True, dtype=dtype or torch.float32).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
