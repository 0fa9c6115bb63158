"""Plain helpers shared by the bundle, export, validate and runtime tests (no fixtures: those live in
conftest.py): copying and editing a bundle, running the CLI for its one-line error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastv_export.cli import main as cli
from fastv_export.files import sha256

#: the built-in tiny presets every per-family test runs on (the `preset` fixture and parametrisations)
PRESET_NAMES = ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-llava-onevision", "tiny-internvl"]


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
