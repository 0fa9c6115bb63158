"""graphs/spec.py: its docstring table and its GraphSpecs against exported bundles, and no graph I/O
name spelled anywhere else in the package or the scripts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastv_export.graphs import spec
from tests.helpers import PRESET_NAMES

ROOT = Path(__file__).resolve().parent.parent


def _table_rows() -> list[dict]:
    """The rows of spec's docstring table: graph, io, name, dtype, shape text."""
    lines = spec.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+( +=+)+", line)]
    assert len(rules) == 3, "the spec's docstring table must be one RST simple table"
    cols = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[rules[0]])]
    rows = []
    for line in lines[rules[1] + 1:rules[2]]:
        cells = [line[a:b if i < len(cols) - 1 else None].strip() for i, (a, b) in enumerate(cols)]
        rows.append(dict(zip(("graph", "io", "name", "dtype", "shape"), cells)))
    return rows


def _expand(name: str, k: int, num_layers: int, deepstack: int = 0) -> list[str]:
    """``past_key_values.{i}.key|value, i<K`` -> the concrete names; DeepStack levels
    ``deepstack_features.{l}, l<L`` / ``kept_deepstack_embeds.{l}, K<=l<L`` likewise (none when L = 0)."""
    m = re.fullmatch(r"(\w+)\.\{l\}, (K<=)?l<L", name)
    if m:
        return [f"{m.group(1)}.{i}" for i in range(k if m.group(2) else 0, deepstack)]
    m = re.fullmatch(r"(\w+)\.\{i\}\.key\|value, i(<|>=)K", name)
    if not m:
        return [name]
    layers = range(k) if m.group(2) == "<" else range(k, num_layers)
    return [f"{m.group(1)}.{i}.{t}" for i in layers for t in ("key", "value")]


def _shape(text: str, rank3: bool) -> list[str] | None:
    """The table's shape for this position rank, as strings (None: model-specific)."""
    shapes = re.findall(r"\[[^\]]*\]", text.split("(")[0] if text.startswith("[") else "")
    if not shapes:
        return None
    pick = shapes[1] if rank3 and "M-RoPE" in text else shapes[0]
    return [d.strip() for d in pick.strip("[]").split(",")]


def _layout(manifest: dict) -> str:
    return (manifest["image_tokens"].get("vision_layout") or {"kind": "fixed"})["kind"]


def _files_io(path: Path, manifest: dict) -> dict[str, dict[str, list]]:
    """Each graph's inputs and outputs as its ONNX file holds them (the manifest is written from the spec, so
    the files are what an independent check reads)."""
    import onnx

    from fastv_export.bundle.verify import onnx_io

    out = {}
    for graph, desc in manifest["graphs"].items():
        model = onnx.load(str(path / desc["file"]), load_external_data=False)
        out[graph] = {"inputs": onnx_io(model.graph.input), "outputs": onnx_io(model.graph.output)}
    return out


def _sizes(manifest: dict) -> dict[str, int]:
    return {"hidden_size": manifest["source_model"]["hidden_size"],
            "vocab_size": manifest["source_model"]["vocab_size"],
            "num_kv_heads": manifest["kv_cache"]["num_kv_heads"], "head_dim": manifest["kv_cache"]["head_dim"],
            "tokens_per_image": manifest["image_tokens"]["per_image"]}


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_docstring_table_matches_an_exported_bundle(preset, exported_bundle):
    path = exported_bundle(preset, k=2, ratio="1/2")
    manifest = __import__("json").loads((path / "manifest.json").read_text())
    k, layers = manifest["fastv"]["k"], manifest["source_model"]["num_layers"]
    deepstack = manifest["source_model"].get("deepstack_layers", 0)
    rank3 = manifest["positions"]["rank"] == 3
    layout = _layout(manifest)
    sizes = {n: str(v) for n, v in _sizes(manifest).items()}
    want: dict[tuple[str, str], list] = {}
    for row in _table_rows():
        # vision rows tagged "(layout)" hold for that vision layout ("dynamic layouts": every one but fixed);
        # untagged vision rows for the fixed layout
        tag = re.fullmatch(r"(\S+(?:, \S+)?) \(([\w ]+)\)", row["name"])
        if row["graph"] == "vision":
            if tag is None:
                applies = layout == "fixed"
            else:
                applies = tag.group(2) == layout or (tag.group(2) == "dynamic layouts" and layout != "fixed")
            if not applies:
                continue
            if tag is not None:
                row = {**row, "name": tag.group(1)}
        for name in _expand(row["name"], k, layers, deepstack):
            want.setdefault((row["graph"], row["io"]), []).append((name, row["dtype"], _shape(row["shape"], rank3)))
    for graph, desc in _files_io(path, manifest).items():
        for io, key in (("in", "inputs"), ("out", "outputs")):
            got = desc[key]
            rows = want[(graph, io)]
            assert [g["name"] for g in got] == [w[0] for w in rows], f"{graph} {key}: names or order differ"
            for g, (name, dtype, shape) in zip(got, rows):
                assert g["dtype"] == ("float32" if dtype == "float" else dtype), f"{graph} {name}: dtype"
                if shape is not None:
                    assert [str(d) for d in g["shape"]] == [sizes.get(d, d) for d in shape], f"{graph} {name}: shape"


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_graph_specs_match_an_exported_bundle(preset, exported_bundle):
    path = exported_bundle(preset, k=2, ratio="1/2")
    manifest = __import__("json").loads((path / "manifest.json").read_text())
    pixel_dims = manifest["image_tokens"]["vision_input"]["shape"]
    specs = spec.bundle_graphs(manifest["fastv"]["k"], manifest["source_model"]["num_layers"],
                               manifest["positions"]["rank"], pixel_dims,
                               manifest["source_model"].get("deepstack_layers", 0),
                               _layout(manifest))
    sizes = _sizes(manifest)
    assert list(specs) == list(manifest["graphs"]) == list(spec.GRAPHS)
    files = _files_io(path, manifest)
    for name, g in specs.items():
        assert manifest["graphs"][name]["file"] == g.file
        desc = files[name]
        for tensors, got in ((g.inputs, desc["inputs"]), (g.outputs, desc["outputs"])):
            assert [t.name for t in tensors] == [x["name"] for x in got]
            for t, x in zip(tensors, got):
                assert t.shape(sizes) == x["shape"], f"{name} {t.name}"
                assert x["dtype"] == ("float32" if t.dtype == spec.FLOAT else t.dtype)


def test_pre_k_export_and_surgery_share_the_decoder_inputs():
    raw, final = spec.pre_k_export_graph(3, 2), spec.pre_k_graph(3, 2)
    assert final.input_names[:-1] == raw.input_names and final.input_names[-1] == spec.CANDIDATE_POSITIONS
    assert [t for t in raw.output_names if spec.is_present(t)] == spec.present_names(range(3))
    assert spec.present_to_past(spec.present_name(4, "value")) == spec.past_name(4, "value")
    # DeepStack (L = 3 levels, K = 2): every level enters pre_k, level 2 leaves it gathered for post_k
    raw, final = spec.pre_k_export_graph(2, 3, deepstack=3), spec.pre_k_graph(2, 3, deepstack=3)
    assert final.input_names[:-1] == raw.input_names
    assert raw.input_names[-3:] == spec.level_names(spec.DEEPSTACK_EMBEDS, range(3))
    assert spec.level_names(spec.KEPT_DEEPSTACK_EMBEDS, range(2, 3)) == \
        [n for n in final.output_names if n.startswith(spec.KEPT_DEEPSTACK_EMBEDS)]
    post = spec.post_k_graph(2, 4, 3, deepstack=3)
    assert post.input_names[-1] == spec.level_name(spec.KEPT_DEEPSTACK_EMBEDS, 2)
    assert spec.post_k_graph(3, 4, 3, deepstack=3).input_names == spec.post_k_graph(3, 4, 3).input_names


# Graph I/O names that only a graph uses. HF's own forward arguments (input_ids, attention_mask,
# position_ids, pixel_values, inputs_embeds, hidden_states, logits) share Optimum's names by design
# and appear where the code calls Hugging Face modules; as graph I/O they too go through the spec.
GRAPH_ONLY_NAMES = ("candidate_positions", "past_key_values.", "present.", "selected_position_ids", "kept_indices",
                    "selected_hidden_states", "image_features", "layer_hidden", "layer_query", "layer_key",
                    "deepstack_features", "deepstack_embeds", "kept_deepstack_embeds", "vision_position_ids",
                    "pack_index")


def test_no_graph_io_name_is_spelled_outside_the_spec():
    files = [p for d in ("fastv_export", "graphs", "scripts") for p in (ROOT / d).rglob("*.py")]
    assert files
    hits = []
    for path in files:
        if path.name == "spec.py" and path.parent.name == "graphs":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for name in GRAPH_ONLY_NAMES:
                if re.search(r"(?<![\w.])" + re.escape(name) + (r"" if name.endswith(".") else r"\b"), line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {name}")
    assert not hits, "graph I/O names outside graphs/spec.py:\n" + "\n".join(hits)
