"""What the fastv-run request tests share (tests/test_cpp_request*.py): running fastv-run, its error line, the
Python front end's error and the --dry-run comparison with the Python front end (their session fixtures, the trained
demo bundle, user-style bundles and test pictures, are in conftest.py)."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import fastv_run_error

ROOT = Path(__file__).resolve().parents[1]
#: held-out questions of the trained demo answered by both runtimes (the end-to-end test)
HELD_OUT = 1000

def fastv_run(exe: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def fail_line(proc: subprocess.CompletedProcess) -> str:
    """The message of a refused run's one error line (non-zero exit, nothing on stdout)."""
    return fastv_run_error(proc)[len("fastv-run: error: "):]


def py_error(make) -> str:
    from fastv_export.errors import FastVError

    with pytest.raises(FastVError) as info:
        make()
    return str(info.value)


def pixel_sha256(images) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(u, dtype=np.float32).tobytes() for u in images)).hexdigest()


def compare_dry_run(exe: Path, bundle: Path, conversations, tmp_path: Path, skip_system: bool = False) -> int:
    """fastv-run --dry-run against the Python front end on each conversation; returns how many were compared."""
    from fastv_export.bundle import load_bundle
    from fastv_export.errors import FastVError
    from fastv_export.frontend import Frontend, parse_requests

    b = load_bundle(bundle)
    front = Frontend.load(b.path, b)
    tmp_path.mkdir(parents=True, exist_ok=True)
    compared = 0
    for i, (request, raw) in enumerate(conversations):
        path = tmp_path / f"req{i}.json"
        path.write_text(json.dumps(request))
        proc = fastv_run(exe, "--bundle", bundle, "--request", path, "--dry-run", *(["--raw"] if raw else []))
        try:
            prepared = front.prepare(parse_requests(request), raw=raw)
        except FastVError as exc:   # refused by Python: refused by C++ too
            assert proc.returncode != 0, f"{request}: Python refuses ({exc}), fastv-run accepts"
            fail_line(proc)
            continue
        assert proc.returncode == 0, f"{request}: {proc.stderr}"
        row = json.loads(proc.stdout)["rows"][0]
        assert row["prompt_text"] == prepared.prompts[0], request
        assert row["prompt_ids"] == prepared.input_ids[0].tolist(), request
        assert row["pixel_sha256"] == pixel_sha256(prepared.images), request
        compared += 1
    return compared
