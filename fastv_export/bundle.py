"""The bundle: graphs + manifest.json, everything a C++ runtime needs (docs/design.md §4).

``write_manifest`` describes a freshly exported directory; ``load_bundle`` verifies one (schema,
fields, files, sizes, sha256, ONNX parse) and fails with a message naming the file and the field.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from fastv_export import __version__
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.files import atomic_write_json, sha256
from fastv_export.graphs import op, spec

if TYPE_CHECKING:
    from fastv_export.adapters import ModelAdapter

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("schema_version", "source_model", "fastv", "precision", "image_tokens", "graphs", "pipeline",
            "kv_cache", "positions", "plugin", "engines", "files")


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
                         "pad_token_id": adapter.text_config.pad_token_id},
        "fastv": cfg.to_manifest(),
        "precision": options.dtype,
        "image_tokens": {
            "token_ids": list(adapter.image_token_ids()),
            "per_image": adapter.image_tokens_per_image(),
            "prompt_tokens_per_image": adapter.image_prompt_tokens(),
            "candidates": "positions of every token whose id is in token_ids, all images in one pool; "
                          "every batch row must hold the same number",
            "vision_input": graphs["vision"]["inputs"][0],
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
                        "(t, h/merge, w/merge) gets (offset + t_i, offset + h_i, offset + w_i) with offset = "
                        "previous max + 1; padding gets 0" if mrope else
                        "per row: cumsum(attention_mask) - 1, padding gets 1"),
            "kept_tokens": f"keep their ORIGINAL position ids ({spec.SELECTED_POSITION_IDS})",
            "decode": "step t (0-based) of a row uses max(prompt position ids of that row) + 1 + t "
                      "(continues from the original, unpruned prompt)",
            **({"mrope_section": adapter.text_config.rope_parameters.get("mrope_section"),
                "spatial_merge_size": adapter.config.vision_config.spatial_merge_size} if mrope else {}),
        },
        "plugin": dict(op.PLUGIN_IDENTITY, used_by="pre_k.onnx node fastv_token_select (expands to its ONNX "
                                                   "function body when the library is not loaded)"),
        "engines": None,
        "files": {},
    }
    for f in sorted(out.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            manifest["files"][f.name] = {"sha256": sha256(f), "bytes": f.stat().st_size}
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
    """Verify a bundle directory and return it; FastVError names the file and field on any mismatch."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise FastVError(f"{root} is not a bundle directory (run `fastv-export export --out {root}` first)")
    if not mpath.is_file():
        raise FastVError(f"{mpath} is missing: not a fastv-export bundle")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise FastVError(f"{mpath} is not valid JSON ({exc}); re-export the bundle") from None
    if not isinstance(manifest, dict):
        raise FastVError(f"{mpath}: top level must be an object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FastVError(f"{mpath}: field 'schema_version' is {version!r}, this fastv-export reads "
                         f"{SCHEMA_VERSION}; re-export the bundle with this version")
    for key in REQUIRED:
        if key not in manifest:
            raise FastVError(f"{mpath}: required field {key!r} is missing; re-export the bundle")
    files = manifest["files"]
    for name, graph in manifest["graphs"].items():
        if graph.get("file") not in files:
            raise FastVError(f"{mpath}: field 'graphs.{name}.file' names {graph.get('file')!r}, "
                             f"which 'files' does not list")
    for name, meta in files.items():
        f = root / name
        if not f.is_file():
            raise FastVError(f"{f} is missing (listed in {MANIFEST} field 'files'); re-export the bundle")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise FastVError(f"{f} has {size} bytes, {MANIFEST} field 'files.{name}.bytes' says "
                             f"{meta.get('bytes')}: the file is truncated or was replaced")
        if sha256(f) != meta.get("sha256"):
            raise FastVError(f"{f}: sha256 does not match {MANIFEST} field 'files.{name}.sha256': "
                             "the file was modified after export")
        if check_onnx and name.endswith(".onnx"):
            try:
                onnx.load(str(f), load_external_data=False)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
                raise FastVError(f"{f} is not a readable ONNX file ({type(exc).__name__}); re-export") from None
    _verify_engine_records(manifest, mpath)
    return Bundle(root, manifest)


def _verify_engine_records(manifest: dict, mpath: Path) -> None:
    """The ``engines`` section (when engines were built) must name files whose checksums are those
    of ``files`` (which load_bundle has just verified against the files themselves)."""
    section = manifest.get("engines")
    if section is None:
        return
    if not isinstance(section, dict) or not isinstance(section.get("engines"), dict):
        raise FastVError(f"{mpath}: field 'engines' must be null or an object with 'engines'; re-run fastv-export build")
    files = manifest["files"]
    for graph, e in section["engines"].items():
        if files.get(e.get("file"), {}).get("sha256") != e.get("sha256"):
            raise FastVError(f"{mpath}: field 'engines.engines.{graph}.sha256' does not match the file "
                             f"{e.get('file')!r}: the engine is not the one built; rebuild with fastv-export build")
    plugin = section.get("plugin")
    if plugin is not None and files.get(op.PLUGIN_LIBRARY, {}).get("sha256") != plugin.get("sha256"):
        raise FastVError(f"{mpath}: field 'engines.plugin.sha256' does not match {op.PLUGIN_LIBRARY}: the plugin "
                         "library is not the one the engines were built with; rebuild with fastv-export build")
