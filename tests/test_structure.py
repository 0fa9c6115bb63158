"""The shape of the package, checked: the runner interface imports no implementation, and no module
outside the bundle package reads the raw manifest (every reader goes through the typed views)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from fastv_export.bundle import REQUIRED

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_PACKAGE = ROOT / "fastv_export" / "bundle"


def _modules_after_import(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(json.loads(out.stdout))


def test_the_runner_interface_imports_no_implementation():
    loaded = _modules_after_import("fastv_export.runtime.runner")
    for heavy in ("fastv_export.runtime.ort", "fastv_export.engines.runner", "fastv_export.engines", "onnxruntime",
                  "onnx", "torch", "tensorrt", "fastv_export.bundle"):
        assert heavy not in loaded, f"importing the Runner interface loads {heavy}"
    # choosing a runner by name stays light too: commands import it for their --runner choices
    loaded = _modules_after_import("fastv_export.runtime.runners")
    assert not {"fastv_export.runtime.ort", "fastv_export.engines.runner", "onnxruntime", "torch"} & loaded


def _package_sources() -> list[Path]:
    files = [*(ROOT / "fastv_export").rglob("*.py"), *(ROOT / "graphs").glob("*.py"),
             *(ROOT / "calibrate").glob("*.py"), *(ROOT / "scripts").glob("*.py")]
    return sorted(f for f in files if BUNDLE_PACKAGE not in f.parents)


#: dicts that are not manifests but have keys of the same names: validation's report and its cases
#: (validation.json), a calibration sweep's per-item baseline record
NOT_MANIFESTS = {"fastv_export/validate.py": {"report", "c"}, "calibrate/report.py": {"b"}}


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Subscript, ast.Attribute, ast.Call)):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node.id if isinstance(node, ast.Name) else None


def raw_manifest_reads(source: str, not_manifests: set[str] = frozenset()) -> list[tuple[int, str]]:
    """Lines that index a manifest's top-level field (``x["fastv"]``, ``x.get("engines")``) or reach for the
    raw JSON behind a typed view (``.raw``); subscripts of the names in ``not_manifests`` are other dicts."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in REQUIRED:
            if _root_name(node.value) not in not_manifests:
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in REQUIRED):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Attribute) and node.attr in ("raw", "manifest") and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_scan_finds_raw_manifest_reads():
    """The scan below can fail: each way of reading the raw manifest is caught."""
    for code in ('m["fastv"]["k"]', 'bundle.manifest["precision"]', 'section = m.get("engines")', 'b.raw',
                 'x = manifest["image_tokens"]["per_image"]'):
        assert raw_manifest_reads(code), code
    assert not raw_manifest_reads('report["passed"]; b.fastv.k; d.get("name")')
    assert not raw_manifest_reads('report["fastv"]["k"]', {"report"})
    assert raw_manifest_reads('m["fastv"]["k"]', {"report"})


def test_no_module_outside_the_bundle_package_reads_the_raw_manifest():
    hits = {}
    for f in _package_sources():
        name = f.relative_to(ROOT).as_posix()
        hits[name] = raw_manifest_reads(f.read_text(), NOT_MANIFESTS.get(name, set()))
    hits = {f: h for f, h in hits.items() if h}
    assert not hits, f"raw manifest reads outside fastv_export/bundle/ (use the typed views): {hits}"
