"""fastv_export.bundle: ``load_bundle`` verifies a bundle (schema, fields, files, sizes, sha256, ONNX
parse) and every problem reads as one line naming the file and the field, with nothing written."""
from __future__ import annotations

import json

import pytest

from fastv_export.bundle import MANIFEST, REQUIRED, SCHEMA_VERSION, load_bundle
from fastv_export.errors import FastVError
from tests.helpers import copy_bundle, rewrite_checksum, run_cli


def test_what_is_not_a_bundle_is_named(tmp_path):
    """Manifest-level problems, on hand-written directories (no export needed)."""
    with pytest.raises(FastVError, match="is not a bundle directory"):
        load_bundle(tmp_path / "none")
    with pytest.raises(FastVError, match="manifest.json is missing"):
        load_bundle(tmp_path)
    man = tmp_path / MANIFEST
    man.write_text("{")
    with pytest.raises(FastVError, match="is not valid JSON"):
        load_bundle(tmp_path)
    man.write_text("[]")
    with pytest.raises(FastVError, match="top level must be an object"):
        load_bundle(tmp_path)
    man.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(FastVError, match="'schema_version' is 99"):
        load_bundle(tmp_path)
    fields = {key: {} for key in REQUIRED}
    fields["schema_version"] = SCHEMA_VERSION
    man.write_text(json.dumps({k: v for k, v in fields.items() if k != "files"}))
    with pytest.raises(FastVError, match="required field 'files' is missing"):
        load_bundle(tmp_path)
    fields["graphs"] = {"vision": {"file": "vision.onnx"}}
    man.write_text(json.dumps(fields))
    with pytest.raises(FastVError, match="'graphs.vision.file' names 'vision.onnx', which 'files' does not list"):
        load_bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]


@pytest.mark.slow
def test_bad_bundles_fail_with_one_line(exported_bundle, tmp_path, capsys):
    good = exported_bundle("tiny-llava", 2, "1/2")
    cases = {}
    b = copy_bundle(good, tmp_path, "missing")
    (b / "post_k.onnx").unlink()
    cases["missing"] = (b, "post_k.onnx is missing")
    b = copy_bundle(good, tmp_path, "truncated")
    data = (b / "pre_k.onnx").read_bytes()
    (b / "pre_k.onnx").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (b, "truncated")
    b = copy_bundle(good, tmp_path, "truncated_rehashed")
    (b / "pre_k.onnx").write_bytes(data[: len(data) // 2])
    rewrite_checksum(b, "pre_k.onnx")
    cases["truncated_rehashed"] = (b, "not a readable ONNX file")
    b = copy_bundle(good, tmp_path, "checksum")
    raw = bytearray((b / "embed.onnx").read_bytes())
    raw[-1] ^= 1
    (b / "embed.onnx").write_bytes(bytes(raw))
    cases["checksum"] = (b, "sha256 does not match")
    b = copy_bundle(good, tmp_path, "schema")
    man = json.loads((b / "manifest.json").read_text())
    man["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(man))
    cases["schema"] = (b, "'schema_version' is 99")
    for what, (path, message) in cases.items():
        before = sorted(p.name for p in path.iterdir())
        rc, err = run_cli(capsys, ["validate", str(path), "--max-new-tokens", "2", "--batch-sizes", "1"])
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (what, err)
        assert sorted(p.name for p in path.iterdir()) == before, what
