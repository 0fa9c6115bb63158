"""Writing ``manifest.json``: :func:`write_manifest` is the one writer. The export describes a fresh
bundle with :func:`export_manifest` (from the graph specs the graphs were written from, nothing read
back), the engine build adds its ``engines`` section; both hand the whole manifest to
:func:`write_manifest`, which lists the files with their checksums, checks the manifest as the loader
will (JSON Schema and consistency) and only then writes it, atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from fastv_export import __version__
from fastv_export.bundle.verify import SCHEMA_VERSION, check_manifest
from fastv_export.bundle.view import MANIFEST
from fastv_export.errors import FastVError
from fastv_export.files import atomic_write_json, sha256
from fastv_export.graphs import op, spec

if TYPE_CHECKING:
    from fastv_export.adapters import ModelAdapter
    from fastv_export.config import FastVConfig
    from fastv_export.export.onnx_export import WrittenGraph


def encode_runs(tokens: Sequence[int]) -> list[list[int]]:
    """[500, 500, 500, 7] -> [[500, 3], [7, 1]]: the manifest's compact form of a token sequence."""
    runs: list[list[int]] = []
    for t in tokens:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([int(t), 1])
    return runs


#: config keys that say where a model was loaded from and at which dtype, not what it is (a moved checkpoint is the
#: same model; an fp16 export is validated against the fp32 reference of the same checkpoint)
LOCATION_KEYS = ("_name_or_path", "_commit_hash", "dtype", "torch_dtype")


def config_hash(adapter: ModelAdapter) -> str:
    """sha256 of the model's full config JSON, without where it was loaded from (validation refuses a bundle whose
    source model changed, not one whose checkpoint directory moved)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in LOCATION_KEYS}
        return [strip(v) for v in value] if isinstance(value, list) else value

    config = json.loads(adapter.config.to_json_string(use_diff=False))
    return hashlib.sha256(json.dumps(strip(config), sort_keys=True).encode()).hexdigest()


def source_fields(model: str | Path, bundle_dir: Path) -> dict:
    """``source_model.name`` (a preset's name or the checkpoint directory's name) and, for a checkpoint,
    ``checkpoint``: its path relative to the bundle directory (no absolute path of this machine)."""
    from fastv_export.presets import PRESETS

    if str(model) in PRESETS:
        return {"name": str(model)}
    path = Path(model).resolve()
    return {"name": path.name, "checkpoint": Path(os.path.relpath(path, bundle_dir.resolve())).as_posix()}


def export_manifest(adapter: ModelAdapter, cfg: FastVConfig, precision: str, model: str | Path, bundle_dir: Path,
                    specs: Mapping[str, spec.GraphSpec], written: Mapping[str, WrittenGraph], serving: dict) -> dict:
    """The manifest of a fresh export into ``bundle_dir`` (its final path): each graph's I/O from ``specs``
    (what the graphs were written from), checked against ``written`` (what the exporter held in memory
    before saving: ``io`` and ``opsets``); ``serving`` is the section of the serving files the export wrote
    (fastv_export/export/serving.py); ``files`` is filled by :func:`write_manifest`."""
    info = adapter.decoder_shape()
    k = cfg.k
    float_dtype = spec.PRECISIONS[precision]
    sizes = {"hidden_size": info.hidden_size, "vocab_size": info.vocab_size, "num_kv_heads": info.num_kv_heads,
             "head_dim": info.head_dim, "tokens_per_image": adapter.image_tokens_per_image()}
    graphs = {}
    for name, g in specs.items():
        table = g.io_table(sizes, float_dtype)
        if table != written[name].io:
            raise FastVError(f"the exported {name} graph's inputs/outputs differ from the graph spec "
                             f"(graphs/spec.py) for {adapter.name}: an export bug, please report it")
        graphs[name] = {"file": g.file, **table, "opsets": dict(written[name].opsets)}
    deepstack = adapter.deepstack_layers()
    return {
        "schema_version": SCHEMA_VERSION,
        "producer": {"name": "fastv-export", "version": __version__},
        "source_model": {**source_fields(model, bundle_dir), "architecture": type(adapter.model).__name__,
                         "adapter": adapter.name, "config_sha256": config_hash(adapter),
                         "num_layers": info.num_layers, "hidden_size": info.hidden_size,
                         "vocab_size": info.vocab_size,
                         "eos_token_id": adapter.text_config.eos_token_id,
                         "pad_token_id": adapter.text_config.pad_token_id,
                         **({"deepstack_layers": deepstack} if deepstack else {})},
        "fastv": cfg.to_manifest(),
        "precision": precision,
        "image_tokens": image_tokens_section(adapter, graphs["vision"]["inputs"][0]),
        "graphs": graphs,
        "pipeline": spec.pipeline_description(),
        "kv_cache": {
            "layout": "[batch, num_kv_heads, seq, head_dim]", "num_kv_heads": info.num_kv_heads,
            "head_dim": info.head_dim, "dtype": float_dtype,
            "layers": [{"layer": i, "graph": "pre_k" if i < k else "post_k",
                        "prefill_length": "n (all prompt tokens)" if i < k else "n' (kept tokens)"}
                       for i in range(info.num_layers)],
        },
        "positions": positions_section(adapter),
        "plugin": dict(op.PLUGIN_IDENTITY, used_by="pre_k.onnx node fastv_token_select (expands to its ONNX "
                                                   "function body when the library is not loaded)"),
        "engines": None,
        "serving": serving,
        "files": {},
    }


def image_tokens_section(adapter: ModelAdapter, vision_input: dict) -> dict:
    """The ``image_tokens`` section: the image token ids, an image's prompt tokens, the vision graph's input
    (``vision_input``: its row of the graph table) and layout."""
    return {
        "token_ids": list(adapter.image_token_ids()),
        "per_image": adapter.image_tokens_per_image(),
        "prompt_tokens_per_image": encode_runs(adapter.image_prompt_tokens()),
        "candidates": "positions of every token whose id is in token_ids, all images in one pool; "
                      "every batch row must hold the same number",
        "vision_input": vision_input,
        "vision_layout": {"kind": adapter.vision_layout, **adapter.vision_layout_params()},
        **({"grid_thw": list(adapter.image_grid)} if getattr(adapter, "image_grid", None) else {}),
    }


def positions_section(adapter: ModelAdapter) -> dict:
    """The ``positions`` section: the rules a runtime computes position ids by (docs/design.md §2)."""
    mrope = adapter.position_rank == 3
    out = {
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
    }
    if mrope:
        out.update(mrope_section=adapter.text_config.rope_parameters.get("mrope_section"),
                   spatial_merge_size=adapter.config.vision_config.spatial_merge_size,
                   video_token_id=int(adapter.config.video_token_id))
        if getattr(adapter, "timed_video_positions", False):
            out["video_tokens_per_second"] = adapter.config.vision_config.tokens_per_second
    return out


def write_manifest(directory: str | Path, manifest: dict, known: Mapping[str, dict] | None = None) -> dict:
    """Write ``manifest`` as ``directory/manifest.json``: ``files`` lists every other file of the directory
    with its sha256 and size (an entry of ``known``, file name -> {"sha256", "bytes"}, is taken as is for a
    file of that size: files the caller copied from a verified bundle), then the manifest is checked as
    :func:`~fastv_export.bundle.load_bundle` will check it (FastVError, nothing written, if it fails) and
    written atomically. Returns the manifest written."""
    directory = Path(directory)
    known = known or {}
    files = {}
    for f in sorted(directory.iterdir()):
        if not f.is_file() or f.name == MANIFEST:
            continue
        size = f.stat().st_size
        entry = known.get(f.name)
        files[f.name] = dict(entry) if entry is not None and entry["bytes"] == size else {"sha256": sha256(f),
                                                                                         "bytes": size}
    manifest = dict(manifest, files=files)
    check_manifest(manifest, directory / MANIFEST)
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest
