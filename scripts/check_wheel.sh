#!/usr/bin/env bash
# The package as a user installs it: build the sdist and, from it, the wheel (which compiles the TokenSelect
# plugin for the wheel's CUDA targets), check what they hold, install the wheel with the trt extra into a
# fresh virtual environment outside the checkout and run `fastv-export pipeline --out b` in an empty folder:
# exit 0, four engines, one PLUGIN_V3 layer in pre_k, the packaged plugin's sha256 in the manifest.
#
# Usage: scripts/check_wheel.sh [--work DIR] [--keep]
#   --work DIR   where the sdist, wheel, virtual environment and bundle go (default: a new temporary folder,
#                removed at the end unless --keep)
# Needs the checkout's .venv with the dev extra (scripts/setup.sh dev; `python -m build`) and CUDA's nvcc
# (FASTV_REQUIRE_PLUGIN=1: a wheel without the plugin fails). Prints each step's time and the wheel's size.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

work=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "check_wheel.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$work" ]; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/fastv-wheel.XXXXXX")"
  [ "$keep" -eq 1 ] || trap 'rm -rf "$work"' EXIT
fi
case "$work" in "$root"|"$root"/*) echo "check_wheel.sh: --work must be outside the checkout" >&2; exit 2 ;; esac
mkdir -p "$work"
py="$root/.venv/bin/python"
[ -x "$py" ] || { echo "check_wheel.sh: no $root/.venv: run scripts/setup.sh dev first" >&2; exit 2; }

step_start=0
step() { step_start=$(date +%s); echo "check_wheel.sh: $*"; }
done_step() { echo "check_wheel.sh:   done in $(( $(date +%s) - step_start )) s"; }
total_start=$(date +%s)

# ------------------------------------------------------------------------------------ sdist, then wheel
step "building the sdist and, from it, the wheel (the plugin compiled for the wheel's CUDA targets)"
rm -rf "$work/dist"
FASTV_REQUIRE_PLUGIN=1 "$py" -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; echo "check_wheel.sh: python -m build failed" >&2; exit 1; }
grep "fastv-export build:" "$work/build.log" | sed 's/^ */  /' || true
done_step
sdist="$(ls "$work"/dist/*.tar.gz)"
wheel="$(ls "$work"/dist/*.whl)"

# ------------------------------------------------------------------------------------ what they hold
step "checking the sdist and the wheel"
"$py" - "$sdist" "$wheel" <<'PY'
import sys, tarfile, tempfile, zipfile
from pathlib import Path
from fastv_export import packaged_plugin as pp

sdist, wheel = Path(sys.argv[1]), Path(sys.argv[2])
with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
need = ["setup.py", "MANIFEST.in", "plugins/CMakeLists.txt", "plugins/src/token_select_plugin.cpp",
        "runtime/CMakeLists.txt", "scripts/build_plugin.sh", "scripts/fetch_trt_headers.sh"]
missing = [n for n in need if n not in names]
assert not missing, f"the sdist lacks {missing}"
assert not [n for n in names if n.endswith((".so", ".o"))], "the sdist holds built files"
with zipfile.ZipFile(wheel) as z:
    tag = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))).decode()
    elves = [n for n in z.namelist() if z.read(n)[:4] == b"\x7fELF"]
    with tempfile.TemporaryDirectory() as d:
        lib = Path(z.extract(f"fastv_export/{pp.LIB_DIR}/{pp.LIBRARY}", d))
        archs, sha, lib_mib = pp.fatbin_archs(lib), pp.file_sha256(lib), lib.stat().st_size / 2**20
    src = [n for n in z.namelist() if n.startswith(f"fastv_export/{pp.SRC_DIR}/")]
assert "Tag: py3-none-linux_x86_64" in tag, tag
want = sorted(f"fastv_export/{pp.LIB_DIR}/{n}" for n in (pp.LIBRARY, pp.AUTOLOAD_LIBRARY))
assert sorted(elves) == want, f"the wheel's binaries are {elves}, expected {want}"
sass = tuple(int(a) for a in pp.WHEEL_CUDA_ARCHS)
assert archs == pp.CudaArchs(sass, sass[-1:]), f"the plugin holds {archs.describe()}, expected {sass} + PTX"
assert any(n.endswith("scripts/build_plugin.sh") for n in src) and any(n.endswith("CMakeLists.txt") for n in src)
print(f"  sdist {sdist.name}: {sdist.stat().st_size / 2**20:.2f} MiB")
print(f"  wheel {wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB; plugin {lib_mib:.2f} MiB "
      f"sha256 {sha}: {archs.describe()}")
PY
done_step

# ------------------------------------------------------------------------------------ a fresh environment
step "installing the wheel with the trt extra into a fresh virtual environment ($work/venv)"
rm -rf "$work/venv"
python3 -m venv "$work/venv"
(
  cd "$work"
  venv/bin/python -m pip install -q --upgrade pip
  venv/bin/python -m pip install -q torch==2.13.0
  venv/bin/python -m pip install -q "$wheel[trt]"
) > "$work/install.log" 2>&1 || { tail -30 "$work/install.log" >&2; echo "check_wheel.sh: install failed" >&2; exit 1; }
done_step

step "fastv-export pipeline --out b in an empty folder, with the installed package"
rm -rf "$work/empty"
mkdir "$work/empty"
(
  cd "$work/empty"
  export PATH="$work/venv/bin:$PATH" TQDM_DISABLE=1     # no progress bars in the log
  unset PYTHONPATH
  fastv-export --version
  fastv-export pipeline --out b
  python - <<'PY'
import json
from pathlib import Path
import fastv_export
from fastv_export import packaged_plugin as pp

pkg = Path(fastv_export.__file__).resolve().parent
assert "site-packages" in str(pkg), f"fastv_export imported from {pkg}, not the installed wheel"
m = json.loads(Path("b/manifest.json").read_text())
engines = m["engines"]["engines"]
assert sorted(engines) == ["embed", "post_k", "pre_k", "vision"], sorted(engines)
for graph, e in engines.items():
    assert Path("b", e["file"]).is_file(), e["file"]
    assert e["plugin_layers"] == (1 if graph == "pre_k" else 0), (graph, e["plugin_layers"])
assert m["engines"]["token_select"] == "plugin", m["engines"]["token_select"]
lib = pp.packaged_library()
assert lib is not None and m["engines"]["plugin"]["sha256"] == pp.file_sha256(lib), "not the packaged plugin"
print(f"  manifest: 4 engines, pre_k with 1 PLUGIN_V3 layer, plugin sha256 {m['engines']['plugin']['sha256']} "
      f"(the packaged {lib})")
PY
)
done_step
echo "check_wheel.sh: passed in $(( $(date +%s) - total_start )) s"
