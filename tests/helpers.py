"""Plain helpers shared by the bundle, export, validate and runtime tests (no fixtures: those live in
conftest.py): copying and editing a bundle, running the CLI for its one-line error, making something
once per test run for every pytest-xdist worker."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from fastv_export.cli import main as cli
from fastv_export.files import sha256

#: the built-in tiny presets every per-family test runs on (the `preset` fixture and parametrisations)
PRESET_NAMES = ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-llava-onevision", "tiny-internvl"]

#: the cover of preset x K x R x ranking that CI exports (every value of each axis appears, with both
#: rankings at each K; the full matrices run with scripts/validate_matrix.py, `--runtime` for fastv-run):
#: the validation tests and the C++ parity tests share these bundles (conftest.py's ``exported_bundle``
#: exports each once per run)
PAIRWISE = [  # (model, K, R, ranking)
    ("tiny-llava", 2, "1/2", "last"),
    ("tiny-llava", 1, "9/10", "mean"),
    ("tiny-llava", 3, "3/4", "last"),
    ("tiny-qwen2-vl", 2, "3/4", "mean"),
    ("tiny-qwen2-vl", 1, "1/2", "last"),
    ("tiny-qwen2-vl", 3, "9/10", "mean"),
    ("tiny-qwen2-vl", 2, "0", "last"),
]
#: the families added later: a pairwise cover of K in {1, 2}, R in {1/2, 9/10} and both rankings, batch 1 and 2;
#: (2, 1/2, last) is the bundle the other per-family tests use, so it is exported once
NEW_FAMILIES = ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-llava-onevision", "tiny-internvl"]
PAIRWISE_NEW = [(m, k, r, rk) for m in NEW_FAMILIES
                for k, r, rk in ((1, "1/2", "mean"), (1, "9/10", "last"), (2, "1/2", "last"), (2, "9/10", "mean"))]
#: the families the C++ runtime serves
CPP_FAMILIES = ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl"]


def copy_bundle(src: Path, parent: Path, name: str = "b") -> Path:
    """A writable copy of the bundle ``src`` as ``parent / name`` (the session's bundles are read-only)."""
    dst = parent / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("validation"))
    return dst


def rewrite_checksum(path: Path, file: str) -> None:
    """Make manifest.json agree with the (edited) ``file`` again: a consistent bundle."""
    man = json.loads((path / "manifest.json").read_text())
    man["files"][file] = {"sha256": sha256(path / file), "bytes": (path / file).stat().st_size}
    (path / "manifest.json").write_text(json.dumps(man))


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """``fastv-export argv`` -> (exit code, its stderr stripped)."""
    capsys.readouterr()   # drop what earlier steps (e.g. a bundle export's progress bar) printed
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def c_pointer(a, ctype):
    """A ctypes pointer to the data of the C-contiguous numpy array ``a``."""
    import ctypes

    assert a.flags["C_CONTIGUOUS"]
    return a.ctypes.data_as(ctypes.POINTER(ctype))


def shared_dir(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run shares (the session's temporary base without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_run(path: Path, make: Callable[[Path], None]) -> Path:
    """``make(tmp)`` fills a temporary folder that then becomes ``path``, once per test run, shared by every
    pytest-xdist worker: made under a file lock beside ``path``; a ``path`` that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = path.parent / f".{path.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            make(tmp)
            tmp.rename(path)
    return path


def fastv_run_error(proc) -> str:
    """The one error line of a refused ``fastv-run`` (non-zero exit, nothing on stdout), its prefix included."""
    assert proc.returncode != 0, proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastv-run: error: ")
    return lines[0]


def json_nodes(value, path: tuple = ()):
    """Every (path, value) of a JSON document, containers and leaves, depth first (paths are tuples of keys and
    list indices)."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_nodes(v, path + (i,))


# ------------------------------------------------------------------------------------- quantized weight graphs
def matmul_model(weights: dict):
    """x [2, K] -> MatMul(x, w_i) for each named [K, N] weight, opset 18 (as the exporter writes)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, outs, inits = [], [], []
    k = next(iter(weights.values())).shape[0]
    for i, (name, w) in enumerate(weights.items()):
        inits.append(numpy_helper.from_array(w, f"val_{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"val_{i}"], [f"y{i}"], name=f"node_linear_{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, w.shape[1]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])], outs,
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def weight_digests(weights: dict) -> dict[str, str]:
    """sha256 of each weight's bytes -> its name (how the quantizer finds a parameter's initializer)."""
    import hashlib

    import numpy as np

    return {hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest(): name for name, w in weights.items()}


def ort_outputs(model, x) -> list:
    """``model``'s outputs for input ``x`` in ONNX Runtime, DequantizeLinear -> MatMul run as written (accuracy level
    0 for the fused MatMulNBits, as the project's sessions set it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), so).run(None, {"x": x})
