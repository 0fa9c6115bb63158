"""The bundle: graphs + manifest.json, everything a C++ runtime needs (docs/design.md §4).

``write_manifest`` describes a freshly exported directory; ``load_bundle`` verifies one against the
JSON Schema shipped as ``fastv_export/manifest.schema.json`` (docs/manifest.md), then what a schema
cannot say (K against the layer count, R, graph I/O against the graph spec, files, sizes, sha256,
ONNX parse, engine records) and fails with one line naming the file and the field.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import onnx

from fastv_export import __version__
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.files import atomic_write_json, sha256
from fastv_export.graphs import op, spec

if TYPE_CHECKING:
    from fastv_export.adapters import ModelAdapter

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
#: the manifest's JSON Schema (draft 2020-12), installed with the package
SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")


def encode_runs(tokens: Sequence[int]) -> list[list[int]]:
    """[500, 500, 500, 7] -> [[500, 3], [7, 1]]: the manifest's compact form of a token sequence."""
    runs: list[list[int]] = []
    for t in tokens:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([int(t), 1])
    return runs


def expand_runs(runs: Sequence[Sequence[int]]) -> list[int]:
    """The inverse of :func:`encode_runs`."""
    return [t for t, count in runs for _ in range(count)]


def image_prompt_tokens(manifest: dict) -> list[int]:
    """The token ids one image takes in a prompt (manifest field ``image_tokens.prompt_tokens_per_image``,
    stored as [token_id, count] runs), expanded."""
    return expand_runs(manifest["image_tokens"]["prompt_tokens_per_image"])


def _io(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                 for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": shape})
    return out


def describe_graph(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    return {"file": path.name, "inputs": _io(m.graph.input), "outputs": _io(m.graph.output),
            "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import}}


def config_hash(adapter: ModelAdapter) -> str:
    return hashlib.sha256(adapter.config.to_json_string(use_diff=False).encode()).hexdigest()


def source_name(model: str | Path) -> str:
    """A preset's name, or the checkpoint directory as an absolute path (validate and run reload it)."""
    from fastv_export.presets import PRESETS

    return str(model) if str(model) in PRESETS else str(Path(model).resolve())


#: the numbers each dynamic vision layout records for the runtime's host-side feeds
VISION_LAYOUT_FIELDS = {"patch_grid": ("patch_size", "temporal_patch_size", "spatial_merge_size", "window_size"),
                        "tiles": ("tile", "patches_per_side", "pinpoints", "max_num_patches", "pooled_side",
                                  "default_size", "default_tiles")}


def write_manifest(out: Path, adapter: ModelAdapter, cfg: FastVConfig, options,
                   specs: dict[str, spec.GraphSpec]) -> dict:
    """Describe the freshly exported graphs ``specs`` in ``out`` (their I/O read back from the files)."""
    info = adapter.decoder_shape()
    k = cfg.k
    graphs = {name: describe_graph(out / g.file) for name, g in specs.items()}
    mrope = adapter.position_rank == 3
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "producer": {"name": "fastv-export", "version": __version__},
        "source_model": {"name": source_name(options.model), "architecture": type(adapter.model).__name__,
                         "adapter": adapter.name, "config_sha256": config_hash(adapter),
                         "num_layers": info.num_layers, "hidden_size": info.hidden_size,
                         "vocab_size": info.vocab_size,
                         "eos_token_id": adapter.text_config.eos_token_id,
                         "pad_token_id": adapter.text_config.pad_token_id,
                         **({"deepstack_layers": adapter.deepstack_layers()} if adapter.deepstack_layers() else {})},
        "fastv": cfg.to_manifest(),
        "precision": options.dtype,
        "image_tokens": {
            "token_ids": list(adapter.image_token_ids()),
            "per_image": adapter.image_tokens_per_image(),
            "prompt_tokens_per_image": encode_runs(adapter.image_prompt_tokens()),
            "candidates": "positions of every token whose id is in token_ids, all images in one pool; "
                          "every batch row must hold the same number",
            "vision_input": graphs["vision"]["inputs"][0],
            "vision_layout": {"kind": adapter.vision_layout, **adapter.vision_layout_params()},
            **({"grid_thw": list(adapter.image_grid)} if getattr(adapter, "image_grid", None) else {}),
        },
        "graphs": graphs,
        "pipeline": spec.pipeline_description(),
        "kv_cache": {
            "layout": "[batch, num_kv_heads, seq, head_dim]", "num_kv_heads": info.num_kv_heads,
            "head_dim": info.head_dim, "dtype": graphs["pre_k"]["outputs"][-1]["dtype"],
            "layers": [{"layer": i, "graph": "pre_k" if i < k else "post_k",
                        "prefill_length": "n (all prompt tokens)" if i < k else "n' (kept tokens)"}
                       for i in range(info.num_layers)],
        },
        "positions": {
            "input": spec.POSITION_IDS, "rank": adapter.position_rank,
            "kind": "mrope (t, h, w) triples, first axis" if mrope else "rope",
            "prefill": ("per row over real tokens: text tokens count up by 1; an image block of grid "
                        "(t, h/merge, w/merge) gets (offset + t_i, offset + h_i, offset + w_i), offset = the "
                        "position after the previous token, and the token after the block gets offset + "
                        "max(h/merge, w/merge); a run of video_token_id tokens is a video of t = run / (h/merge "
                        "* w/merge) temporal patches whose t_i is floor(i * video_tokens_per_second * seconds "
                        "per temporal patch of that video) (i when video_tokens_per_second is absent); "
                        "Qwen3-VL prompts put each temporal patch of a video in its own block after its "
                        "timestamp text, so every such run is t = 1 (t_i = 0, like an image); "
                        "padding gets 0" if mrope else
                        "per row: cumsum(attention_mask) - 1, padding gets 1"),
            "kept_tokens": f"keep their ORIGINAL position ids ({spec.SELECTED_POSITION_IDS})",
            "decode": "step t (0-based) of a row uses max(prompt position ids of that row) + 1 + t "
                      "(continues from the original, unpruned prompt)",
            **({"mrope_section": adapter.text_config.rope_parameters.get("mrope_section"),
                "spatial_merge_size": adapter.config.vision_config.spatial_merge_size,
                "video_token_id": int(adapter.config.video_token_id)} if mrope else {}),
            **({"video_tokens_per_second": adapter.config.vision_config.tokens_per_second}
               if mrope and getattr(adapter, "timed_video_positions", False) else {}),
        },
        "plugin": dict(op.PLUGIN_IDENTITY, used_by="pre_k.onnx node fastv_token_select (expands to its ONNX "
                                                   "function body when the library is not loaded)"),
        "engines": None,
        "files": {},
    }
    for f in sorted(out.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            manifest["files"][f.name] = {"sha256": sha256(f), "bytes": f.stat().st_size}
    check_manifest(manifest, out / MANIFEST)            # what load_bundle will require, before writing it
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


@dataclass
class Bundle:
    """A verified bundle directory and its manifest; the properties read the manifest's fields."""

    path: Path
    manifest: dict

    def file(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    @property
    def k(self) -> int:
        return self.manifest["fastv"]["k"]

    @property
    def num_layers(self) -> int:
        return self.manifest["source_model"]["num_layers"]

    @property
    def deepstack_layers(self) -> int:
        """DeepStack levels L of the model (0: none): the graphs carry one tensor per level."""
        return self.manifest["source_model"].get("deepstack_layers", 0)

    @property
    def hidden_size(self) -> int:
        return self.manifest["source_model"]["hidden_size"]

    @property
    def float_dtype(self) -> np.dtype:
        """numpy dtype of the graphs' float tensors (the bundle's precision)."""
        return np.dtype(spec.PRECISIONS[self.manifest["precision"]])

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim) of every layer's cache."""
        kv = self.manifest["kv_cache"]
        return kv["num_kv_heads"], kv["head_dim"]

    @property
    def image_token_ids(self) -> list[int]:
        return self.manifest["image_tokens"]["token_ids"]

    def image_prompt_tokens(self) -> list[int]:
        """The token ids one image takes in a prompt (placeholders and delimiters), expanded."""
        return image_prompt_tokens(self.manifest)

    @property
    def vision_input_shape(self) -> list:
        return self.manifest["image_tokens"]["vision_input"]["shape"]

    @property
    def eos_token_id(self) -> int | None:
        return self.manifest["source_model"].get("eos_token_id")

    @property
    def pad_token_id(self) -> int:
        return self.manifest["source_model"].get("pad_token_id") or 0


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
    files = manifest["files"]
    for name, meta in files.items():
        f = root / name
        if not f.is_file():
            raise FastVError(f"{f} is missing (listed in {MANIFEST} field 'files'); re-export the bundle")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise FastVError(f"{f} has {size} bytes, {MANIFEST} field 'files.{name}.bytes' says "
                             f"{meta['bytes']}: the file is truncated or was replaced")
        if sha256(f) != meta["sha256"]:
            raise FastVError(f"{f}: sha256 does not match {MANIFEST} field 'files.{name}.sha256': "
                             "the file was modified after export")
    if check_onnx:
        for graph, entry in manifest["graphs"].items():
            f = root / entry["file"]
            try:
                model = onnx.load(str(f), load_external_data=False)
                found = {"inputs": _io(model.graph.input), "outputs": _io(model.graph.output)}
            except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
                raise FastVError(f"{f} is not a readable ONNX file ({type(exc).__name__}); re-export") from None
            for io in ("inputs", "outputs"):
                if found[io] != entry[io]:
                    raise FastVError(f"{f}: its {io} {_short([t['name'] for t in found[io]])} are not those of "
                                     f"{MANIFEST} field 'graphs.{graph}.{io}': the file was swapped or replaced; "
                                     "re-export the bundle")
            if graph == "pre_k":
                _check_token_select_node(model, manifest["fastv"], f)
    _verify_engine_records(manifest, mpath)
    return Bundle(root, manifest)


def _check_token_select_node(model: onnx.ModelProto, fastv: dict, f: Path) -> None:
    """pre_k's fastv::TokenSelect node must carry the manifest's K-independent settings."""
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
    error = next(iter(_validator().iter_errors(manifest)), None)
    if error is not None:
        raise _schema_error(error, mpath)
    _check_consistency(manifest, mpath)


def _check_consistency(m: dict, mpath: Path) -> None:  # noqa: C901 - a list of independent checks
    """What the schema cannot say: fields that must agree with each other and with the graph spec."""
    from fastv_export.engines import profiles

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
    layout = spec.vision_layout_of(m)
    missing = [key for key in VISION_LAYOUT_FIELDS.get(layout["kind"], ()) if key not in layout]
    if missing:
        fail(["image_tokens", "vision_layout"], f"kind {layout['kind']!r} needs the fields {', '.join(missing)}")
    pos = m["positions"]
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
    sizes = profiles.model_sizes(m)
    specs = profiles.graph_specs(m)
    files = m["files"]
    for name, g in specs.items():
        entry = m["graphs"][name]
        if entry["file"] != g.file:
            fail(["graphs", name, "file"], f"{_short(entry['file'])} is not {g.file!r}")
        if entry["file"] not in files:
            raise FastVError(f"{mpath}: field 'graphs.{name}.file' names {entry['file']!r}, which 'files' does "
                             "not list; re-export the bundle")
        for io in ("inputs", "outputs"):
            want = [{"name": t.name, "dtype": float_dtype if t.dtype == spec.FLOAT else t.dtype,
                     "shape": t.shape(sizes)} for t in getattr(g, io)]
            got = entry[io]
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
    if m["engines"] is not None:
        _check_engines(m, sizes, specs, fail)


def _check_engines(m: dict, sizes: dict, specs: dict, fail) -> None:
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
        n = profiles.lengths(m, limits)
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
        kv_bytes = profiles.kv_cache_bytes(m, limits, graph)
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
