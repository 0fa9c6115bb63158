"""No file outside the bundle directory: a manifest naming `../x`, an absolute path, or a file of the bundle that
is a symbolic link pointing out (graphs.*.file, files, engines, serving roles, an ONNX graph's external data) is
refused by both loaders, the Python `load_bundle` (fastv_export/bundle/verify.py) and the C++ one (`fastv-run
--check`, runtime/src/bundle.cpp), with one line naming the field; and the C++ loader reads the same JSON Schema
(manifest.schema.json, compiled in) and cross-checks: a schema violation is one line naming its JSON path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fastv_export.bundle import MANIFEST, load_bundle
from fastv_export.errors import FastVError

pytestmark = pytest.mark.slow   # one export per run, the C++ runtime built once per run


@pytest.fixture
def bundle(exported_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(exported_bundle("tiny-llava"), dst)
    return dst


def _edit(bundle: Path, change) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    (bundle / MANIFEST).write_text(json.dumps(m, indent=1))


def _python_line(bundle: Path) -> str:
    with pytest.raises(FastVError) as info:
        load_bundle(bundle)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def _cpp_line(exe: Path, bundle: Path) -> str:
    proc = subprocess.run([str(exe), "--bundle", str(bundle), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastv-run: error: "), proc.stderr
    return lines[0]


def _both(exe: Path, bundle: Path) -> tuple[str, str]:
    return _python_line(bundle), _cpp_line(exe, bundle)


OUTSIDE = "names a file outside the bundle directory"


@pytest.mark.parametrize("name", ["../outside.onnx", "/tmp/outside.onnx", "sub/../../outside.onnx"])
def test_graph_file_outside_the_bundle_is_refused_by_both(runtime_build, bundle, tmp_path, name):
    """The issue's case: graphs.embed.file (and its 'files' entry) naming a file beside the bundle, which a
    loader following it would run."""
    shutil.copy(bundle / "embed.onnx", tmp_path / "outside.onnx")
    target = name if not name.startswith("/") else str(tmp_path / "outside.onnx")

    def change(m):
        m["graphs"]["embed"]["file"] = target
        m["files"][target] = m["files"].pop("embed.onnx")
    _edit(bundle, change)
    for line in _both(runtime_build, bundle):
        assert OUTSIDE in line and "field 'files'" in line and json.dumps(target)[:20] in line, line
    # the graph entry alone (its 'files' entry kept): the graph field is named
    _edit(bundle, lambda m: m["files"].update({"embed.onnx": m["files"].pop(target)}))
    for line in _both(runtime_build, bundle):
        assert OUTSIDE in line and "field 'graphs.embed.file'" in line, line


@pytest.mark.parametrize("path,value", [
    (("engines",), {"timing_cache": "../timing.cache"}),
    (("engines",), {"engines": {"pre_k": {"file": "/etc/pre_k.engine"}}}),
    (("serving", "tokenizer"), "../tokenizer.json"),
    (("serving", "generation_config"), "/etc/generation_config.json"),
])
def test_other_path_fields_outside_the_bundle_are_refused_by_both(runtime_build, bundle, path, value):
    def change(m):
        node = m
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    _edit(bundle, change)
    for line in _both(runtime_build, bundle):
        assert OUTSIDE in line and "manifest.json field '" + path[0] in line, line


def test_symlink_pointing_outside_is_refused_by_both(runtime_build, bundle, tmp_path):
    outside = tmp_path / "elsewhere" / "embed.onnx"
    outside.parent.mkdir()
    (bundle / "embed.onnx").rename(outside)
    (bundle / "embed.onnx").symlink_to(outside)          # same bytes, same sha256: only the link is wrong
    for line in _both(runtime_build, bundle):
        assert "embed.onnx is a symbolic link to" in line and "outside the bundle directory" in line, line
        assert str(outside.resolve()) in line and "field 'files'" in line, line
    # a relative link through '..' is the same
    (bundle / "embed.onnx").unlink()
    (bundle / "embed.onnx").symlink_to(os.path.relpath(outside, bundle))
    for line in _both(runtime_build, bundle):
        assert "is a symbolic link to" in line, line
    # a link to a file inside the bundle is a file of the bundle
    shutil.copy(outside, bundle / "embed-copy.onnx")
    (bundle / "embed.onnx").unlink()
    (bundle / "embed.onnx").symlink_to("embed-copy.onnx")
    _edit(bundle, lambda m: m["files"].update({"embed-copy.onnx": m["files"]["embed.onnx"]}))
    load_bundle(bundle)
    assert subprocess.run([str(runtime_build), "--bundle", str(bundle), "--check"]).returncode == 0


def test_external_data_outside_the_bundle_is_refused_by_both(runtime_build, bundle, tmp_path):
    """An ONNX graph whose weights live in a file outside the bundle (external data location '../w.data'),
    listed and hashed as the export would: ONNX Runtime would read it; both loaders refuse the graph."""
    import onnx

    from fastv_export.files import sha256

    # the weights written as external data beside the graph, then moved out and the locations pointed there
    # (onnx.save itself refuses a location with '..': the file is written as protobuf bytes)
    onnx.save_model(onnx.load(str(bundle / "embed.onnx")), str(bundle / "embed.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    (bundle / "w.data").rename(tmp_path / "w.data")
    model = onnx.load(str(bundle / "embed.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.data"
    (bundle / "embed.onnx").write_bytes(model.SerializeToString())
    assert (tmp_path / "w.data").is_file()
    f = bundle / "embed.onnx"
    _edit(bundle, lambda m: m["files"].update({"embed.onnx": {"sha256": sha256(f), "bytes": f.stat().st_size}}))
    for line in _both(runtime_build, bundle):
        assert "external data" in line and "../w.data" in line and "outside the bundle directory" in line, line


def test_cpp_schema_violations_name_the_json_path(runtime_build, bundle):
    """The C++ loader checks manifest.schema.json itself (before: junk dtype/shape/name under graphs.*.outputs,
    kv_cache.layers.*.graph and positions.prefill were accepted); Python refuses the same manifests."""
    cases = [
        (lambda m: m["graphs"]["post_k"]["outputs"][0].update(dtype="float64"), "graphs.post_k.outputs[0].dtype"),
        (lambda m: m["graphs"]["vision"]["outputs"][0].update(shape="junk"), "graphs.vision.outputs[0].shape"),
        (lambda m: m["graphs"]["pre_k"]["outputs"][1].update(name=""), "graphs.pre_k.outputs[1].name"),
        (lambda m: m["kv_cache"]["layers"][2].update(graph="vision"), "kv_cache.layers[2].graph"),
        (lambda m: m["positions"].update(prefill=7), "positions.prefill"),
        (lambda m: m["source_model"].update(num_layers=4.0), "source_model.num_layers"),
        (lambda m: m["image_tokens"]["prompt_tokens_per_image"][0].__setitem__(1, 0),
         "image_tokens.prompt_tokens_per_image[0][1]"),   # prefixItems, read by valijson as draft-7 items
        (lambda m: m["serving"].update(extra=1), "serving.extra"),
    ]
    good = (bundle / MANIFEST).read_text()
    for change, path in cases:
        _edit(bundle, change)
        py, cpp = _both(runtime_build, bundle)
        assert f"field '{path}'" in py, py
        assert f"field '{path}'" in cpp or f"field '{path.rsplit('.', 1)[0]}'" in cpp, cpp
        (bundle / MANIFEST).write_text(good)
    # the cross-checks beyond the schema: the graph spec, the KV layers, repeated keys
    for change, path in [
        (lambda m: m["graphs"]["post_k"]["outputs"][0].update(dtype="int64"), "graphs.post_k.outputs[0].dtype"),
        (lambda m: m["graphs"]["embed"]["inputs"][0].update(name="token_ids"), "graphs.embed.inputs[0].name"),
        (lambda m: m["kv_cache"]["layers"][1].update(graph="post_k"), "kv_cache.layers[1].graph"),
        (lambda m: m["fastv"].update(k=4), "fastv.k"),
    ]:
        _edit(bundle, change)
        for line in _both(runtime_build, bundle):
            assert f"field '{path}'" in line, line
        (bundle / MANIFEST).write_text(good)
    (bundle / MANIFEST).write_text(good.replace("{", '{"precision": "fp32", ', 1))
    for line in _both(runtime_build, bundle):
        assert "is not valid JSON" in line and "precision" in line, line


def test_cpp_schema_is_the_python_schema_file():
    """The C++ library compiles in fastv_export/bundle/manifest.schema.json itself (no copy to drift)."""
    from fastv_export.bundle import SCHEMA_FILE

    cmake = (Path(__file__).resolve().parents[1] / "runtime" / "CMakeLists.txt").read_text()
    assert "../fastv_export/bundle/manifest.schema.json" in cmake
    assert SCHEMA_FILE == Path(__file__).resolve().parents[1] / "fastv_export" / "bundle" / "manifest.schema.json"
