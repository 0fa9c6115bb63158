"""fastv_export.bundle: ``load_bundle`` verifies a bundle (JSON Schema, fields against each other and
the graph spec, files, sizes, sha256, ONNX parse) and every problem reads as one line naming the file
and the field, with nothing written. Seeded corruptions of a bundle with engines: test_manifest_fuzz.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastv_export.bundle import (MANIFEST, REQUIRED, SCHEMA_FILE, SCHEMA_VERSION, encode_runs, expand_runs,
                                 load_bundle, manifest_schema)
from fastv_export.errors import FastVError
from fastv_export.graphs import op, spec
from tests.helpers import PRESET_NAMES, copy_bundle, rewrite_checksum, run_cli


def test_what_is_not_a_bundle_is_named(tmp_path):
    """Manifest-level problems, on hand-written directories (no export needed)."""
    with pytest.raises(FastVError, match="is not a bundle directory"):
        load_bundle(tmp_path / "none")
    with pytest.raises(FastVError, match="manifest.json is missing"):
        load_bundle(tmp_path)
    man = tmp_path / MANIFEST
    for text in ("{", '{"a": NaN}', '{"a": 1, "a": 2}'):
        man.write_text(text)
        with pytest.raises(FastVError, match="is not valid JSON"):
            load_bundle(tmp_path)
    man.write_bytes(b"\xff\xfe{}")
    with pytest.raises(FastVError, match="is not valid JSON"):
        load_bundle(tmp_path)
    man.write_text("[]")
    with pytest.raises(FastVError, match="top level must be an object"):
        load_bundle(tmp_path)
    man.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(FastVError, match="'schema_version' is 99"):
        load_bundle(tmp_path)
    man.write_text(json.dumps({"schema_version": 1, "image_tokens": {"prompt_tokens_per_image": [500] * 64}}))
    with pytest.raises(FastVError, match="'schema_version' is 1, this fastv-export reads 3; re-export"):
        load_bundle(tmp_path)
    fields = {key: {} for key in REQUIRED}
    fields["schema_version"] = SCHEMA_VERSION
    man.write_text(json.dumps({k: v for k, v in fields.items() if k != "producer"}))
    with pytest.raises(FastVError, match="required field 'producer' is missing"):
        load_bundle(tmp_path)
    man.write_text(json.dumps(fields))
    with pytest.raises(FastVError, match=r"field 'producer': required field|required field 'producer.name' is missing"):
        load_bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]


def test_schema_is_draft_2020_12_and_agrees_with_the_code():
    """The shipped schema is a valid draft 2020-12 schema whose constants are the code's."""
    import jsonschema

    schema = manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    props = schema["properties"]
    assert props["schema_version"] == {"const": SCHEMA_VERSION}
    assert set(props["precision"]["enum"]) == set(spec.PRECISIONS)
    assert set(props["kv_cache"]["properties"]["dtype"]["enum"]) == set(spec.PRECISIONS.values())
    assert tuple(props["fastv"]["properties"]["ranking"]["enum"]) == op.RANKINGS
    assert props["fastv"]["properties"]["ratio_den"]["maximum"] == op.RATIO_DEN_LIMIT
    assert props["fastv"]["properties"]["seed"]["maximum"] == op.SEED_LIMIT - 1
    for section in (props["plugin"], props["engines"]["properties"]["plugin"]):
        assert {k: v["const"] for k, v in section["properties"].items() if "const" in v} == op.PLUGIN_IDENTITY
    assert set(props["graphs"]["required"]) == set(spec.GRAPHS)
    assert set(props["engines"]["properties"]["engines"]["required"]) == set(spec.GRAPHS)
    assert tuple(schema["required"]) == REQUIRED


def test_schema_ships_with_the_package_and_docs_point_at_it():
    """One source: fastv_export/bundle/manifest.schema.json is package data; docs/manifest.md links to it."""
    tomllib = pytest.importorskip("tomllib")

    root = Path(__file__).resolve().parents[1]
    assert SCHEMA_FILE == root / "fastv_export" / "bundle" / "manifest.schema.json" and SCHEMA_FILE.is_file()
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "manifest.schema.json" in pyproject["tool"]["setuptools"]["package-data"]["fastv_export.bundle"]
    assert any(d.startswith("jsonschema") for d in pyproject["project"]["dependencies"])
    doc = (root / "docs" / "manifest.md").read_text()
    assert "fastv_export/bundle/manifest.schema.json" in doc
    assert not (root / "docs" / "manifest.schema.json").exists()       # no second copy to drift


def test_run_length_encoding_of_prompt_tokens():
    assert encode_runs([]) == []
    assert encode_runs([500] * 64) == [[500, 64]]
    assert encode_runs([502, 500, 500, 503]) == [[502, 1], [500, 2], [503, 1]]
    assert encode_runs([7, 8, 7]) == [[7, 1], [8, 1], [7, 1]]
    for tokens in ([1], [500] * 64, [502] + [500] * 36 + [503], [3, 3, 4, 4, 4, 3]):
        assert expand_runs(encode_runs(tokens)) == tokens
        assert json.loads(json.dumps(encode_runs(tokens))) == encode_runs(tokens)


@pytest.mark.slow
@pytest.mark.parametrize("model", PRESET_NAMES)
def test_exported_manifests_pass_the_schema_and_the_spec(model, exported_bundle, tmp_path):
    good = exported_bundle(model, 2, "1/2")
    bundle = load_bundle(good)
    runs = json.loads((good / MANIFEST).read_text())["image_tokens"]["prompt_tokens_per_image"]
    assert all(a[0] != b[0] for a, b in zip(runs, runs[1:]))                   # compact
    tokens = bundle.image_prompt_tokens()
    assert sum(t in bundle.image_token_ids for t in tokens) == bundle.tokens_per_image
    if model == "tiny-llava":
        assert runs == [[500, 64]] and tokens == [500] * 64
    # the examples of issue 12: a range error and a nested list, each one line naming file and field
    b = copy_bundle(good, tmp_path)
    cases = [
        (("image_tokens", "per_image"), -3,
         "manifest.json field 'image_tokens.per_image': -3 is less than the minimum of 1; re-export the bundle"),
        (("image_tokens", "prompt_tokens_per_image", 0), [[500, 64]],
         "manifest.json field 'image_tokens.prompt_tokens_per_image[0][0]': [500, 64] is not an integer"),
        (("graphs", "post_k", "outputs", 0, "shape"), ["batch", 2, 512],
         "manifest.json field 'graphs.post_k.outputs[0].shape': [\"batch\", 2, 512] is not [\"batch\", 1, 512]"),
        (("fastv", "k"), 4, "manifest.json field 'fastv.k': 4 is not below source_model.num_layers (4)"),
        (("fastv", "ratio_num"), 2, "manifest.json field 'fastv.ratio_num': 2 is not below fastv.ratio_den (2)"),
    ]
    text = (good / MANIFEST).read_text()
    for (*parent, key), value, message in cases:
        man = json.loads(text)
        target = man
        for p in parent:
            target = target[p]
        target[key] = value
        (b / MANIFEST).write_text(json.dumps(man))
        with pytest.raises(FastVError) as exc:
            load_bundle(b)
        assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    (b / MANIFEST).write_text(text)
    load_bundle(b)


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


def test_config_hash_ignores_where_the_checkpoint_was_loaded_from(tmp_path):
    """A checkpoint moved to another directory is the same model (validate --model NEWDIR must not call the bundle
    stale); a changed config value is not."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from fastv_export.bundle import config_hash
    from fastv_export.presets import build_preset_config

    build_preset_config("tiny-qwen2.5-vl").save_pretrained(tmp_path / "a")
    build_preset_config("tiny-qwen2.5-vl").save_pretrained(tmp_path / "b")
    a, b = (AutoConfig.from_pretrained(tmp_path / d) for d in "ab")
    assert a._name_or_path != b._name_or_path
    assert config_hash(SimpleNamespace(config=a)) == config_hash(SimpleNamespace(config=b))
    b.text_config.rope_parameters["rope_theta"] = 5000.0
    assert config_hash(SimpleNamespace(config=a)) != config_hash(SimpleNamespace(config=b))
