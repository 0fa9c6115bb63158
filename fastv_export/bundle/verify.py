"""Reading and verifying a bundle: ``manifest.json`` against the JSON Schema shipped beside this module
(``manifest.schema.json``, docs/manifest.md), then what a schema cannot say (K against the layer count, R,
graph I/O against the graph spec, engine records), then the files (sizes, sha256, ONNX parse and I/O).
Every problem is one line naming the file and the field (FastVError); nothing is written.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fastv_export.errors import FastVError
from fastv_export.files import sha256
from fastv_export.graphs import op, spec
from fastv_export.bundle.view import MANIFEST, Bundle, Manifest

SCHEMA_VERSION = 3
#: the manifest's JSON Schema (draft 2020-12), installed with the package
SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")

#: the ``serving`` fields that name a file of the bundle (a role: the file, or null)
SERVING_ROLES = ("tokenizer", "tokenizer_config", "special_tokens_map", "chat_template", "image_processor",
                 "video_processor", "processor", "generation_config")
#: the numbers each dynamic vision layout records for the runtime's host-side feeds
VISION_LAYOUT_FIELDS = {"patch_grid": ("patch_size", "temporal_patch_size", "spatial_merge_size", "window_size"),
                        "tiles": ("tile", "patches_per_side", "pinpoints", "max_num_patches", "pooled_side",
                                  "default_size", "default_tiles")}


def onnx_io(values) -> list[dict]:
    """An ONNX graph's inputs or outputs as the manifest lists them (name, numpy dtype name, dims)."""
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                 for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": shape})
    return out


def load_bundle(path: str | Path, check_onnx: bool = True) -> Bundle:
    """Verify a bundle directory and return it; FastVError names the file and field on any mismatch.

    Order: the manifest parses (strict JSON), ``schema_version`` is this one's, the JSON Schema
    (``manifest.schema.json``: types, ranges, required and unknown fields), then what the schema cannot
    say (:func:`check_manifest`), then the files (listed ones exist, sizes, sha256, ONNX parse and I/O)
    and the engine records. Only the first problem is reported; nothing is written."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise FastVError(f"{root} is not a bundle directory (run `fastv-export export --out {root}` first)")
    if not mpath.is_file():
        raise FastVError(f"{mpath} is missing: not a fastv-export bundle")
    manifest = read_manifest(mpath)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FastVError(f"{mpath}: field 'schema_version' is {_short(version)}, this fastv-export reads "
                         f"{SCHEMA_VERSION}; re-export the bundle with this version")
    check_manifest(manifest, mpath)
    _verify_files(root, manifest)
    if check_onnx:
        _check_graph_files(root, manifest)
    _verify_engine_records(manifest, mpath)
    return Bundle(root, manifest)


def _leaves_directory(name: str) -> bool:
    """Whether a file name of the manifest points outside the bundle directory: absolute, or through '..'."""
    return (name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")
            or ".." in name.replace("\\", "/").split("/"))


def bundle_file(root: Path, name: str, field: str) -> Path:
    """``root / name`` where it stays inside ``root`` (no absolute path, no '..', no symbolic link resolving
    outside it); FastVError naming ``field`` otherwise."""
    if _leaves_directory(name):
        raise FastVError(f"{root / MANIFEST} field '{field}' names {_short(name)}, a file outside the bundle "
                         "directory; re-export the bundle")
    f = root / name
    if f.is_symlink():
        target = f.resolve()
        if not target.is_relative_to(root.resolve()):
            raise FastVError(f"{f} is a symbolic link to {target}, outside the bundle directory ({MANIFEST} field "
                             f"'{field}'): copy the file into the bundle or re-export it")
    return f


def _check_paths(m: Mapping, mpath: Path) -> None:
    """No file name of the manifest leaves the bundle directory (before the schema, whose file-name pattern
    refuses them too, so that the line says what is wrong)."""
    def check(value: Any, parts: Sequence) -> None:
        if isinstance(value, str) and _leaves_directory(value):
            raise _field_error(mpath, parts, f"{_short(value)} names a file outside the bundle directory (an "
                                             "absolute path or one through '..'); every file of a bundle is a plain "
                                             "name inside it")

    files = m.get("files")
    if isinstance(files, dict):
        for name in files:
            if _leaves_directory(name):
                raise _field_error(mpath, ["files"], f"the entry {_short(name)} names a file outside the bundle "
                                                     "directory (an absolute path or one through '..'); every file "
                                                     "of a bundle is a plain name inside it")
    graphs = m.get("graphs")
    if isinstance(graphs, dict):
        for graph, entry in graphs.items():
            if isinstance(entry, dict):
                check(entry.get("file"), ["graphs", graph, "file"])
    engines = m.get("engines")
    if isinstance(engines, dict):
        for key in ("timing_cache", "trtexec_script"):
            check(engines.get(key), ["engines", key])
        if isinstance(engines.get("engines"), dict):
            for graph, e in engines["engines"].items():
                if isinstance(e, dict):
                    check(e.get("file"), ["engines", "engines", graph, "file"])
    serving = m.get("serving")
    if isinstance(serving, dict):
        for role in SERVING_ROLES:
            check(serving.get(role), ["serving", role])


def _verify_files(root: Path, manifest: Mapping) -> None:
    """Every file the manifest lists exists in ``root`` (inside it) with its recorded size and sha256."""
    for name, meta in manifest["files"].items():
        f = bundle_file(root, name, "files")
        if not f.is_file():
            raise FastVError(f"{f} is missing (listed in {MANIFEST} field 'files'); re-export the bundle")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise FastVError(f"{f} has {size} bytes, {MANIFEST} field 'files.{name}.bytes' says "
                             f"{meta['bytes']}: the file is truncated or was replaced")
        if sha256(f) != meta["sha256"]:
            raise FastVError(f"{f}: sha256 does not match {MANIFEST} field 'files.{name}.sha256': "
                             "the file was modified after export")


def _check_graph_files(root: Path, manifest: Mapping) -> None:
    """Each graph file parses as ONNX (weights not loaded) with the manifest's inputs and outputs."""
    import onnx

    for graph, entry in manifest["graphs"].items():
        f = root / entry["file"]
        try:
            model = onnx.load(str(f), load_external_data=False)
            found = {"inputs": onnx_io(model.graph.input), "outputs": onnx_io(model.graph.output)}
        except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
            raise FastVError(f"{f} is not a readable ONNX file ({type(exc).__name__}); re-export") from None
        for t in model.graph.initializer:
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if t.data_location == onnx.TensorProto.EXTERNAL and location is not None:
                bundle_file(root, location, f"graphs.{graph}.file: {f.name} initializer '{t.name}' external data")
        for io in ("inputs", "outputs"):
            if found[io] != entry[io]:
                raise FastVError(f"{f}: its {io} {_short([t['name'] for t in found[io]])} are not those of "
                                 f"{MANIFEST} field 'graphs.{graph}.{io}': the file was swapped or replaced; "
                                 "re-export the bundle")
        if graph == "pre_k":
            _check_token_select_node(model, manifest["fastv"], f)


def _check_token_select_node(model, fastv: Mapping, f: Path) -> None:
    """pre_k's fastv::TokenSelect node (``model``: an onnx.ModelProto) must carry the manifest's settings."""
    import onnx

    nodes = [n for n in model.graph.node if n.domain == op.OP_DOMAIN and n.op_type == op.OP_TYPE]
    if len(nodes) != 1:
        raise FastVError(f"{f} has {len(nodes)} {op.OP_DOMAIN}::{op.OP_TYPE} nodes, expected 1 (field 'graphs.pre_k' "
                         f"of {MANIFEST}); re-export the bundle")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    want = {"ranking": fastv["ranking"].encode(), "ratio_num": fastv["ratio_num"], "ratio_den": fastv["ratio_den"],
            "keep": -1 if fastv["keep"] is None else fastv["keep"], "seed": fastv["seed"]}
    for name, value in want.items():
        if attrs.get(name) != value:
            got = attrs.get(name)
            got = got.decode() if isinstance(got, bytes) else got
            raise FastVError(f"{f}: its {op.OP_TYPE} node has {name}={_short(got)}, {MANIFEST} field 'fastv.{name}' "
                             f"says {_short(fastv[name])}; re-export the bundle")


# ---------------------------------------------------------------------------------------------- the schema
def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"field {key!r} appears twice in one object")
        out[key] = value
    return out


def read_manifest(mpath: Path) -> dict:
    """manifest.json parsed as strict JSON (UTF-8, no NaN/Infinity, no repeated keys), an object."""
    try:
        text = mpath.read_bytes().decode("utf-8")
        manifest = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:   # JSONDecodeError is a ValueError
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FastVError(f"{mpath} is not valid JSON ({what[:160]}); re-export the bundle") from None
    if not isinstance(manifest, dict):
        raise FastVError(f"{mpath}: top level must be an object")
    return manifest


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict:
    """The manifest's JSON Schema (draft 2020-12), ``fastv_export/manifest.schema.json``."""
    return json.loads(SCHEMA_FILE.read_text())


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    base = jsonschema.Draft202012Validator
    # an integer is a JSON integer: 64, never 64.0 (the draft counts 64.0 as an integer)
    checker = base.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    cls = jsonschema.validators.extend(base, type_checker=checker)
    schema = manifest_schema()
    base.check_schema(schema)
    return cls(schema)


#: the top-level fields every manifest has (the schema's ``required``)
REQUIRED = tuple(manifest_schema()["required"])


def _field(parts: Iterable) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, separators=(", ", ": "), ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


_ARTICLE = {"integer": "an integer", "object": "an object", "array": "an array", "string": "a string",
            "number": "a number", "boolean": "a boolean", "null": "null"}


def _fix(parts: Sequence) -> str:
    if parts and parts[0] == "engines":
        return "rebuild the engines with `fastv-export build`"
    return "re-export the bundle"


def _field_error(mpath: Path, parts: Sequence, what: str) -> FastVError:
    return FastVError(f"{mpath} field '{_field(parts)}': {what}; {_fix(parts)}")


def _schema_error(error, mpath: Path) -> FastVError:
    """One line for the first schema violation: the file, the field's JSON path, what is wrong."""
    from jsonschema.exceptions import best_match

    if error.context:
        error = best_match([error])
    parts = list(error.absolute_path)
    inst, kind, value = error.instance, error.validator, error.validator_value
    if "propertyNames" in error.absolute_schema_path:
        return _field_error(mpath, parts, f"the entry name {_short(inst)} is not a plain file name in the bundle")
    if kind == "required":
        missing = next(k for k in value if k not in inst)
        return FastVError(f"{mpath}: required field {_field(parts + [missing])!r} is missing; {_fix(parts)}")
    if kind == "additionalProperties":
        allowed = error.schema.get("properties", {})
        extra = next(k for k in inst if k not in allowed)
        return _field_error(mpath, parts + [extra], "unknown field (this schema version does not have it)")
    if kind == "type":
        types = [value] if isinstance(value, str) else value
        return _field_error(mpath, parts, f"{_short(inst)} is not {' or '.join(_ARTICLE.get(t, t) for t in types)}")
    if kind == "enum":
        return _field_error(mpath, parts, f"{_short(inst)} is not one of {', '.join(_short(v) for v in value)}")
    if kind == "const":
        return _field_error(mpath, parts, f"{_short(inst)} is not {_short(value)}")
    if kind == "pattern":
        what = "a sha256 (64 lowercase hex digits)" if value == "^[0-9a-f]{64}$" else f"of the form {value!r}"
        return _field_error(mpath, parts, f"{_short(inst)} is not {what}")
    if kind in ("minItems", "maxItems"):
        bound = "at least" if kind == "minItems" else "at most"
        return _field_error(mpath, parts, f"has {len(inst)} items, expected {bound} {value}")
    if kind in ("minProperties", "maxProperties"):
        bound = "at least" if kind == "minProperties" else "at most"
        return _field_error(mpath, parts, f"has {len(inst)} entries, expected {bound} {value}")
    if kind == "not" and parts == ["positions"]:
        return _field_error(mpath, parts, "mrope_section, spatial_merge_size and the video_* fields "
                                          "belong to rank-3 (M-RoPE) positions only")
    message = " ".join(str(error.message).split())
    return _field_error(mpath, parts, message if len(message) <= 160 else message[:157] + "...")


def check_manifest(manifest: dict, mpath: Path = Path(MANIFEST)) -> None:
    """The manifest against the JSON Schema, then against itself and the graph spec; raises FastVError
    for the first problem (one line: the file, the field, what to do)."""
    _check_paths(manifest, mpath)
    error = next(iter(_validator().iter_errors(manifest)), None)
    if error is not None:
        raise _schema_error(error, mpath)
    _check_consistency(manifest, mpath)


def _check_consistency(m: dict, mpath: Path) -> None:  # noqa: C901 - a list of independent checks
    """What the schema cannot say: fields that must agree with each other and with the graph spec."""
    def fail(parts: Sequence, what: str):
        raise _field_error(mpath, parts, what)

    src, fv, it = m["source_model"], m["fastv"], m["image_tokens"]
    num_layers, k = src["num_layers"], fv["k"]
    if k >= num_layers:
        fail(["fastv", "k"], f"{k} is not below source_model.num_layers ({num_layers})")
    num, den = fv["ratio_num"], fv["ratio_den"]
    if num >= den:
        fail(["fastv", "ratio_num"], f"{num} is not below fastv.ratio_den ({den}): R = ratio_num/ratio_den "
                                     "must lie in [0, 1)")
    if math.gcd(num, den) != 1:
        fail(["fastv", "ratio_num"], f"{num}/{den} is not in lowest terms")
    if fv["ratio"] != f"{num}/{den}":
        fail(["fastv", "ratio"], f"{_short(fv['ratio'])} is not ratio_num/ratio_den ({num}/{den})")
    if fv["keep"] is not None and (num, den) != (0, 1):
        fail(["fastv", "keep"], f"{fv['keep']} is given with a ratio of {num}/{den}: a bundle has one or the other")
    # image tokens: the compact runs, their image-token count, the vision input
    runs = it["prompt_tokens_per_image"]
    for i in range(1, len(runs)):
        if runs[i][0] == runs[i - 1][0]:
            fail(["image_tokens", "prompt_tokens_per_image", i], f"repeats the token id of run {i - 1}: "
                                                                 "runs must be compact ([token_id, count])")
    count = sum(c for t, c in runs if t in it["token_ids"])
    if count != it["per_image"]:
        fail(["image_tokens", "prompt_tokens_per_image"], f"holds {count} image tokens (ids in token_ids), "
                                                          f"image_tokens.per_image says {it['per_image']}")
    if it["vision_input"] != m["graphs"]["vision"]["inputs"][0]:
        fail(["image_tokens", "vision_input"], "differs from graphs.vision.inputs[0]")
    view = Manifest(m)
    layout = view.vision_layout
    missing = [key for key in VISION_LAYOUT_FIELDS.get(layout["kind"], ()) if key not in layout]
    if missing:
        fail(["image_tokens", "vision_layout"], f"kind {layout['kind']!r} needs the fields {', '.join(missing)}")
    pos = m["positions"]
    if layout["kind"] == "patch_grid" and "spatial_merge_size" in pos \
            and layout["spatial_merge_size"] != pos["spatial_merge_size"]:   # one merge size: feeds and positions
        fail(["image_tokens", "vision_layout", "spatial_merge_size"],
             f"is {layout['spatial_merge_size']}, positions.spatial_merge_size says {pos['spatial_merge_size']}")
    if pos["rank"] == 3:
        grid = it.get("grid_thw")
        if grid is None:
            raise FastVError(f"{mpath}: required field 'image_tokens.grid_thw' is missing (rank-3 positions); "
                             "re-export the bundle")
        merged = grid[0] * grid[1] * grid[2] // pos["spatial_merge_size"] ** 2
        if merged != it["per_image"]:
            fail(["image_tokens", "grid_thw"], f"{_short(grid)} merges to {merged} tokens, image_tokens.per_image "
                                               f"says {it['per_image']}")
    # the KV cache
    float_dtype = spec.PRECISIONS[m["precision"]]
    kv = m["kv_cache"]
    if kv["dtype"] != float_dtype:
        fail(["kv_cache", "dtype"], f"{_short(kv['dtype'])} is not {float_dtype!r} (precision {m['precision']})")
    if len(kv["layers"]) != num_layers:
        fail(["kv_cache", "layers"], f"has {len(kv['layers'])} entries, source_model.num_layers is {num_layers}")
    for i, layer in enumerate(kv["layers"]):
        want = "pre_k" if i < k else "post_k"
        if layer["layer"] != i:
            fail(["kv_cache", "layers", i, "layer"], f"{layer['layer']} is not {i}")
        if layer["graph"] != want:
            fail(["kv_cache", "layers", i, "graph"], f"{_short(layer['graph'])} is not {want!r} (K={k})")
    # the graphs' I/O against the graph spec (fastv_export.graphs.spec)
    sizes = spec.model_sizes(view)
    specs = spec.graph_specs(view)
    files = m["files"]
    for name, g in specs.items():
        entry = m["graphs"][name]
        if entry["file"] != g.file:
            fail(["graphs", name, "file"], f"{_short(entry['file'])} is not {g.file!r}")
        if entry["file"] not in files:
            raise FastVError(f"{mpath}: field 'graphs.{name}.file' names {entry['file']!r}, which 'files' does "
                             "not list; re-export the bundle")
        table = g.io_table(sizes, float_dtype)
        for io in ("inputs", "outputs"):
            want, got = table[io], entry[io]
            if len(got) != len(want):
                fail(["graphs", name, io], f"has {len(got)} tensors, the graph spec has {len(want)} "
                                           f"({_short([t['name'] for t in want])})")
            for i, (a, b) in enumerate(zip(got, want)):
                for key in ("name", "dtype", "shape"):
                    if a[key] != b[key]:
                        fail(["graphs", name, io, i, key], f"{_short(a[key])} is not {_short(b[key])} (graph spec)")
    opsets = m["graphs"]["pre_k"]["opsets"]
    if opsets.get(op.OP_DOMAIN) != op.OP_VERSION:
        fail(["graphs", "pre_k", "opsets", op.OP_DOMAIN], f"{_short(opsets.get(op.OP_DOMAIN))} is not "
                                                          f"{op.OP_VERSION} (fastv::TokenSelect's version)")
    # the serving files: each named one is a file of the bundle
    for role in SERVING_ROLES:
        name = m["serving"][role]
        if name is not None and name not in files:
            raise FastVError(f"{mpath}: field 'serving.{role}' names {name!r}, which 'files' does not list; "
                             "re-export the bundle")
    if m["engines"] is not None:
        _check_engines(m, view, sizes, specs, fail)


def _check_engines(m: Mapping, view: Manifest, sizes: dict, specs: dict, fail) -> None:
    from fastv_export.engines import profiles

    sec, files = m["engines"], m["files"]
    if sec["precision"] != m["precision"]:
        fail(["engines", "precision"], f"{_short(sec['precision'])} is not the bundle's precision "
                                       f"{m['precision']!r}")
    has_plugin = sec["plugin"] is not None
    if (sec["token_select"] == "plugin") != has_plugin:
        fail(["engines", "token_select"], f"{_short(sec['token_select'])} does not agree with engines.plugin "
                                          f"({'set' if has_plugin else 'null'})")
    if has_plugin and op.PLUGIN_LIBRARY not in files:
        fail(["engines", "plugin"], f"is set but 'files' does not list {op.PLUGIN_LIBRARY}")
    for key in ("timing_cache", "trtexec_script"):
        if sec[key] not in files:
            fail(["engines", key], f"names {_short(sec[key])}, which 'files' does not list")
    try:
        limits = profiles.BuildLimits(**sec["limits"])
        n = profiles.lengths(view, limits)
    except FastVError as exc:
        fail(["engines", "limits"], str(exc).rstrip("."))
    for key, value in (("prompt", n.prompt), ("image_tokens", n.image_tokens), ("kept", n.kept),
                       ("new_tokens", n.new_tokens)):
        if sec["lengths"][key] != value:
            fail(["engines", "lengths", key], f"{sec['lengths'][key]} is not {value} (what engines.limits imply)")
    for graph, e in sec["engines"].items():
        where = ["engines", "engines", graph]
        if e["file"] != f"{graph}.engine":
            fail(where + ["file"], f"{_short(e['file'])} is not {graph + '.engine'!r}")
        if e["file"] not in files:
            fail(where + ["file"], f"names {e['file']!r}, which 'files' does not list")
        if e["bytes"] != files[e["file"]]["bytes"]:
            fail(where + ["bytes"], f"{e['bytes']} is not files.{e['file']}.bytes ({files[e['file']]['bytes']})")
        want_plugin = 1 if graph == "pre_k" and has_plugin else 0
        if e["plugin_layers"] != want_plugin:
            fail(where + ["plugin_layers"], f"{e['plugin_layers']} is not {want_plugin}")
        kv_bytes = profiles.kv_cache_bytes(view, limits, graph)
        if e["kv_cache_bytes_at_max"] != kv_bytes:
            fail(where + ["kv_cache_bytes_at_max"], f"{e['kv_cache_bytes_at_max']} is not {kv_bytes} (what "
                                                    "engines.limits imply)")
        dynamic = {t.name: t.shape(sizes) for t in specs[graph].inputs
                   if not all(isinstance(d, int) for d in t.shape(sizes))}
        names = [p["name"] for p in e["profiles"]]
        want_names = [] if not dynamic else ["media"] if graph == "vision" else ["prefill", "decode"]
        if names != want_names:
            fail(where + ["profiles"], f"are {_short(names)}, expected {_short(want_names)}")
        for i, prof in enumerate(e["profiles"]):
            if list(prof["shapes"]) != list(dynamic):
                fail(where + ["profiles", i, "shapes"], f"name {_short(list(prof['shapes']))}, the graph's dynamic "
                                                        f"inputs are {_short(list(dynamic))}")
            for tensor, r in prof["shapes"].items():
                dims = dynamic[tensor]
                for bound in ("min", "opt", "max"):
                    shape = r[bound]
                    if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
                        fail(where + ["profiles", i, "shapes", tensor, bound],
                             f"{_short(shape)} does not fit the input's shape {_short(dims)}")
                if not all(a <= b <= c for a, b, c in zip(r["min"], r["opt"], r["max"])):
                    fail(where + ["profiles", i, "shapes", tensor], "min <= opt <= max does not hold")


def _verify_engine_records(manifest: dict, mpath: Path) -> None:
    """The ``engines`` section (when engines were built; its shape is the schema's) must name files whose
    checksums are those of ``files`` (which load_bundle has just verified against the files themselves)."""
    section = manifest["engines"]
    if section is None:
        return
    files = manifest["files"]
    for graph, e in section["engines"].items():
        if files[e["file"]]["sha256"] != e["sha256"]:
            raise FastVError(f"{mpath}: field 'engines.engines.{graph}.sha256' does not match the file "
                             f"{e['file']!r}: the engine is not the one built; rebuild with fastv-export build")
    plugin = section["plugin"]
    if plugin is not None and files[op.PLUGIN_LIBRARY]["sha256"] != plugin["sha256"]:
        raise FastVError(f"{mpath}: field 'engines.plugin.sha256' does not match {op.PLUGIN_LIBRARY}: the plugin "
                         "library is not the one the engines were built with; rebuild with fastv-export build")
