"""The TokenSelect plugin library that an installed package carries, what it holds, and rebuilding it.

A wheel built where nvcc exists (setup.py's build step) holds, inside the package:

- ``plugin_lib/libfastv_plugins.so`` and ``libfastv_plugins_autoload.so``: the plugin, a fat binary for the
  CUDA architectures of :data:`WHEEL_CUDA_ARCHS` (x86_64) as machine code, plus PTX of the newest;
- ``plugin_lib/libfastv_plugins.json``: how it was built (the architectures asked for and those found in the
  library, nvcc's version, its sha256), or, when no nvcc was found, ``built: false`` and why;
- ``plugin_src/``: ``plugins/`` and ``scripts/build_plugin.sh`` / ``fetch_trt_headers.sh``, from which
  ``fastv-export plugin build --archs 87`` rebuilds the library for another target (Jetson Orin, Thor, ...).

A checkout (editable install) holds none of these: there the plugin is built on demand from ``plugins/``.

The architectures are read from the library itself (its ``.nv_fatbin`` section), so no CUDA tool (cuobjdump)
is needed to describe it. This module imports only the standard library at module level: setup.py loads it
by path while building the wheel, before the package's dependencies exist.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

LIBRARY = "libfastv_plugins.so"
AUTOLOAD_LIBRARY = "libfastv_plugins_autoload.so"
INFO_FILE = "libfastv_plugins.json"
LIB_DIR = "plugin_lib"             # inside the package
SRC_DIR = "plugin_src"             # inside the package
BUILD_SCRIPT = "scripts/build_plugin.sh"
#: what ``fastv-export plugin build`` (and the wheel's build step) copy of a source tree
SOURCE_FILES = ("plugins", "scripts/build_plugin.sh", "scripts/fetch_trt_headers.sh")

#: The x86_64 wheel's CUDA targets (machine code): the GPUs the README lists for x86_64 machines: Turing to
#: Blackwell RTX (7.5, 8.6, 8.9, 12.0), A100 (8.0), H100 (9.0), B200 / B300 (10.0, 10.3); plus PTX of the last
#: one, which newer GPUs (12.1) JIT-compile. Jetson Orin (8.7) and Thor (11.0) are aarch64 boards: the plugin
#: is rebuilt there (``fastv-export plugin build --archs 87``).
WHEEL_CUDA_ARCHS = ("75", "80", "86", "89", "90", "100", "103", "120")

_FATBIN_MAGIC = 0xBA55ED50
_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class CudaArchs:
    """The CUDA code a library holds: machine code (``sass``) and PTX, as compute capabilities x 10."""
    sass: tuple[int, ...] = ()
    ptx: tuple[int, ...] = ()

    def describe(self) -> str:
        parts = [" ".join(f"sm_{a}" for a in self.sass)] if self.sass else []
        if self.ptx:
            parts.append("PTX " + " ".join(f"compute_{a}" for a in self.ptx))
        return ", ".join(parts) or "no CUDA code"

    def runs_on(self, cc: int) -> bool:
        """Whether a GPU of compute capability ``cc`` (e.g. 86) can run this code: machine code of the same
        major version and a minor version not above its own, or PTX of a compute capability not above it."""
        return any(a // 10 == cc // 10 and a <= cc for a in self.sass) or any(a <= cc for a in self.ptx)


def wheel_cmake_archs(archs: Sequence[str] = WHEEL_CUDA_ARCHS) -> str:
    """CMake's list for ``archs``: machine code of each, PTX of the last ("75-real;...;120"); items that
    already say what they want ("86-real", "90-virtual") are kept."""
    return ";".join([f"{a}-real" if a.isdigit() else a for a in archs[:-1]] + [archs[-1]])


def fatbin_archs(path: str | os.PathLike) -> CudaArchs:
    """The CUDA architectures in the ``.nv_fatbin`` section of the ELF shared library ``path`` (every fat
    binary of every translation unit: header magic 0xBA55ED50, then entries of kind 1 = PTX, 2 = machine code,
    each naming its architecture). Raises ValueError when the file is not such a library."""
    data = Path(path).read_bytes()
    if data[:4] != _ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:     # name offset, file offset, size
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    fatbin = None
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name:end] == b".nv_fatbin":
            fatbin = data[offset:offset + size]
    if fatbin is None:
        return CudaArchs()
    sass: set[int] = set()
    ptx: set[int] = set()
    pos = 0
    while pos + 16 <= len(fatbin):
        magic, _, header, size = struct.unpack_from("<IHHQ", fatbin, pos)
        if magic != _FATBIN_MAGIC:          # padding between the fat binaries of two translation units
            pos += 8
            continue
        entry, end = pos + header, pos + header + size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, entry)
            arch, = struct.unpack_from("<I", fatbin, entry + 28)
            if kind == 1:
                ptx.add(arch)
            elif kind == 2:
                sass.add(arch)
            else:
                raise ValueError(f"{path}: unknown fat binary entry kind {kind}")
            entry += entry_header + payload
        pos = end
    return CudaArchs(tuple(sorted(sass)), tuple(sorted(ptx)))


def file_sha256(path: str | os.PathLike) -> str:
    # fastv_export.files.sha256's twin: setup.py loads this module by path, before the package can be imported
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- the library
def package_dir() -> Path:
    return Path(__file__).resolve().parent


def packaged_library() -> Path | None:
    """The plugin library inside this installation (a wheel built with nvcc), or None."""
    lib = package_dir() / LIB_DIR / LIBRARY
    return lib if lib.is_file() else None


def build_record() -> dict | None:
    """``plugin_lib/libfastv_plugins.json`` of this installation (None in a checkout)."""
    path = package_dir() / LIB_DIR / INFO_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def checkout_root() -> Path | None:
    """The source checkout this package runs from (an editable install), when it has plugins/."""
    root = package_dir().parent
    ok = (root / BUILD_SCRIPT).is_file() and (root / "plugins" / "CMakeLists.txt").is_file()
    return root if ok else None


def source_root() -> Path | None:
    """A tree holding plugins/ and the build scripts: the installed package's copy, else the checkout."""
    packaged = package_dir() / SRC_DIR
    if (packaged / BUILD_SCRIPT).is_file():
        return packaged
    return checkout_root()


@dataclass(frozen=True)
class PluginInfo:
    """What a plugin library is: its path, sha256, CUDA code, and the record written when it was built."""
    path: Path
    sha256: str
    archs: CudaArchs
    record: dict = field(default_factory=dict)

    def describe(self) -> str:
        line = f"{self.path} sha256 {self.sha256} ({self.archs.describe()})"
        if self.record.get("sha256") not in (None, self.sha256):
            line += f"; differs from the library recorded at build time (sha256 {self.record['sha256']})"
        return line


def describe_library(path: str | os.PathLike, record: dict | None = None) -> PluginInfo:
    path = Path(path)
    return PluginInfo(path, file_sha256(path), fatbin_archs(path), dict(record or {}))


def missing_targets(archs: CudaArchs, targets: Sequence[str]) -> list[str]:
    """The TensorRT targets ("SM86", ...) that ``archs`` cannot run on (others, such as "CURRENT", are not
    checked here)."""
    out = []
    for t in targets:
        t = t.upper()
        if t.startswith("SM") and t[2:].isdigit() and not archs.runs_on(int(t[2:])):
            out.append(t)
    return out


def no_plugin_reason() -> str:
    """Why this installation holds no plugin library (one clause)."""
    record = build_record() or {}
    if record.get("built") is False:
        return f"this installation was built without it ({record.get('reason', 'no reason recorded')})"
    return "this installation holds none and is not a source checkout"


# ---------------------------------------------------------------------------------------------- building
def find_nvcc() -> str | None:
    """The CUDA compiler: $CUDACXX (when set, it or nothing), ``nvcc`` on PATH, or a toolkit's usual place."""
    given = os.environ.get("CUDACXX")
    if given:
        return given if os.access(given, os.X_OK) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for c in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if os.access(c, os.X_OK):
            return c
    return None


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].split("release", 1)[1].strip().split(",")[-1].strip() if lines else "unknown"


def default_archs() -> tuple[str, ...] | None:
    """$FASTV_CUDA_ARCHS, else the wheel's list on x86_64, else None (plugins/CMakeLists.txt's default list,
    filtered by what nvcc supports: aarch64 boards build for their own GPU)."""
    env = os.environ.get("FASTV_CUDA_ARCHS", "").replace(",", ";").replace(" ", ";")
    if env.strip(";"):
        return tuple(a for a in env.split(";") if a)
    return WHEEL_CUDA_ARCHS if platform.machine().lower() in ("x86_64", "amd64") else None


def copy_sources(src_root: Path, dst_root: Path) -> None:
    """Copy :data:`SOURCE_FILES` of ``src_root`` into ``dst_root``, keeping modification times (so that a
    CMake build of an earlier copy stays incremental) and leaving build outputs behind."""
    skip = shutil.ignore_patterns("build", "build-*", "*.so", "*.o", "__pycache__")
    for rel in SOURCE_FILES:
        src, dst = src_root / rel, dst_root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=skip, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)


def python_with_pip() -> str | None:
    """An interpreter that has pip: this one, else the one it was made from (build front ends such as
    `python -m build` run setup.py in an environment without pip), else python3 on PATH."""
    seen = []
    for c in (sys.executable, getattr(sys, "_base_executable", None), shutil.which("python3")):
        if not c or c in seen:
            continue
        seen.append(c)
        if subprocess.run([c, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return c
    return None


def build_library(src_root: Path, build_dir: Path, archs: Sequence[str] | str | None, *,
                  tensorrt_include: str | None = None, jobs: int | None = None,
                  nvcc: str | None = None) -> Path:
    """Run ``scripts/build_plugin.sh`` of ``src_root`` into ``build_dir`` for ``archs`` (a CMake list or its
    items; None: the script's default) and return the library. Raises RuntimeError with the tail of the
    build's output when it fails."""
    cmd = ["bash", str(src_root / BUILD_SCRIPT), "--build-dir", str(build_dir)]
    if archs:
        cmd += ["--archs", archs if isinstance(archs, str) else ";".join(archs)]
    if tensorrt_include:
        cmd += ["--tensorrt-include", tensorrt_include]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    env = dict(os.environ)
    pip_python = python_with_pip()       # the header fetch runs `python -m pip download`
    if pip_python and "FASTV_PIP_PYTHON" not in env:
        env["FASTV_PIP_PYTHON"] = pip_python
    if nvcc:
        env["CUDACXX"] = nvcc
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=src_root, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        raise RuntimeError("scripts/build_plugin.sh failed:\n" + "\n".join(tail))
    lib = Path(proc.stdout.strip().splitlines()[-1])
    if not lib.is_file():
        raise RuntimeError(f"scripts/build_plugin.sh printed {lib}, which does not exist")
    return lib


def make_record(lib: Path, cmake_archs: str | None, nvcc: str, built_by: str) -> dict:
    """The JSON written next to a built library (:data:`INFO_FILE`); ``cmake_archs``: the list it was built
    for (None: plugins/CMakeLists.txt's default)."""
    found = fatbin_archs(lib)
    return {"built": True, "library": LIBRARY, "sha256": file_sha256(lib), "bytes": lib.stat().st_size,
            "cuda_archs_requested": cmake_archs or "default of plugins/CMakeLists.txt",
            "sass": list(found.sass), "ptx": list(found.ptx), "nvcc": nvcc_version(nvcc),
            "platform": platform.machine(), "built_by": built_by}
