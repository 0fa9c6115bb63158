"""Seeded corruptions of a tiny-llava bundle WITH engines (TensorRT-RTX, function body): manifest fields
removed, retyped, out of range, nested values replaced; files truncated, swapped, flipped, missing.
Every case must fail ``load_bundle`` with exactly one FastVError line naming the file and the field:
never a traceback, never accepted, and loading never changes the bundle. The same cases go through the C++
loader (`fastv-run --check`), in the release build and in the AddressSanitizer + UBSan build: one error line
and exit 1 each, never accepted, never a signal or a sanitizer report.

One export and one engine build per session (fixtures); each case edits one working copy and
restores it afterwards (the manifest, or the files it touched)."""
from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from fastv_export.bundle import MANIFEST, load_bundle
from fastv_export.errors import FastVError
from fastv_export.files import sha256
from tests.helpers import json_nodes, once_per_run, shared_dir

pytestmark = [pytest.mark.slow, pytest.mark.tensorrt]   # the fixture exports and builds (~1 min on 2 cores)

CASES = 150
#: fields whose removal leaves a valid manifest (rank-2 bundles do not have them anyway)
OPTIONAL = {"grid_thw", "mrope_section", "spatial_merge_size"}
#: fields free-form by nature: any string / number of the right type is valid (not corrupted by a range change)
WRONG_TYPES = ["text", 3.5, True, None, [], {}, [1, 2], {"a": 1}, 64.0, 7]


@pytest.fixture(scope="module")
def engine_bundle(exported_bundle, tmp_path_factory) -> Path:
    """A tiny-llava bundle (K=2, R=1/2) with its four engines built, once per test run (read-only: copy
    before editing)."""
    from fastv_export.engines.build import BuildOptions, build_engines

    def make(path: Path) -> None:
        shutil.copytree(exported_bundle("tiny-llava", 2, "1/2"), path, ignore=shutil.ignore_patterns("validation"))
        build_engines(path, BuildOptions(backend="tensorrt-rtx", use_plugin=False))

    path = once_per_run(shared_dir(tmp_path_factory) / "fuzz-engines", make)
    load_bundle(path)
    return path


@pytest.fixture(scope="module")
def work(engine_bundle, tmp_path_factory) -> Path:
    """One writable copy that every case edits and restores."""
    path = tmp_path_factory.mktemp("fuzz-work") / "b"
    shutil.copytree(engine_bundle, path)
    return path


def _snapshot(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


def _pick(rng, paths):
    """A path, the top-level section first chosen uniformly (else the engines' profiles dominate)."""
    sections = sorted({p[0] for p in paths})
    section = rng.choice(sections)
    return rng.choice([p for p in paths if p[0] == section])


def _get(m, path):
    for p in path:
        m = m[p]
    return m


def _set(m, path, value):
    _get(m, path[:-1])[path[-1]] = value


def _last_key(path) -> str | None:
    keys = [p for p in path if isinstance(p, str)]
    return keys[-1] if keys else None


def _kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "int" if isinstance(v, int) else "float"
    return type(v).__name__


# ---------------------------------------------------------------------------------------------- mutations
def remove_field(m, rng):
    paths = [p for p, _ in json_nodes(m) if p and isinstance(p[-1], str) and p[-1] not in OPTIONAL]
    path = _pick(rng, paths)
    del _get(m, path[:-1])[path[-1]]
    return f"removed {path}"


def remove_item(m, rng):
    # eos ids may be none (a model without EOS stops at max_new_tokens only): removing one is no corruption
    paths = [p for p, _ in json_nodes(m) if p and isinstance(p[-1], int) and "targets" not in p
             and "eos_token_id" not in p and "eos_token_ids" not in p]
    path = _pick(rng, paths)
    del _get(m, path[:-1])[path[-1]]
    return f"removed item {path}"


def retype(m, rng):
    paths = [p for p, v in json_nodes(m) if p and _last_key(p) not in ("eos_token_id", "pad_token_id")]
    path = _pick(rng, paths)
    old = _get(m, path)
    choices = [v for v in WRONG_TYPES if _kind(v) != _kind(old) and v is not None
               and not (_kind(old) == "float" and _kind(v) == "int")]
    new = copy.deepcopy(rng.choice(choices))
    _set(m, path, new)
    return f"retyped {path}: {old!r:.40} -> {new!r}"


RANGE_FIELDS = {
    ("fastv", "k"): [0, 4, 5, -1], ("fastv", "ratio_num"): [2, 3, -1], ("fastv", "ratio_den"): [0, 1, -2, 2**40],
    ("fastv", "seed"): [2**31, -1], ("fastv", "keep"): [-1, 5], ("image_tokens", "per_image"): [0, -3, 63, 65],
    ("positions", "rank"): [1, 3, 4], ("kv_cache", "num_kv_heads"): [0, 1, 3], ("kv_cache", "head_dim"): [0, 8],
    ("source_model", "num_layers"): [0, 1, 2, 5], ("source_model", "hidden_size"): [0, 63],
    ("source_model", "vocab_size"): [0, 511], ("engines", "limits", "max_batch"): [0, 2],
    ("engines", "limits", "max_new_tokens"): [0, 63], ("engines", "limits", "max_prompt"): [0, 64, 200],
    ("engines", "lengths", "kept"): [0, 95], ("engines", "engines", "pre_k", "plugin_layers"): [1, 2],
}


def out_of_range(m, rng):
    if rng.random() < 0.5:
        path = rng.choice(sorted(RANGE_FIELDS))
        new = rng.choice(RANGE_FIELDS[path])
    else:   # any integer made negative
        path = _pick(rng, [p for p, v in json_nodes(m) if p and _kind(v) == "int"])
        new = rng.choice([-1, -3, -(2**40)])
    old = _get(m, path)
    _set(m, path, new)
    return f"{path}: {old!r} -> {new!r}"


def _swap(m, a, b):
    va, vb = copy.deepcopy(_get(m, a)), copy.deepcopy(_get(m, b))
    _set(m, a, vb)
    _set(m, b, va)


NESTED = [
    lambda m, r: _set(m, ("graphs", "post_k", "outputs", 0, "shape"), ["batch", 1, 64]),
    lambda m, r: _set(m, ("graphs", "vision", "outputs", 0, "shape"), [32, 64]),
    lambda m, r: _set(m, ("graphs", "pre_k", "outputs", 1, "dtype"), "float32"),
    lambda m, r: _set(m, ("graphs", "embed", "inputs", 0, "name"), "token_ids"),
    lambda m, r: _swap(m, ("graphs", "pre_k", "inputs", 0), ("graphs", "pre_k", "inputs", 1)),
    lambda m, r: _swap(m, ("graphs", "pre_k"), ("graphs", "post_k")),
    lambda m, r: _swap(m, ("kv_cache", "layers", 1), ("kv_cache", "layers", 2)),
    lambda m, r: _swap(m, ("engines", "engines", "pre_k"), ("engines", "engines", "post_k")),
    lambda m, r: _swap(m, ("files", "pre_k.onnx"), ("files", "post_k.onnx")),
    lambda m, r: _swap(m, ("files", "vision.engine"), ("files", "embed.engine")),
    lambda m, r: _set(m, ("image_tokens", "prompt_tokens_per_image", 0), [500, 500]),
    lambda m, r: _set(m, ("image_tokens", "prompt_tokens_per_image"), [[500, 32], [500, 32]]),
    lambda m, r: _set(m, ("image_tokens", "prompt_tokens_per_image"), [500] * 64),
    lambda m, r: _set(m, ("image_tokens", "prompt_tokens_per_image"), [[500, 63], [7, 1]]),
    lambda m, r: _set(m, ("image_tokens", "token_ids"), [499]),
    lambda m, r: _set(m, ("image_tokens", "vision_input", "shape"), [1, 3, 28, 28]),
    lambda m, r: _set(m, ("producer",), {"name": "other-tool", "version": "1.0"}),
    lambda m, r: _set(m, ("producer",), "fastv-export 0.1.0"),
    lambda m, r: _get(m, ("pipeline",)).pop("decode"),
    lambda m, r: _set(m, ("pipeline", "prefill"), ["run it"]),
    lambda m, r: _set(m, ("fastv",), {"k": 2, "ratio": "1/2"}),
    lambda m, r: _set(m, ("fastv", "ratio"), "2/4"),
    lambda m, r: _get(m, ("fastv",)).update(ratio="2/4", ratio_num=2, ratio_den=4),
    lambda m, r: _get(m, ("fastv",)).update(ratio="3/4", ratio_num=3, ratio_den=4),
    lambda m, r: _set(m, ("fastv", "ranking"), "mean"),
    lambda m, r: _set(m, ("fastv", "seed"), 3),
    lambda m, r: _get(m, ("fastv",)).update(keep=32, ratio="0/1", ratio_num=0, ratio_den=1),
    lambda m, r: _set(m, ("precision",), "fp16"),
    lambda m, r: _set(m, ("engines", "precision"), "fp16"),
    lambda m, r: _set(m, ("engines", "token_select"), "plugin"),
    lambda m, r: _set(m, ("engines", "timing_cache"), "other.cache"),
    lambda m, r: _set(m, ("engines", "engines", "pre_k", "profiles"), []),
    lambda m, r: _set(m, ("engines", "engines", "post_k", "profiles", 0, "shapes", "hidden_states", "max"),
                      [1, 200, 64]),
    lambda m, r: _set(m, ("engines", "engines", "embed", "profiles", 0, "shapes", "input_ids", "min"), [1, 500]),
    lambda m, r: _set(m, ("engines", "engines", "vision", "file"), "embed.engine"),
    lambda m, r: _set(m, ("engines", "engines", "post_k", "sha256"), "0" * 64),
    lambda m, r: _set(m, ("engines", "plugin"), {"name": "TokenSelect"}),
    lambda m, r: _set(m, ("files", "../etc/passwd"), {"sha256": "0" * 64, "bytes": 1}),
    lambda m, r: _set(m, ("files", "pre_k.onnx", "sha256"), "ABC"),
    lambda m, r: _set(m, ("graphs", "pre_k", "opsets", "fastv"), 2),
    lambda m, r: _set(m, ("positions", "mrope_section"), [2, 3, 3]),
    lambda m, r: _set(m, ("schema_version",), 1),
    lambda m, r: _set(m, ("unexpected",), 1),
    lambda m, r: _set(m, ("graphs", "extra"), copy.deepcopy(m["graphs"]["vision"])),
]


def nested(m, rng):
    i = rng.randrange(len(NESTED))
    NESTED[i](m, rng)
    return f"nested #{i}"


MANIFEST_KINDS = [remove_field, remove_item, retype, out_of_range, nested]


def _write_manifest_text(path: Path, rng) -> str:
    text = (path / MANIFEST).read_text()
    how = rng.randrange(5)
    if how == 0:
        (path / MANIFEST).write_text(text[: rng.randrange(1, len(text) - 1)])
        return "manifest truncated"
    if how == 1:
        (path / MANIFEST).write_bytes(b"\xff\xfe" + text.encode())
        return "manifest not UTF-8"
    if how == 2:
        (path / MANIFEST).write_text(text.replace('"bytes": 1', '"bytes": NaN, "x": 1', 1))
        return "manifest with NaN"
    if how == 3:
        (path / MANIFEST).write_text(text.replace('{', '{"precision": "fp32", ', 1))
        return "manifest with a repeated key"
    (path / MANIFEST).unlink()
    return "manifest missing"


def corrupt_files(path: Path, rng) -> tuple[str, list[str]]:
    """Change files on disk (the manifest untouched unless ``rehash``); returns what and the names touched."""
    man = json.loads((path / MANIFEST).read_text())
    names = sorted(man["files"])
    how = rng.randrange(7)
    if how == 0:                                                      # truncated
        name = rng.choice(names)
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: rng.randrange(0, max(1, len(data)))])
        return f"{name} truncated", [name]
    if how == 1:                                                      # one byte flipped
        name = rng.choice(names)
        data = bytearray((path / name).read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (path / name).write_bytes(bytes(data))
        return f"{name} byte flipped", [name]
    if how == 2:                                                      # missing
        name = rng.choice(names)
        (path / name).unlink()
        return f"{name} missing", [name]
    if how in (3, 4):                                                 # swapped, maybe with the manifest rehashed
        ext = rng.choice([".onnx", ".engine"])
        a, b = rng.sample([n for n in names if n.endswith(ext)], 2)
        da, db = (path / a).read_bytes(), (path / b).read_bytes()
        (path / a).write_bytes(db)
        (path / b).write_bytes(da)
        if how == 4:
            for n in (a, b):
                man["files"][n] = {"sha256": sha256(path / n), "bytes": (path / n).stat().st_size}
            (path / MANIFEST).write_text(json.dumps(man, indent=1))
        return f"{a} <-> {b} swapped" + (" and rehashed" if how == 4 else ""), [a, b, MANIFEST]
    if how == 5:                                                      # an ONNX file truncated and rehashed
        name = rng.choice([n for n in names if n.endswith(".onnx")])
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: rng.randrange(1, len(data) // 2)])
        man["files"][name] = {"sha256": sha256(path / name), "bytes": (path / name).stat().st_size}
        (path / MANIFEST).write_text(json.dumps(man, indent=1))
        return f"{name} truncated and rehashed", [name, MANIFEST]
    return _write_manifest_text(path, rng), [MANIFEST]


# ---------------------------------------------------------------------------------------------- the test
def _restore(work: Path, good: Path, names) -> None:
    for n in names:
        shutil.copy2(good / n, work / n)


def _corrupt(case: int, good: Path, work: Path) -> tuple[str, list[str], bool]:
    """Apply case ``case`` to ``work`` (a copy of ``good``): (what, the names touched, whether the manifest
    itself was corrupted)."""
    rng = random.Random(1000 + case)
    kind = case % 6
    if kind < len(MANIFEST_KINDS):
        good_manifest = json.loads((good / MANIFEST).read_text())
        m = copy.deepcopy(good_manifest)
        what = MANIFEST_KINDS[kind](m, rng)
        assert m != good_manifest, what
        (work / MANIFEST).write_text(json.dumps(m, indent=1))
        return what, [MANIFEST], True
    what, touched = corrupt_files(work, rng)
    return what, touched, False


@pytest.mark.parametrize("case", range(CASES))
def test_corruption_gives_one_clear_line(case, engine_bundle, work):
    good_manifest = json.loads((engine_bundle / MANIFEST).read_text())
    touched = [MANIFEST]
    try:
        what, touched, manifest_case = _corrupt(case, engine_bundle, work)
        before = _snapshot(work)
        try:
            load_bundle(work)
        except FastVError as exc:
            message = str(exc)
        else:
            pytest.fail(f"case {case} ({what}) was accepted")
        assert _snapshot(work) == before, f"case {case} ({what}): loading changed the bundle"
        assert "\n" not in message and message.strip() == message, (what, message)
        assert len(message) < 400, (what, message)
        named = [MANIFEST] + list(good_manifest["files"])
        assert any(n in message for n in named), f"case {case} ({what}) names no file: {message}"
        if manifest_case and MANIFEST in message and "not valid JSON" not in message:
            assert "field" in message, f"case {case} ({what}) names no field: {message}"
    finally:
        _restore(work, engine_bundle, touched)
    load_bundle(work, check_onnx=False)                 # restored


def _fastv_run_refuses_every_case(exe: Path, good: Path, work: Path) -> dict[str, int]:
    """Every case through ``exe --bundle work --check``: exactly one 'fastv-run: error:' line naming a file of
    the bundle, exit 1; tallies the outcomes (a failure lists every case that was not refused cleanly)."""
    names = [MANIFEST] + list(json.loads((good / MANIFEST).read_text())["files"])
    tally = {"refused": 0, "accepted": 0, "crashed": 0, "other": 0}
    bad = []
    for case in range(CASES):
        touched = [MANIFEST]
        try:
            what, touched, _ = _corrupt(case, good, work)
            proc = subprocess.run([str(exe), "--bundle", str(work), "--check"], capture_output=True, text=True,
                                  timeout=120)
        finally:
            _restore(work, good, touched)
        lines = proc.stderr.strip().splitlines()
        if proc.returncode == 0:
            outcome = "accepted"
        elif proc.returncode < 0 or "Sanitizer" in proc.stderr or "runtime error:" in proc.stderr:
            outcome = "crashed"
        elif (proc.returncode == 1 and proc.stdout == "" and len(lines) == 1
              and lines[0].startswith("fastv-run: error: ") and any(n in lines[0] for n in names)
              and len(lines[0]) < 500):
            outcome = "refused"
        else:
            outcome = "other"
        tally[outcome] += 1
        if outcome != "refused":
            bad.append(f"case {case} ({what}): {outcome}, exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
    assert not bad, f"{exe}: {tally}\n" + "\n".join(bad)
    assert tally["refused"] == CASES
    # the good bundle itself is verified
    proc = subprocess.run([str(exe), "--bundle", str(work), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("verified"), proc.stderr
    return tally


def test_fastv_run_refuses_every_corruption(runtime_build, engine_bundle, work):
    _fastv_run_refuses_every_case(runtime_build, engine_bundle, work)


def test_fastv_run_refuses_every_corruption_under_the_sanitizers(runtime_sanitize_build, engine_bundle, work):
    """The sanitizer build (ASan + UBSan, leaks detected: it embeds no Python) through the same cases."""
    _fastv_run_refuses_every_case(runtime_sanitize_build, engine_bundle, work)


def test_the_fuzzed_bundle_loads_and_reads(engine_bundle):
    bundle = load_bundle(engine_bundle)
    assert bundle.image_prompt_tokens() == [500] * 64
    assert bundle.image_prompt_tokens() == [500] * 64
    assert bundle.engines.token_select == "onnx_function_body"
