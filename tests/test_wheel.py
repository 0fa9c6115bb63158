"""The installed package's TokenSelect plugin (issue 25): the CUDA architectures read from a library, the
lookup of `fastv-export build` (packaged library first, then the checkout's build, else one line offering
--no-plugin before any work), --version / `plugin`, and the sdist and wheel themselves (slow: they are built
from a copy of this checkout; $FASTV_WHEEL names a wheel already built, e.g. by scripts/check_wheel.sh in CI).

The fresh-environment install + `fastv-export pipeline` of the wheel is scripts/check_wheel.sh (.ci/run)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from fastv_export import packaged_plugin as pp
from fastv_export.errors import FastVError
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
NVCC = pp.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs CUDA's nvcc")


# ------------------------------------------------------------------------------ architectures of a library
def _nvcc_library(tmp_path: Path, gencodes: list[str], sources: int = 2) -> Path:
    """A shared library of ``sources`` CUDA files compiled by nvcc with exactly these -gencode options."""
    files = []
    for i in range(sources):
        f = tmp_path / f"k{i}.cu"
        f.write_text(f"__global__ void k{i}(float* x) {{ x[threadIdx.x] += {i}.0f; }}\n"
                     f"void launch{i}(float* x) {{ k{i}<<<1, 32>>>(x); }}\n")
        files.append(str(f))
    lib = tmp_path / "libk.so"
    cmd = [NVCC, "-shared", "-Xcompiler", "-fPIC", "-o", str(lib), *files]
    for g in gencodes:
        cmd += ["-gencode", g]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return lib


@needs_nvcc
def test_architectures_are_read_from_the_fat_binaries_nvcc_wrote(tmp_path):
    lib = _nvcc_library(tmp_path, ["arch=compute_75,code=sm_75", "arch=compute_86,code=sm_86",
                                   "arch=compute_90,code=compute_90"])
    assert pp.fatbin_archs(lib) == pp.CudaArchs(sass=(75, 86), ptx=(90,))
    (tmp_path / "one").mkdir()
    one = _nvcc_library(tmp_path / "one", ["arch=compute_120,code=[sm_120,compute_120]"], sources=1)
    assert pp.fatbin_archs(one) == pp.CudaArchs(sass=(120,), ptx=(120,))


def test_a_library_without_cuda_code_holds_no_architectures(tmp_path):
    assert pp.fatbin_archs(sys.executable) == pp.CudaArchs()       # an ELF file without .nv_fatbin
    (tmp_path / "x.so").write_bytes(b"not an ELF file at all")
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        pp.fatbin_archs(tmp_path / "x.so")


def test_plugin_library_holds_the_architectures_cmake_was_given(plugin_build):
    # build_plugin.sh --archs "86;89": CMake gives each of them machine code and PTX
    assert pp.fatbin_archs(plugin_build("86;89")) == pp.CudaArchs(sass=(86, 89), ptx=(86, 89))


@pytest.mark.parametrize("cc, runs", [
    (75, True), (80, False), (86, True), (87, True), (89, True),   # sm_86 code runs on 8.6 and later 8.x
    (90, False), (100, False), (120, True), (121, True), (130, True),   # 12.x code; PTX 12.0 on anything newer
])
def test_which_gpus_a_library_runs_on(cc, runs):
    # NVIDIA's rule: machine code for X.y runs on X.z with z >= y; PTX for X.y is compiled for any GPU >= X.y
    assert pp.CudaArchs(sass=(75, 86, 120), ptx=(120,)).runs_on(cc) is runs


def test_the_wheel_targets_are_the_readmes_and_plugin_defaults():
    text = (ROOT / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if "machine code for" in ln and "wheel" in ln)
    listed = re.findall(r"SM(\d+)", line.split("machine code for", 1)[1].split("PTX", 1)[0])
    ptx = re.findall(r"SM(\d+)", line.split("PTX", 1)[1])
    assert tuple(listed) == pp.WHEEL_CUDA_ARCHS and ptx[:1] == [pp.WHEEL_CUDA_ARCHS[-1]], line
    cmake = (ROOT / "plugins" / "CMakeLists.txt").read_text()
    defaults = re.search(r"set\(FASTV_DEFAULT_CUDA_ARCHS ([\d ]+)\)", cmake).group(1).split()
    assert set(pp.WHEEL_CUDA_ARCHS) <= set(defaults)
    assert pp.wheel_cmake_archs(("75", "86", "120")) == "75-real;86-real;120"
    assert pp.wheel_cmake_archs(("86-real", "89")) == "86-real;89"


# ---------------------------------------------------------------------------------------------- lookup
@pytest.fixture
def installed(tmp_path, monkeypatch):
    """``installed(lib=None, record=None)`` -> the package folder of a pretend installation (not a checkout):
    ``plugin_lib/`` holding a copy of ``lib`` and ``record`` as its JSON."""
    pkg = tmp_path / "site-packages" / "fastv_export"

    def make(lib: Path | None = None, record: dict | None = None) -> Path:
        (pkg / pp.LIB_DIR).mkdir(parents=True, exist_ok=True)
        if lib is not None:
            shutil.copy2(lib, pkg / pp.LIB_DIR / pp.LIBRARY)
        if record is not None:
            (pkg / pp.LIB_DIR / pp.INFO_FILE).write_text(json.dumps(record))
        monkeypatch.setattr(pp, "package_dir", lambda: pkg)
        return pkg
    return make


def test_the_packaged_library_comes_first(installed, plugin_build):
    from fastv_export.engines.build import default_plugin_library

    pkg = installed(plugin_build("86;89"))
    assert pp.checkout_root() is None
    assert default_plugin_library(["SM86", "SM89"]) == pkg / pp.LIB_DIR / pp.LIBRARY


def test_a_packaged_library_without_the_target_is_refused_in_one_line(installed, plugin_build):
    from fastv_export.engines.build import default_plugin_library

    installed(plugin_build("86;89"))
    with pytest.raises(FastVError) as exc:
        default_plugin_library(["SM86", "SM75"])      # 8.6/8.9 code does not run on 7.5
    msg = str(exc.value)
    assert "\n" not in msg and "holds no code for SM75" in msg and "--no-plugin" in msg
    assert "fastv-export plugin build --archs 75" in msg


def test_no_library_and_no_checkout_is_refused_in_one_line(installed):
    from fastv_export.engines.build import default_plugin_library

    installed(record={"built": False, "reason": "no nvcc found at build time"})
    with pytest.raises(FastVError) as exc:
        default_plugin_library(["SM86"])
    msg = str(exc.value)
    assert "\n" not in msg and "no nvcc found at build time" in msg and "--no-plugin" in msg


def test_in_the_checkout_the_plugin_is_built_from_plugins():
    assert pp.packaged_library() is None and pp.checkout_root() == ROOT and pp.source_root() == ROOT


@pytest.mark.tensorrt
def test_pipeline_without_a_plugin_stops_before_exporting(installed, tmp_path, capsys):
    installed(record={"built": False, "reason": "no nvcc found at build time"})
    rc, err = run_cli(capsys, ["pipeline", "--out", str(tmp_path / "b")])
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("fastv-export pipeline: error: no TokenSelect plugin library") and "--no-plugin" in err
    assert not (tmp_path / "b").exists()


def test_version_prints_the_plugins_sha256_and_architectures(installed, plugin_build, capsys):
    import hashlib

    from fastv_export.cli import main

    lib = plugin_build("86;89")
    installed(lib, {"built": True, "nvcc": "V13.0.88", "cuda_archs_requested": "86;89", "platform": "x86_64"})
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert hashlib.sha256(lib.read_bytes()).hexdigest() in out
    assert "sm_86 sm_89, PTX compute_86 compute_89" in out and "nvcc V13.0.88" in out

    installed(record={"built": False, "reason": "no nvcc found at build time"})
    (pp.package_dir() / pp.LIB_DIR / pp.LIBRARY).unlink()
    assert main(["plugin"]) == 0
    out = capsys.readouterr().out
    assert "TokenSelect plugin: none" in out and "no nvcc found at build time" in out and "--no-plugin" in out


def test_plugin_build_refuses_bad_architectures(capsys):
    rc, err = run_cli(capsys, ["plugin", "build", "--archs", "ampere"])
    assert rc == 2 and err == "fastv-export plugin: error: --archs 'ampere': give compute capabilities such as 87 " \
                              "or 86,89"


# ------------------------------------------------------------------------------------ the sdist and wheel
@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist of a copy of this checkout's files (tracked and new, not ignored ones), built without
    isolation (this environment's setuptools)."""
    tmp = tmp_path_factory.mktemp("sdist")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    tree = tmp / "tree"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tree / f)
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp / "dist"),
                    str(tree)], check=True, capture_output=True, text=True)
    return next((tmp / "dist").glob("*.tar.gz"))


@pytest.mark.slow
def test_the_sdist_carries_the_plugin_runtime_and_scripts(sdist):
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "plugins", "runtime", "scripts"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    assert tracked and not set(tracked) - names
    assert {"setup.py", "MANIFEST.in", "pyproject.toml"} <= names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


@pytest.mark.slow
def test_the_sdist_installs_without_nvcc_and_says_how_engines_are_built(sdist, tmp_path):
    env = dict(os.environ, CUDACXX=str(tmp_path / "no-nvcc"))      # a CUDA compiler that does not exist
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation",
                           "--target", str(tmp_path / "site"), str(sdist)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the TokenSelect plugin library is NOT packaged (no nvcc found at build time" in proc.stdout + proc.stderr
    pkg = tmp_path / "site" / "fastv_export"
    assert not (pkg / pp.LIB_DIR / pp.LIBRARY).exists()
    assert json.loads((pkg / pp.LIB_DIR / pp.INFO_FILE).read_text())["built"] is False
    assert (pkg / pp.SRC_DIR / pp.BUILD_SCRIPT).is_file()
    assert (pkg / pp.SRC_DIR / "plugins" / "CMakeLists.txt").is_file()
    run = subprocess.run([sys.executable, "-c", "import sys; from fastv_export.cli import main; main(sys.argv[1:])",
                          "--version"], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
    assert run.returncode == 0, run.stderr
    assert "TokenSelect plugin: none (this installation was built without it" in run.stdout
    assert "--no-plugin" in run.stdout


@pytest.mark.slow
@needs_nvcc
def test_the_wheel_holds_the_plugin_for_the_readme_targets_only(sdist, tmp_path):
    wheel = os.environ.get("FASTV_WHEEL")
    if not wheel:
        env = dict(os.environ, FASTV_REQUIRE_PLUGIN="1", FASTV_PLUGIN_BUILD_DIR=str(tmp_path / "build"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(sdist)], check=True, capture_output=True, text=True, env=env)
        wheel = str(next((tmp_path / "dist").glob("*.whl")))
    with zipfile.ZipFile(wheel) as z:
        tag = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))).decode()
        binaries = sorted(n for n in z.namelist() if z.read(n)[:4] == b"\x7fELF")
        z.extractall(tmp_path / "wheel")
    assert "Root-Is-Purelib: false" in tag and "Tag: py3-none-linux_x86_64" in tag, tag
    lib_dir = tmp_path / "wheel" / "fastv_export" / pp.LIB_DIR
    assert binaries == [f"fastv_export/{pp.LIB_DIR}/{pp.LIBRARY}", f"fastv_export/{pp.LIB_DIR}/{pp.AUTOLOAD_LIBRARY}"]
    readme = tuple(int(a) for a in pp.WHEEL_CUDA_ARCHS)
    assert pp.fatbin_archs(lib_dir / pp.LIBRARY) == pp.CudaArchs(sass=readme, ptx=readme[-1:])
    assert pp.fatbin_archs(lib_dir / pp.AUTOLOAD_LIBRARY) == pp.CudaArchs()
    record = json.loads((lib_dir / pp.INFO_FILE).read_text())
    assert record["built"] is True and record["sha256"] == pp.file_sha256(lib_dir / pp.LIBRARY)
    assert (record["sass"], record["ptx"]) == (list(readme), list(readme[-1:]))
    assert (tmp_path / "wheel" / "fastv_export" / pp.SRC_DIR / pp.BUILD_SCRIPT).is_file()
    print(f"wheel {Path(wheel).name}: {Path(wheel).stat().st_size / 2**20:.2f} MiB")
