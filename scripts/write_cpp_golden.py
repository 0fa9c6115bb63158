#!/usr/bin/env python
"""Golden vectors for the C++ runtime's unit tests (runtime/tests/data/golden.json), computed by the Python
code that is the source of truth, so that a rule changed on one side only fails a test:

- position ids, prefill and decode, of every position family and media mix the C++ runtime serves
  (fastv_export/runtime/positions.py over the manifest fields the export writes for the tiny presets);
- candidate positions (fastv_export/runtime/generate.py ``find_candidates``), a refused batch included;
- the grid-derived feeds of the patch_grid vision layout (fastv_export/runtime/vision_feeds.py);
- the manifest's schema version and required top-level fields (fastv_export/bundle/manifest.schema.json);
- graph I/O names: graphs/spec.py's name constants, its naming functions, and every graph's inputs and
  outputs for the tiny presets' shapes.

The ctest (runtime/tests/unit_tests.cpp) asserts the C++ code reproduces every vector; tests/test_cpp_drift.py
asserts this file is what the current Python writes. After changing one of those rules on purpose, rewrite it:

    python scripts/write_cpp_golden.py            # rewrite runtime/tests/data/golden.json
    python scripts/write_cpp_golden.py --check    # exit 1 when the committed file is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fastv_export.adapters import Media, ModelAdapter, get_adapter
from fastv_export.bundle import SCHEMA_VERSION, Manifest, manifest_schema
from fastv_export.bundle.write import image_tokens_section, positions_section
from fastv_export.errors import FastVError
from fastv_export.files import atomic_write_text
from fastv_export.graphs import spec
from fastv_export.presets import load_model
from fastv_export.prompts import make_prompt
from fastv_export.runtime.generate import find_candidates
from fastv_export.runtime.positions import decode_positions, prefill_positions
from fastv_export.runtime.vision_feeds import media_grid, patch_grid_feeds

GOLDEN = Path(__file__).resolve().parents[1] / "runtime" / "tests" / "data" / "golden.json"
FORMAT, VERSION = "fastv-golden", 1

#: (case, preset, instruction lengths of the batch rows, the media of every row); media without a size are of
#: the exported size; media with one (patch_grid bundles) come with their patch grids ('media_grids')
POSITION_CASES = [
    ("rope-llava-left-padded", "tiny-llava", [4, 9], [Media("image")]),
    ("mrope-qwen2-vl-images", "tiny-qwen2-vl", [4, 9], [Media("image"), Media("image")]),
    ("mrope-qwen2-vl-video", "tiny-qwen2-vl", [4, 9], [Media("video", frames=8)]),
    ("mrope-qwen2-vl-video-image", "tiny-qwen2-vl", [3, 7], [Media("video", frames=4), Media("image")]),
    ("mrope-qwen2.5-vl-timed-videos", "tiny-qwen2.5-vl", [4, 9],
     [Media("video", frames=8, fps=1.0), Media("image"), Media("video", frames=6, fps=3.0)]),
    ("mrope-qwen3-vl-image-video-blocks", "tiny-qwen3-vl", [4, 9], [Media("image"), Media("video", frames=6)]),
    ("mrope-qwen2.5-vl-media-grids", "tiny-qwen2.5-vl", [4, 9],
     [Media("image", (56, 112)), Media("video", (84, 56), frames=4, fps=1.0), Media("image", (140, 28))]),
]
DECODE_STEPS = (0, 1, 7)
#: (h, w) patch grids of the patch_grid cases (tiny-qwen2.5-vl's layout): the exported one, windows cut at edges
PATCH_GRIDS = ((12, 12), (6, 10), (4, 16), (2, 2))
#: (preset, K) of the graph I/O cases: each position rank, vision layout, DeepStack with K inside and after it
GRAPH_CASES = (("tiny-llava", 2), ("tiny-qwen2.5-vl", 1), ("tiny-qwen3-vl", 1), ("tiny-qwen3-vl", 3))


def position_rules(adapter: ModelAdapter) -> dict:
    """The manifest's fields that position ids and candidates follow ('image_tokens' and 'positions'), as the
    export writes them (fastv_export/bundle/write.py), the vision input aside (no graph is exported here)."""
    image_tokens = image_tokens_section(adapter, vision_input={})
    return {"image_tokens": {key: image_tokens[key] for key in ("token_ids", "per_image", "vision_layout", "grid_thw")
                             if key in image_tokens},
            "positions": {key: value for key, value in positions_section(adapter).items()
                          if key in ("rank", "spatial_merge_size", "video_token_id", "video_tokens_per_second")}}


def _positions_case(name: str, adapter: ModelAdapter, lengths: list[int], media: list[Media]) -> dict:
    rules = position_rules(adapter)
    prompt = make_prompt(adapter, lengths, media=media, seed=7)
    ids, mask = prompt.input_ids.numpy(), prompt.attention_mask.numpy()
    seconds = prompt.vision.get("second_per_grid_ts")
    seconds = [] if seconds is None else [float(np.float32(s)) for s in seconds.tolist()]
    manifest = Manifest(rules)
    sized = any(m.size is not None for m in media)
    row_media = media * len(lengths) if sized else None
    pos = prefill_positions(manifest, ids, mask, seconds or None, row_media)
    grids = [[list(media_grid(manifest.vision_layout, m, manifest.grid_thw)) for m in media]] * len(lengths) \
        if sized else []
    return {"case": name, "manifest": rules, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
            "video_seconds": seconds, "media_grids": grids, "prefill": pos.tolist(),
            "decode": [{"step": s, "positions": decode_positions(pos, s).tolist()} for s in DECODE_STEPS],
            "candidates": find_candidates(ids, manifest.image_token_ids).tolist()}


def _refused_candidates(adapter: ModelAdapter) -> dict:
    """A batch whose rows hold different numbers of image tokens: refused, with the message's first part."""
    token = adapter.image_token_ids()[0]
    ids = np.array([[token, 11, 12], [token, token, 13]], dtype=np.int64)
    try:
        find_candidates(ids, adapter.image_token_ids())
    except FastVError as e:
        return {"case": "rows-with-different-image-token-counts", "token_ids": [int(t) for t in
                                                                                 adapter.image_token_ids()],
                "input_ids": ids.tolist(), "error": str(e).split(" (")[0]}
    raise AssertionError("find_candidates accepted rows with different image-token counts")


def _patch_grid_cases(adapter: ModelAdapter) -> list[dict]:
    layout = {"kind": adapter.vision_layout, **adapter.vision_layout_params()}
    cases = []
    for h, w in PATCH_GRIDS:
        feeds = patch_grid_feeds(np.zeros((h * w, 1), np.float32), h, w, layout)
        cases.append({"h": h, "w": w, "manifest": {"image_tokens": {"vision_layout": layout}},
                      "feeds": {k: v.tolist() for k, v in feeds.items() if k != spec.PIXEL_VALUES}})
    return cases


def _base_name(name: str) -> str:
    """A name with an index (a KV cache's ``{prefix}.{layer}.{kind}``, a DeepStack level's ``{prefix}.{level}``)
    -> its prefix."""
    return re.sub(r"\.\d+(\.\w+)?$", "", name)


def _graph_names(adapters: dict[str, ModelAdapter]) -> dict:
    cases = []
    for preset, k in GRAPH_CASES:
        a = adapters[preset]
        graphs = spec.bundle_graphs(k, a.decoder_shape().num_layers, a.position_rank, (1, 3, 8, 8),
                                    a.deepstack_layers(), a.vision_layout)
        cases.append({"case": f"{preset}-k{k}", "k": k, "num_layers": a.decoder_shape().num_layers,
                      "position_rank": a.position_rank, "deepstack": a.deepstack_layers(),
                      "vision_layout": a.vision_layout,
                      "graphs": {g: {"inputs": s.input_names, "outputs": s.output_names} for g, s in graphs.items()}})
    # every graph I/O name of every layout, rank and DeepStack depth, reduced to its constant or prefix
    used = {_base_name(n) for layout in spec.VISION_LAYOUTS for rank in (2, 3)
            for s in spec.bundle_graphs(1, 3, rank, (1, 3, 8, 8), 2, layout).values()
            for n in s.input_names + s.output_names}
    constants = {attr: value for attr, value in vars(spec).items()
                 if attr.isupper() and isinstance(value, str) and value in used}
    missing = used - set(constants.values())
    assert not missing, f"graph I/O names without a constant in graphs/spec.py: {sorted(missing)}"
    lists = {"GRAPHS": list(spec.GRAPHS), "KV_KINDS": list(spec.KV_KINDS), "VISION_LAYOUTS": list(spec.VISION_LAYOUTS)}
    levels = (spec.DEEPSTACK_FEATURES, spec.DEEPSTACK_EMBEDS, spec.KEPT_DEEPSTACK_EMBEDS)
    return {
        "constants": dict(sorted(constants.items())), "lists": lists,
        "past_name": [[i, kind, spec.past_name(i, kind)] for i in (0, 3, 12) for kind in spec.KV_KINDS],
        "present_name": [[i, kind, spec.present_name(i, kind)] for i in (0, 3, 12) for kind in spec.KV_KINDS],
        "level_name": [[prefix, level, spec.level_name(prefix, level)] for prefix in levels for level in (0, 2)],
        "present_to_past": [[spec.present_name(i, kind), spec.present_to_past(spec.present_name(i, kind))]
                            for i in (0, 11) for kind in spec.KV_KINDS],
        "graph_io": cases,
    }


def golden() -> dict:
    """Every golden vector, as the current Python computes it."""
    presets = sorted({p for _, p, _, _ in POSITION_CASES} | {p for p, _ in GRAPH_CASES})
    adapters = {p: get_adapter(load_model(p)) for p in presets}
    return {
        "format": FORMAT, "version": VERSION,
        "written_by": "scripts/write_cpp_golden.py (do not edit; rewrite it with that script)",
        "schema_version": SCHEMA_VERSION,
        "manifest_required": list(manifest_schema()["required"]),
        "graph_names": _graph_names(adapters),
        "positions": [_positions_case(name, adapters[p], lengths, media) for name, p, lengths, media in POSITION_CASES],
        "candidates_refused": [_refused_candidates(adapters["tiny-llava"])],
        "patch_grid_feeds": _patch_grid_cases(adapters["tiny-qwen2.5-vl"]),
    }


def render(value: Any, indent: int = 0) -> str:
    """JSON text: objects and lists of lists one item per line, innermost lists of numbers on one line."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {render(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + render(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value)


def golden_text() -> str:
    return render(golden()) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare with the committed file")
    ap.add_argument("--out", type=Path, default=GOLDEN, help=f"default: {GOLDEN}")
    args = ap.parse_args(argv)
    text = golden_text()
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        state = "up to date" if same else "OUT OF DATE: rewrite it with python scripts/write_cpp_golden.py"
        print(f"{args.out}: {state}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
