"""Python/C++ drift guards: the golden vectors that the Python implementation writes for the C++ unit tests
(runtime/tests/data/golden.json, scripts/write_cpp_golden.py) are current, the ctest reproduces them, and the
C++ runtime's graph I/O names (runtime/include/fastv/graph_names.hpp, its only spelling of them) are
graphs/spec.py's, both ways."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from fastv_export.graphs import spec

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "runtime" / "include" / "fastv" / "graph_names.hpp"
GOLDEN = ROOT / "runtime" / "tests" / "data" / "golden.json"
REWRITE = "rewrite it with: python scripts/write_cpp_golden.py"


def _golden_writer():
    loaded = importlib.util.spec_from_file_location("write_cpp_golden", ROOT / "scripts" / "write_cpp_golden.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def test_committed_golden_vectors_are_what_the_python_writes():
    writer = _golden_writer()
    assert writer.GOLDEN == GOLDEN
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: {REWRITE}"
    text = writer.golden_text()
    if GOLDEN.read_text() != text:
        committed, current = json.loads(GOLDEN.read_text()), json.loads(text)
        stale = [k for k in sorted(set(committed) | set(current)) if committed.get(k) != current.get(k)]
        pytest.fail(f"{GOLDEN.relative_to(ROOT)} differs from what the Python computes now (sections: "
                    f"{', '.join(stale) or 'formatting'}): {REWRITE}")


def test_golden_vectors_cover_every_family_and_guard():
    g = json.loads(GOLDEN.read_text())
    cases = {c["case"]: c for c in g["positions"]}
    ranks = {c["manifest"]["positions"]["rank"] for c in cases.values()}
    assert ranks == {2, 3}
    timed = [c for c in cases.values() if "video_tokens_per_second" in c["manifest"]["positions"]]
    assert timed and all(c["video_seconds"] for c in timed)
    rank2 = cases["rope-llava-left-padded"]
    assert len(rank2["input_ids"]) == 2 and 0 in rank2["attention_mask"][0]         # batch 2, left padding
    assert g["candidates_refused"] and g["patch_grid_feeds"]
    assert "producer" in g["manifest_required"]
    assert {c["deepstack"] > 0 for c in g["graph_names"]["graph_io"]} == {True, False}


# ------------------------------------------------------------------------------------------- graph names
def _header_names() -> tuple[dict[str, str], dict[str, list[str]]]:
    """graph_names.hpp's string constants and arrays, keyed by the spec attribute they stand for
    (kCuWindowSeqlens -> CU_WINDOW_SEQLENS)."""
    text = HEADER.read_text()
    attr = lambda camel: re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()   # noqa: E731
    scalars = {attr(m[1]): m[2] for m in re.finditer(r'inline constexpr const char\* k(\w+) = "([^"]*)";', text)}
    arrays = {attr(m[1]): re.findall(r'"([^"]*)"', m[2])
              for m in re.finditer(r"inline constexpr const char\* k(\w+)\[\] = \{([^}]*)\};", text)}
    assert scalars and arrays, f"no constants parsed from {HEADER}"
    return scalars, arrays


def _spec_io_names() -> set[str]:
    """Every graph I/O name of graphs/spec.py over each vision layout, position rank and DeepStack depth, the
    indexed ones (KV caches, DeepStack levels) reduced to their prefix."""
    names = set()
    for layout in spec.VISION_LAYOUTS:
        for rank in (2, 3):
            for g in spec.bundle_graphs(2, 4, rank, (1, 3, 8, 8), 3, layout).values():
                names |= {re.sub(r"\.\d+(\.(key|value))?$", "", n) for n in g.input_names + g.output_names}
    return names


def test_graph_names_header_constants_are_the_spec():
    """Every constant of the header is the spec attribute of the same name (a rename on either side fails)."""
    scalars, arrays = _header_names()
    wrong = {a: v for a, v in scalars.items() if getattr(spec, a, None) != v}
    assert not wrong, f"graph_names.hpp constants that are not graphs/spec.py's (attribute: C++ value): {wrong}"
    wrong_lists = {a: v for a, v in arrays.items() if list(getattr(spec, a, ())) != v}
    assert not wrong_lists, f"graph_names.hpp arrays that are not graphs/spec.py's: {wrong_lists}"


def test_every_spec_graph_io_name_is_in_the_header():
    scalars, arrays = _header_names()
    missing = _spec_io_names() - set(scalars.values())
    assert not missing, f"graph I/O names of graphs/spec.py without a constant in {HEADER.name}: {sorted(missing)}"
    assert {"GRAPHS", "KV_KINDS", "VISION_LAYOUTS"} <= set(arrays)
    constants = {a for a, v in vars(spec).items() if a.isupper() and isinstance(v, str) and v in _spec_io_names()}
    assert constants <= set(scalars), f"spec constants the header lacks: {sorted(constants - set(scalars))}"


def test_cpp_sources_spell_no_graph_io_name_outside_the_header():
    """The runtime's sources take every graph I/O name from graph_names.hpp: none as a string literal."""
    scalars, _ = _header_names()
    names = set(scalars.values())
    files = sorted((ROOT / "runtime").glob("src/*.cpp")) + sorted((ROOT / "runtime").glob("tools/*.cpp")) + [
        p for p in sorted((ROOT / "runtime" / "include").rglob("*.hpp")) if p != HEADER]
    assert len(files) > 5
    hits = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for literal in re.findall(r'"((?:[^"\\]|\\.)*)"', line):
                if literal in names or any(literal.startswith(n + ".") for n in names):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: \"{literal}\"")
    assert not hits, "graph I/O names spelled outside runtime/include/fastv/graph_names.hpp:\n" + "\n".join(hits)


# ------------------------------------------------------------------------------------------------- ctest
@pytest.mark.slow
def test_ctest_reproduces_the_golden_vectors(runtime_build):
    """The runtime (built once per session by scripts/build_runtime.sh) passes its ctest, whose golden test
    reads the committed golden vectors."""
    build_dir = runtime_build.parent
    proc = subprocess.run(["ctest", "--output-on-failure"], cwd=build_dir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"fastv_runtime_golden \.+ +Passed", proc.stdout), proc.stdout
    golden = subprocess.run([str(build_dir / "fastv_runtime_tests"), "golden", str(GOLDEN)], capture_output=True,
                            text=True, timeout=60)
    assert golden.returncode == 0, golden.stdout + golden.stderr
    checks = int(re.search(r"golden vectors: (\d+) checks", golden.stdout)[1])
    assert checks >= 100 and " 0 failed" in golden.stdout, golden.stdout
