"""Host memory of the stages (export, validate, build): what a stage is estimated to need, checked against the memory
available before it starts, and the peak resident memory (RSS) it reached, measured and recorded.

Peak: Linux's high-water mark of the process (``VmHWM`` in /proc/self/status), reset at the start of each stage by
writing 5 to /proc/self/clear_refs; where that reset is refused the peak read is the process's peak so far (an upper
bound of the stage's, flagged ``peak_reset: false``). Records go to ``BUNDLE/logs/stages.json`` (one entry per stage,
the last run of each; a folder, so the manifest's file list and checksums never include it).

Estimate: a fixed base (Python, torch, ONNX Runtime and the tokenizer loaded: ``BASE_BYTES``) plus the bytes of the
weights the stage holds times the stage's ratio (``RATIOS``, measured; README "Memory"). Available: the smallest of
/proc/meminfo ``MemAvailable``, the cgroup's limit minus its usage (v2 or v1) and the address-space limit
(``ulimit -v``) minus the address space in use; ``FASTV_EXPORT_MEMORY_AVAILABLE`` (bytes, or with K/M/G) replaces
them (tests, or a machine whose limits are not visible from inside).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from fastv_export.errors import FastVError
from fastv_export.files import atomic_write_json

log = logging.getLogger(__name__)

AVAILABLE_ENV = "FASTV_EXPORT_MEMORY_AVAILABLE"
STAGE_LOG = Path("logs") / "stages.json"          # relative to the bundle directory
OVERRIDE_FLAG = "--ignore-memory-check"
GiB = 1 << 30

#: RSS of a stage before it holds any weights: the interpreter with torch, transformers, onnx and ONNX Runtime
#: imported (measured 0.6-0.9 GiB on this project's CPU machines), rounded up
BASE_BYTES = 1 * GiB
#: peak RSS over the bytes of the weights the stage holds (``weights`` below), measured:
#: - export: 1.27x the fp16 weights (LLaVA-1.5-7B-shaped, 13.5 GB) and 1.39x the fp32 weights (1.1B LLaVA, 4.4 GB)
#:   before the graphs were written with external data while the model is loaded; since then bench-llava (fp32,
#:   1.00 GiB of weights) peaks at 1.83 GiB (3.96 GiB before), 0.3 GiB of it the interpreter; rounded up to 1.4x;
#: - validate: the PyTorch model (fp32) and the ONNX Runtime sessions are no longer held together (validate.py):
#:   bench-llava (fp32, 1.00 GiB of weights) peaks at 1.9-2.3 GiB (2.89 GiB before), 0.3 GiB of it the interpreter,
#:   where the old order took 2.6x the weights (1.1B LLaVA); Qwen2.5-VL-3B-shaped (fp32, 13.99 GiB): 16.78 GiB
#:   (1.20x: the ONNX Runtime sessions; loading the model peaks at 14.4 GiB since the checkpoint's pages are
#:   reclaimed as they are read, 18.5 GiB before); rounded up to 1.3x;
#: - build: TensorRT-RTX's ahead-of-time build of the largest graph. The build holds the graph's weights once
#:   (engines/graph_weights.py: parser fed in place from a memory map, engine streamed to its file); the rest is
#:   TensorRT's builder, its copy of the weights and one per optimization profile (post_k's engine, 2 profiles,
#:   holds its weights twice: 1.45 GiB for 0.78 GiB, as before). bench-llava's post_k (fp32,
#:   0.78 GiB, 2 profiles): +2.95 GiB over the interpreter (3.74x; 6.7x before), whole `build` 3.22 GiB (5.65 GiB
#:   before); rounded up to 4.0x. (Issue 23's 2.7x, 1.1B LLaVA, was the builder alone, parsing from the file.)
RATIOS = {"export": 1.4, "validate": 1.3, "build": 4.0}
DTYPE_BYTES = {"fp32": 4, "fp16": 2}


# ------------------------------------------------------------------------------------------------ reading
def _status_bytes(key: str, status: str | None = None) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, VmSize) in bytes; None where there is no /proc."""
    try:
        text = status if status is not None else Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def current_rss() -> int:
    """Resident memory of this process now, in bytes."""
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else peak_rss()


def peak_rss() -> int:
    """The process's resident high-water mark, in bytes (since the last :func:`reset_peak`, where it worked)."""
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux: 5 into /proc/self/clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64 * 1024 * 1024


def release_freed() -> None:
    """Collect garbage and hand the allocator's free memory back to the system (glibc ``malloc_trim``: after a
    model is freed its pages would otherwise stay resident in the heap and count in the next phase's peak)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):          # not glibc: the pages are reused by the next allocations instead
        pass


#: madvise(2)'s MADV_PAGEOUT (Linux 5.4): reclaim the range's pages; clean file pages are dropped (a later read
#: faults them back from the file), pages a process wrote are kept (they would need swap): no data is ever lost
_MADV_PAGEOUT = 21


def _file_mappings(paths: set[str]) -> list[tuple[int, int]]:
    """(start, length) of this process's mappings of the files ``paths`` (/proc/self/maps)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].rstrip("\n") in paths:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi - lo))
    except OSError:
        pass
    return out


@contextlib.contextmanager
def dropping_file_pages(paths, interval_s: float = 0.05) -> Iterator[None]:
    """While the block runs, a thread reclaims this process's resident, unmodified pages of its mappings of the
    files ``paths`` every ``interval_s`` (``madvise(MADV_PAGEOUT)``; a later read faults the bytes back in from the
    file; a page the process wrote is never dropped). Loading a checkpoint through safetensors' memory maps (private
    copy-on-write maps) otherwise keeps every page read resident until the load ends: a 7 GB bf16 checkpoint loaded
    in fp32 peaked at the fp32 weights + 3-7 GiB of mapped file pages. Linux only; elsewhere, or on a kernel without
    MADV_PAGEOUT, the block runs as it is."""
    import ctypes
    import ctypes.util
    import threading

    wanted = {os.path.realpath(p) for p in paths}
    try:
        madvise = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        madvise = None
    if not wanted or madvise is None or not os.path.exists("/proc/self/maps"):
        yield
        return
    stop = threading.Event()

    def drop() -> None:
        for start, length in _file_mappings(wanted):
            madvise(start, length, _MADV_PAGEOUT)

    def run() -> None:
        while not stop.wait(interval_s):
            drop()

    thread = threading.Thread(target=run, name="fastv-checkpoint-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drop()


def parse_size(text: str) -> int:
    """``12345``, ``512M``, ``1.5G`` (binary units, optional ``B`` / ``iB``) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not m:
        raise FastVError(f"{AVAILABLE_ENV}={text!r} is not a size; give bytes or e.g. 512M, 16G")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


# ------------------------------------------------------------------------------------------------ available
@dataclass(frozen=True)
class Available:
    """Memory a stage may use: ``bytes``, and ``source``: which limit gave it."""
    bytes: int
    source: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None      # "max" (v2, no limit) -> None


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The cgroup memory limit minus its usage (v2: memory.max - memory.current of this process's group; v1:
    memory.limit_in_bytes - memory.usage_in_bytes), None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    candidates: list[tuple[Path, str, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        rel = parts[2].lstrip("/")
        if parts[0] == "0" and parts[1] == "":                         # v2 unified
            candidates.append((root / rel, "memory.max", "memory.current"))
        elif "memory" in parts[1].split(","):                           # v1 memory controller
            candidates.append((root / "memory" / rel, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    candidates += [(root, "memory.max", "memory.current"),
                   (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for directory, limit_name, usage_name in candidates:
        limit, usage = _read_int(directory / limit_name), _read_int(directory / usage_name)
        if limit is not None and usage is not None and limit < 1 << 60:   # v1 writes ~2^63 for "no limit"
            return max(0, limit - usage)
    return None


def available_memory() -> Available:
    """What a stage may still allocate: ``FASTV_EXPORT_MEMORY_AVAILABLE`` when set, else the smallest of
    MemAvailable, the cgroup's headroom and the address-space limit's headroom."""
    forced = os.environ.get(AVAILABLE_ENV)
    if forced:
        return Available(parse_size(forced), AVAILABLE_ENV)
    found: list[Available] = []
    try:
        m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", Path("/proc/meminfo").read_text(), re.M)
        if m:
            found.append(Available(int(m.group(1)) * 1024, "MemAvailable (/proc/meminfo)"))
    except OSError:
        pass
    cg = cgroup_headroom()
    if cg is not None:
        found.append(Available(cg, "the cgroup's memory limit"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append(Available(max(0, soft - (_status_bytes("VmSize") or 0)), "the address-space limit (ulimit -v)"))
    if not found:
        return Available(1 << 62, "no limit found")
    return min(found, key=lambda a: a.bytes)


# ------------------------------------------------------------------------------------------------ estimates
@dataclass(frozen=True)
class Estimate:
    """A stage's estimated peak: ``BASE_BYTES + ratio x weight_bytes``."""
    stage: str
    weight_bytes: int
    ratio: float
    what: str                               # which weights, in words

    @property
    def bytes(self) -> int:
        return int(BASE_BYTES + self.ratio * self.weight_bytes)

    def describe(self) -> str:
        return f"{gib(self.bytes)} ({self.ratio}x {gib(self.weight_bytes)} of {self.what} + {gib(BASE_BYTES)})"


def parameter_count(model: str | os.PathLike) -> int:
    """Parameters of a preset or a checkpoint directory, from its config alone (the model built on the meta device:
    no weights read or allocated)."""
    import json as _json

    import torch
    import transformers

    from fastv_export.presets import _CLASSES, PRESETS, build_preset_config

    name = str(model)
    if name in PRESETS:
        config, cls = build_preset_config(name), getattr(transformers, _CLASSES[name])
    else:
        path = Path(name)
        try:
            archs = _json.loads((path / "config.json").read_text()).get("architectures") or []
            cls = getattr(transformers, archs[0])
        except (OSError, ValueError, IndexError, AttributeError):
            raise FastVError(f"cannot read the architecture of {path}/config.json to estimate the memory "
                             f"needed; check the checkpoint, or pass {OVERRIDE_FLAG}") from None
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        module = cls(config)
    return sum(p.numel() for p in module.parameters())


def export_estimate(model: str | os.PathLike, precision: str) -> Estimate:
    return Estimate("export", parameter_count(model) * DTYPE_BYTES[precision], RATIOS["export"],
                    f"{precision} weights")


def validate_estimate(model: str | os.PathLike) -> Estimate:
    """Validation holds the PyTorch reference in fp32 whatever the bundle's precision."""
    return Estimate("validate", parameter_count(model) * 4, RATIOS["validate"], "fp32 weights (the reference)")


def build_estimate(bundle) -> Estimate:
    """The engine build holds one graph at a time: the largest graph's weights (its .onnx and external data)."""
    files = bundle.files
    sizes = {}
    from fastv_export.graphs.spec import GRAPHS

    for graph in GRAPHS:
        name = bundle.file(graph).name
        sizes[graph] = sum(files[f]["bytes"] for f in (name, f"{name}.data") if f in files)
    graph = max(sizes, key=sizes.get)
    return Estimate("build", sizes[graph], RATIOS["build"], f"the largest graph ({graph})")


def check_fits(estimate: Estimate, advice: str, ignore: bool = False,
               available: Available | None = None) -> Available:
    """Stop (one-line FastVError) when ``estimate`` exceeds the memory available, saying what to do (``advice``)
    and how to try anyway; with ``ignore`` only log a warning. Returns what was available."""
    available = available or available_memory()
    if estimate.bytes <= available.bytes:
        log.info("%s: needs about %s, %s available (%s)", estimate.stage, estimate.describe(), gib(available.bytes),
                 available.source)
        return available
    line = (f"{estimate.stage} needs about {estimate.describe()} of memory but {gib(available.bytes)} is available "
            f"({available.source})")
    if ignore:
        log.warning("%s; going on (%s)", line, OVERRIDE_FLAG)
        return available
    raise FastVError(f"{line}: {advice}, or pass {OVERRIDE_FLAG} to try anyway")


def add_memory_argument(parser) -> None:
    """``--ignore-memory-check`` (an argparse parser): start a stage even when its estimate exceeds the memory."""
    parser.add_argument(OVERRIDE_FLAG, action="store_true",
                        help="start each stage even when its memory estimate exceeds the memory available (the "
                             f"estimate: README 'Memory'; {AVAILABLE_ENV} replaces what is available)")


def preflight(estimate: Callable[[], Estimate], advice: str, ignore: bool = False) -> tuple[Estimate | None, Available]:
    """:func:`check_fits` on ``estimate()``; a model whose size cannot be read (a wrong --model, reported by the
    stage itself) is not checked."""
    available = available_memory()
    try:
        est = estimate()
    except Exception as exc:  # noqa: BLE001 - any failure to size the model leaves the check out, not the stage
        log.info("memory not checked: the model's size could not be read (%s)", " ".join(str(exc).split())[:200])
        return None, available
    return est, check_fits(est, advice, ignore, available)


EXPORT_ADVICE = {"fp32": "export with --dtype fp16 (half the weights) or on a machine with more memory",
                 "fp16": "export on a machine with more memory"}
VALIDATE_ADVICE = ("validate on a machine with more memory (copy the bundle and the checkpoint there), or skip "
                   "validation (`pipeline --skip-validation`)")
BUILD_ADVICE = {"fp32": "build on a machine with more memory, or export with --dtype fp16 (half the weights)",
                "fp16": "build on a machine with more memory"}


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class StageRecord:
    """One stage's memory, as ``logs/stages.json`` records it."""
    stage: str
    peak_rss_bytes: int = 0
    start_rss_bytes: int = 0
    peak_reset: bool = False                # False: the peak is the process's so far (an upper bound)
    seconds: float = 0.0
    estimate_bytes: int | None = None
    weight_bytes: int | None = None
    available_bytes: int | None = None
    finished: str = ""                      # UTC time
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        bound = "" if self.peak_reset else " (process peak so far: the high-water mark could not be reset)"
        est = "" if self.estimate_bytes is None else f", estimated {gib(self.estimate_bytes)}"
        return f"{self.stage}: peak RSS {gib(self.peak_rss_bytes)}{bound}{est}, {self.seconds:.1f} s"


@contextlib.contextmanager
def measure(stage: str, estimate: Estimate | None = None, available: Available | None = None) -> Iterator[StageRecord]:
    """Measure the block as ``stage``: high-water mark reset on entry, read on exit, into the record yielded
    (filled when the block ends without an exception), logged at INFO."""
    import gc

    gc.collect()
    record = StageRecord(stage, start_rss_bytes=current_rss(), peak_reset=reset_peak(),
                         estimate_bytes=None if estimate is None else estimate.bytes,
                         weight_bytes=None if estimate is None else estimate.weight_bytes,
                         available_bytes=None if available is None else available.bytes)
    start = time.perf_counter()
    yield record
    record.peak_rss_bytes = peak_rss()
    record.seconds = round(time.perf_counter() - start, 3)
    record.finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log.info("%s", record.describe())


def read_stage_log(bundle_dir: str | os.PathLike) -> dict:
    path = Path(bundle_dir) / STAGE_LOG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("stages", {}) if isinstance(data, dict) and isinstance(data.get("stages"), dict) else {}


def record_stages(bundle_dir: str | os.PathLike, *records: StageRecord, previous: dict | None = None) -> Path:
    """Add ``records`` to ``BUNDLE/logs/stages.json`` (written atomically), over ``previous`` (the log as read
    before a stage that replaces the bundle directory) or the log on disk."""
    stages = dict(read_stage_log(bundle_dir) if previous is None else previous)
    for r in records:
        stages[r.stage] = asdict(r)
    path = Path(bundle_dir) / STAGE_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"description": "peak resident memory (RSS) and time of each stage, the last run of "
                                            "each (fastv_export/memory.py)", "stages": stages})
    return path
