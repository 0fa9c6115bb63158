"""Build a bundle's TensorRT engines and record them in its manifest (docs/design.md §4).

``build_engines(bundle, options)`` builds ``vision``, ``embed``, ``pre_k`` and ``post_k`` engines
with the profiles of :mod:`fastv_export.engines.profiles` (post-K over the pruned length n'),
writes them, the plugin library, the timing cache and ``build_engines.sh`` (the same builds as
``trtexec`` lines, for a device with its own TensorRT) into the bundle and records an ``engines``
section in ``manifest.json``. The bundle is replaced atomically: a failed build leaves it as it was.

Backends: ``tensorrt-rtx`` (TensorRT for RTX, ahead of time for the named compute capabilities,
no GPU needed) and ``tensorrt`` (TensorRT 10, a build for the GPU of the machine). Networks are
strongly typed: the engines' precision is the bundle's; fp32 bundles are built without TF32.
With the plugin, pre_k reaches the parser without TokenSelect's ONNX function body, so that only
the plugin can import the node (older TensorRT 10 parsers try a local function before plugins).
The timing cache is named by backend, version and GPU or targets (:mod:`.timing_cache`): a build
reuses only its own. The plugin library is not serialized into the engines (they are not built
version-compatible): a runtime loads ``libfastv_plugins.so`` from the bundle.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import onnx

from fastv_export.bundle import MANIFEST, Bundle, Engine, Engines, Manifest, Profile, load_bundle, write_manifest
from fastv_export.engines.profiles import BuildLimits, engine_profiles, kv_cache_bytes, lengths, trtexec_shape_flags
from fastv_export.engines.timing_cache import apply_timing_cache, cache_name, is_cache_name, serialized_timing_cache
from fastv_export.errors import FastVError
from fastv_export.files import atomic_directory, atomic_write_text, sha256
from fastv_export.graphs import op, spec
from fastv_export.quantize.schemes import check_backend, check_target, trtexec_guard

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "tensorrt-rtx")
ENGINE_SUFFIX = ".engine"
TIMING_CACHE = "timing.cache"        # the name before caches were named by backend and GPU (never reused)
#: the shell variable build_engines.sh names its timing cache with (TensorRT version and GPU of the device)
TRTEXEC_CACHE_VAR = "timing_cache"
TRTEXEC_SCRIPT = "build_engines.sh"
#: the layer type an IPluginV3 plugin becomes in a network
PLUGIN_LAYER = "PLUGIN_V3"


@dataclass(frozen=True)
class BuildOptions:
    backend: str | None = None                       # None: tensorrt if it imports, else tensorrt-rtx
    compute_capabilities: tuple[str, ...] = ("8.6", "8.9")   # tensorrt-rtx targets
    plugin_library: str | None = None                 # None: the library built from plugins/
    use_plugin: bool = True                           # False: TokenSelect's ONNX function body
    limits: BuildLimits = field(default_factory=BuildLimits)


def resolve_backend(name: str | None) -> str:
    """The backend to build with: ``name``, or TensorRT 10 when it imports, else TensorRT-RTX."""
    if name is not None and name not in BACKENDS:
        raise FastVError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name is None:
        name = "tensorrt" if importlib.util.find_spec("tensorrt") else "tensorrt-rtx"
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise FastVError("TensorRT 10 (Python package `tensorrt`) is not installed on this machine; install it "
                         "where the engines will run, or build ahead of time with --backend tensorrt-rtx")
    return name


def backend_version(backend: str) -> str:
    if backend == "tensorrt-rtx":
        from fastv_export.engines.trt_rtx import import_trt
        return import_trt().__version__
    import tensorrt
    return tensorrt.__version__


def target_names(compute_capabilities: Sequence[str]) -> list[str]:
    """"8.6", "86", "sm86" or "SM86" -> "SM86" (validated against what TensorRT-RTX offers); "current":
    the GPU of this machine."""
    from fastv_export.engines.trt_rtx import import_trt

    offered = [m for m in import_trt().ComputeCapability.__members__ if m.startswith("SM")]
    out = []
    for cc in compute_capabilities:
        if str(cc).strip().lower() == "current":       # this machine's GPU (needs one)
            out.append("CURRENT")
            continue
        key = "SM" + str(cc).upper().replace("SM", "").replace("_", "").replace(".", "").strip()
        if key not in offered:
            raise FastVError(f"compute capability {cc!r} is not one TensorRT-RTX builds for ahead of time; it offers "
                             f"{', '.join(o[2:-1] + '.' + o[-1] for o in offered)} (Jetson Orin 8.7, H100 9.0 and "
                             f"Thor 11.0 need TensorRT on the device: see --print-trtexec)")
        out.append(key)
    if not out:
        raise FastVError("--compute-capability names no target; give e.g. 8.6,8.9")
    return out


def default_plugin_library(targets: Sequence[str] = ()) -> Path:
    """The plugin library for the TensorRT ``targets`` ("SM86", ...; "CURRENT": this machine's GPU) when
    --plugin-lib is not given: the one packaged in this installation (a wheel built with nvcc) when it holds
    code for every target, else one built from this checkout's plugins/ by scripts/build_plugin.sh for those
    architectures (none or CURRENT: the script's default list). Neither: a one-line FastVError that offers
    --no-plugin and `fastv-export plugin build`."""
    import subprocess

    from fastv_export import packaged_plugin

    wanted = [gpu_target() or t if t == "CURRENT" else t for t in targets]
    packaged = packaged_plugin.packaged_library()
    missing: list[str] = []
    if packaged is not None:
        missing = packaged_plugin.missing_targets(packaged_plugin.fatbin_archs(packaged), wanted)
        if not missing:
            log.info("TokenSelect plugin: %s (packaged)", packaged)
            return packaged
    root = packaged_plugin.checkout_root()
    if root is None:
        archs = ",".join(t[2:] for t in (missing or wanted) if t.startswith("SM")) or "<your GPU, e.g. 87>"
        why = (f"the packaged TokenSelect plugin holds no code for {', '.join(missing)} "
               f"({packaged_plugin.fatbin_archs(packaged).describe()})" if packaged is not None else
               f"no TokenSelect plugin library: {packaged_plugin.no_plugin_reason()}")
        raise FastVError(f"{why}; pass --no-plugin to build TokenSelect's ONNX function body instead, or build the "
                         f"plugin with `fastv-export plugin build --archs {archs}` (needs CUDA's nvcc) and pass "
                         "--plugin-lib PATH")
    script = root / packaged_plugin.BUILD_SCRIPT
    log.info("building the TokenSelect plugin with %s", script)
    archs = [t[2:] for t in targets if t.startswith("SM")]
    cmd = ["bash", str(script)] + (["--archs", ";".join(archs)] if archs and len(archs) == len(targets) else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FastVError(f"building the plugin library failed ({tail[0]}); build it with scripts/build_plugin.sh "
                         "and pass --plugin-lib, or use --no-plugin")
    return Path(proc.stdout.strip().splitlines()[-1])


def without_function_body(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without TokenSelect's ONNX local function: the parser can then import the node only
    through the plugin (onnx-tensorrt before 10.x tries a local function before the plugin registry,
    and would expand the body although the plugin is loaded)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [f for f in out.functions if not (f.domain == op.OP_DOMAIN and f.name == op.OP_TYPE)]
    del out.functions[:]
    out.functions.extend(keep)
    return out


def model_for_parser(model: onnx.ModelProto, use_plugin: bool) -> onnx.ModelProto:
    """What a graph hands TensorRT's parser: with the plugin, TokenSelect without its function body;
    without, TokenSelect without the plugin attributes (its function body is expanded)."""
    return without_function_body(model) if use_plugin else without_plugin_attributes(model)


def without_plugin_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose TokenSelect node carries no ``plugin_namespace``/``plugin_version``: TensorRT's
    parser then expands the node's ONNX function body even when the plugin is registered."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == op.OP_DOMAIN and node.op_type == op.OP_TYPE:
            keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
            del node.attribute[:]
            node.attribute.extend(keep)
    return out


# ---------------------------------------------------------------------------------------------- trtexec
def trtexec_lines(manifest: Manifest, limits: BuildLimits, use_plugin: bool = True) -> list[str]:
    """``trtexec`` command lines that build the same engines with TensorRT 10 on the target device
    (Jetson builds on the device: engines are not portable across GPUs or TensorRT versions).
    fp32 bundles get ``--noTF32``. The plugin is loaded (``--dynamicPlugins``), not serialized into the
    engine: TensorRT serializes plugin libraries only into version-compatible engines, which these are
    not. The timing cache file is ``$timing_cache``, set by :func:`trtexec_script` from the device's
    TensorRT version and GPU."""
    profiles = engine_profiles(manifest, limits)
    lines = []
    for graph in spec.GRAPHS:
        args = ["trtexec", f"--onnx={graph}.onnx", f"--saveEngine={graph}{ENGINE_SUFFIX}", "--stronglyTyped"]
        if manifest.precision == "fp32":
            args.append("--noTF32")
        args += trtexec_shape_flags(profiles[graph])
        if graph == "pre_k" and use_plugin:
            args.append(f"--dynamicPlugins={op.PLUGIN_LIBRARY}")
        lines.append(" ".join([shlex.quote(a) for a in args] + [f'"--timingCacheFile=${TRTEXEC_CACHE_VAR}"']))
    return lines


def trtexec_script(manifest: Manifest, limits: BuildLimits, use_plugin: bool = True) -> str:
    head = ["#!/usr/bin/env bash",
            "# Build this bundle's engines with TensorRT 10's trtexec on the device that will run them",
            "# (Jetson Orin/Thor: build on the device; engines are not portable across GPUs or TensorRT versions).",
            f"# Limits: {json.dumps(limits.to_dict())}; post_k is built for the pruned length.",
            "set -euo pipefail", 'cd "$(dirname "$0")"']
    if use_plugin:
        head.append(f"# needs {op.PLUGIN_LIBRARY} here, built for this GPU (plugins/ of fastv-export); it is loaded,")
        head.append("# not serialized into pre_k.engine: whatever runs the engine loads it too")
    head += ["# The timing cache is named by this TensorRT version and GPU: a cache of another is never reused.",
             "trt_version=$( (trtexec --help 2>&1 || true) | grep -o -m1 'TensorRT v[0-9]*' | cut -d' ' -f2 || true)",
             "gpu=$( (nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null || true) | head -n1)",
             "if [ -z \"$gpu\" ] && [ -r /proc/device-tree/model ]; then   # Jetson: no nvidia-smi",
             "  gpu=$(tr -d '\\0' < /proc/device-tree/model)",
             "fi",
             f'{TRTEXEC_CACHE_VAR}="timing.tensorrt-${{trt_version:-unknown}}-'
             "$(printf '%s' \"${gpu:-unknown-gpu}\" | tr -cs 'A-Za-z0-9.+-' '_').cache\"",
             'case "$timing_cache" in *unknown*) rm -f "$timing_cache" ;; esac   # unnamed: never reused']
    head += trtexec_guard(manifest.quantization_scheme)    # a quantized bundle: the GPU's compute capability
    return "\n".join(head + trtexec_lines(manifest, limits, use_plugin)) + "\n"


# ---------------------------------------------------------------------------------------------- build
@dataclass
class BuiltEngine:
    """One engine as a backend built it, written to its file."""
    sha256: str                 # of the file, as written
    bytes: int
    layer_types: list[str]
    timing_cache: bytes
    #: device memory for activations (TensorRT's device_memory_size_v2) when the engine could be
    #: deserialized here (a full TensorRT build, on its GPU); None for ahead-of-time builds without a GPU
    activation_bytes: int | None = None
    #: whether the plugin library was serialized into the engine (only version-compatible engines)
    plugin_serialized: bool = False


_trt10_plugins: dict[str, object] = {}


def load_plugin_library(backend: str, path: str | os.PathLike):
    """Register the plugin library in ``backend``'s plugin registry once per process (a second load of
    the same file would register its creators twice); returns the library handle."""
    if backend == "tensorrt-rtx":
        from fastv_export.engines import trt_rtx
        return trt_rtx.load_plugin_library(path)
    import tensorrt as trt

    real = os.path.realpath(path)
    if real not in _trt10_plugins:
        handle = trt.get_plugin_registry().load_library(real)
        if handle is None:
            raise FastVError(f"TensorRT could not load the plugin library {path} (not a plugin library, or built "
                             "for another TensorRT)")
        _trt10_plugins[real] = handle
    return _trt10_plugins[real]


def _load_graph(path: Path) -> onnx.ModelProto:
    """A bundle graph with its weights (external data included), or one line saying why not."""
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for one user problem
        what = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise FastVError(f"{path} could not be loaded for the engine build ({what}); re-export the bundle") from None


def _build_rtx(onnx_path: Path, profiles: list[dict], targets: list[str], plugin: Path | None,
               timing_cache: bytes, precision: str, out: Path) -> BuiltEngine:
    """TensorRT-RTX ahead of time, the engine written to ``out``; the graph's weights are held once (the parser
    reads them in place, the engine streams to the file: :func:`trt_rtx.build_engine_to_file`)."""
    from fastv_export.engines import trt_rtx

    kwargs = dict(transform=lambda m: model_for_parser(m, plugin is not None), compute_capabilities=targets,
                  profiles=profiles or None, timing_cache=timing_cache, min_severity="WARNING",
                  tf32=precision != "fp32")
    if plugin is None:
        built = trt_rtx.build_engine_to_file(onnx_path, out, **kwargs)
    else:   # registered for this build only (unless the caller had loaded it already)
        with trt_rtx.plugin_library(plugin):
            built = trt_rtx.build_engine_to_file(onnx_path, out, **kwargs)
    return BuiltEngine(built.sha256, built.bytes, built.layer_types, built.timing_cache)


def _lean_trt10(parser, builder) -> bool:
    """Whether this TensorRT 10 takes a weight-less graph with its weights in place (load_model_proto,
    load_initializer: 10.x) and streams the engine to a writer (build_serialized_network_to_stream)."""
    return all(hasattr(parser, a) for a in ("load_model_proto", "load_initializer", "parse_model_proto")) and \
        hasattr(builder, "build_serialized_network_to_stream")


def _build_trt10(onnx_path: Path, profiles: list[dict], plugin: Path | None,
                 timing_cache: bytes, precision: str, out: Path) -> BuiltEngine:
    """TensorRT 10 on this machine's GPU, the engine written to ``out`` (CI drives it with a stand-in TensorRT
    module: no GPU there). Where this TensorRT offers them, the weights are held once as in :func:`_build_rtx`;
    else the graph is parsed from its serialized model and the engine returned whole, as before."""
    import contextlib
    import mmap

    import tensorrt as trt

    from fastv_export.engines import graph_weights
    from fastv_export.files import atomic_write

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugin is not None:
        load_plugin_library("tensorrt", plugin)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    lean = _lean_trt10(parser, builder)
    with contextlib.ExitStack() as stack:
        if lean:
            model = model_for_parser(graph_weights.skeleton(onnx_path), plugin is not None)
            refs = graph_weights.weight_refs(model, onnx_path)
            weights = stack.enter_context(graph_weights.MappedWeights(refs))
            ok = parser.load_model_proto(model.SerializeToString(), str(onnx_path))
            for ref in refs if ok else ():
                ok = ok and (ref.length == 0 or parser.load_initializer(ref.name, weights.address(ref), ref.length))
            ok = ok and parser.parse_model_proto()
        else:
            ok = parser.parse(model_for_parser(_load_graph(onnx_path), plugin is not None).SerializeToString())
        if not ok:
            errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
            raise FastVError(f"TensorRT could not parse {onnx_path.name}: {errors or 'no error was reported'}")
        config = builder.create_builder_config()
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        apply_timing_cache(config, timing_cache)
        # TensorRT serializes plugin libraries only into version-compatible engines
        serialize_plugin = plugin is not None and config.get_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if serialize_plugin:
            config.plugins_to_serialize = [str(plugin)]
        for prof in profiles:
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in prof.items():
                p.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(p)
        written: list[graph_weights.WrittenStream] = []

        def write(f) -> None:
            if lean:
                writer = graph_weights.stream_writer(trt, f)
                with weights.dropping():
                    ok = builder.build_serialized_network_to_stream(network, config, writer)
                if writer.result.error is not None:
                    raise FastVError(f"the engine could not be written to {out} ({writer.result.error})")
                if not ok or writer.result.bytes == 0:
                    raise FastVError(f"TensorRT could not build {onnx_path.name}")
                written.append(writer.result)
                return
            engine = builder.build_serialized_network(network, config)
            if engine is None:
                raise FastVError(f"TensorRT could not build {onnx_path.name}")
            data = memoryview(engine)
            f.write(data)
            written.append(graph_weights.WrittenStream(len(data), hashlib.sha256(data).hexdigest()))

        atomic_write(out, write)
        layers = [str(network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(network.num_layers)]
        cache = serialized_timing_cache(config)
        parser = network = builder = config = None     # released before the weights' maps close
    activation = None
    with open(out, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
        loaded = trt.Runtime(logger).deserialize_cuda_engine(plan)     # on this GPU: the activation memory
        if loaded is not None:
            activation = int(getattr(loaded, "device_memory_size_v2", None) or loaded.device_memory_size)
        del loaded
    return BuiltEngine(written[0].sha256, written[0].bytes, layers, cache, activation, bool(serialize_plugin))


def _copy_bundle(bundle: Bundle, dst: Path) -> dict[str, dict]:
    """Every file of the bundle but its previous engines, hard-linked where possible, and its validation
    reports; returns the verified checksums of the copied files the manifest lists."""
    listed = bundle.files
    for f in bundle.path.iterdir():
        if f.is_dir() or f.name.endswith(ENGINE_SUFFIX) or is_cache_name(f.name) or f.name in (
                TRTEXEC_SCRIPT, op.PLUGIN_LIBRARY, MANIFEST):
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    if (bundle.path / "validation").is_dir():
        shutil.copytree(bundle.path / "validation", dst / "validation")
    return {name: entry for name, entry in listed.items() if (dst / name).is_file()}


def check_quantized_support(bundle: Bundle, backend: str, version: str, gpu: str | None) -> None:
    """FastVError in one line when ``backend`` ``version`` cannot build the bundle's quantized weights, or (TensorRT
    10) this ``gpu`` ("SM87-...") has no float8 for fp8 weights (fastv_export/quantize/schemes.py)."""
    check_backend(bundle.quantization_scheme, backend, version)
    if backend == "tensorrt" and gpu and gpu.startswith("SM") and bundle.quantization_scheme == "fp8":
        check_target(bundle.quantization_scheme, [gpu.split("-", 1)[0]])


def build_engines(bundle: Bundle | str | Path, options: BuildOptions = BuildOptions(),
                  progress: Callable[[str], None] | None = None) -> Bundle:
    """Build the engines of ``bundle`` (a verified :class:`Bundle`, or a directory, verified here) and
    record them in its manifest; returns the rebuilt bundle (its ``engines``: the new section).
    ``progress(graph)`` is called as each engine's build starts (after every input was checked)."""
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    backend = resolve_backend(options.backend)
    version = backend_version(backend)
    targets = target_names(options.compute_capabilities) if backend == "tensorrt-rtx" else ["CURRENT"]
    profiles = engine_profiles(bundle, options.limits)        # validates the limits first
    plugin = None
    if options.use_plugin:
        plugin = Path(options.plugin_library) if options.plugin_library else default_plugin_library(targets)
        if not plugin.is_file():
            raise FastVError(f"plugin library {plugin} does not exist: build it with scripts/build_plugin.sh, "
                             "or pass --no-plugin to build TokenSelect's ONNX function body")
    gpu = current_gpu() if backend == "tensorrt" else None
    check_quantized_support(bundle, backend, version, gpu)
    cache_key = targets if backend == "tensorrt-rtx" else [gpu or "unknown-gpu"]
    cache_file_name = cache_name(backend, version, cache_key)
    cache_file = bundle.path / cache_file_name
    # only a cache of this backend, version and GPU or targets; none when the GPU cannot be named
    reuse = cache_file.is_file() and (backend == "tensorrt-rtx" or gpu is not None)
    cache = cache_file.read_bytes() if reuse else b""
    if reuse:
        log.info("reusing the timing cache %s", cache_file)
    serialized = False
    engines: dict[str, Engine] = {}
    with atomic_directory(bundle.path, force=True) as tmp:
        for graph in spec.GRAPHS:
            if progress:
                progress(graph)
            start = time.perf_counter()
            graph_plugin = plugin if graph == "pre_k" else None
            profs = list(profiles[graph].values())
            name = f"{graph}{ENGINE_SUFFIX}"
            if backend == "tensorrt-rtx":
                built = _build_rtx(bundle.file(graph), profs, targets, graph_plugin, cache, bundle.precision,
                                   tmp / name)
            else:
                built = _build_trt10(bundle.file(graph), profs, graph_plugin, cache, bundle.precision, tmp / name)
            layers, cache = built.layer_types, built.timing_cache
            serialized = serialized or built.plugin_serialized
            n_plugin = layers.count(PLUGIN_LAYER)
            if graph == "pre_k" and n_plugin != (1 if plugin else 0):
                raise FastVError(f"pre_k's engine has {n_plugin} {PLUGIN_LAYER} layers, expected "
                                 f"{1 if plugin else 0}: " + ("the plugin library did not provide TokenSelect "
                                                             f"({plugin})" if plugin else "the function body was "
                                                             "not expanded"))
            engines[graph] = Engine(
                file=name, sha256=built.sha256, bytes=built.bytes,
                profiles=[Profile(p, dict(shapes)) for p, shapes in profiles[graph].items()],
                kv_cache_bytes_at_max=kv_cache_bytes(bundle, options.limits, graph),
                activation_bytes=built.activation_bytes, layers=len(layers), plugin_layers=n_plugin,
                build_seconds=round(time.perf_counter() - start, 3))
        (tmp / cache_file_name).write_bytes(cache)
        # after the builds: a graph's external data must not be hard-linked while onnx reads it
        copied = _copy_bundle(bundle, tmp)
        plugin_entry = None
        if plugin is not None:
            shutil.copy2(plugin, tmp / op.PLUGIN_LIBRARY)
            plugin_entry = dict(op.PLUGIN_IDENTITY, sha256=sha256(tmp / op.PLUGIN_LIBRARY),
                                serialized_in_engine=serialized)
        atomic_write_text(tmp / TRTEXEC_SCRIPT, trtexec_script(bundle, options.limits, plugin is not None))
        section = Engines(
            backend=backend, backend_version=version, targets=targets, precision=bundle.precision, strongly_typed=True,
            token_select="plugin" if plugin is not None else "onnx_function_body", plugin=plugin_entry,
            limits=options.limits.to_dict(),
            lengths=lengths(bundle, options.limits),
            timing_cache=cache_file_name, trtexec_script=TRTEXEC_SCRIPT, engines=engines)
        known = dict(copied, **{e.file: {"sha256": e.sha256, "bytes": e.bytes} for e in engines.values()})
        if plugin_entry is not None:
            known[op.PLUGIN_LIBRARY] = {"sha256": plugin_entry["sha256"],
                                        "bytes": (tmp / op.PLUGIN_LIBRARY).stat().st_size}
        manifest = write_manifest(tmp, bundle.with_engines(section), known=known)   # hashes only what is new
    log.info("engines written into %s", bundle.path)
    return Bundle(bundle.path, manifest)


# ---------------------------------------------------------------------------------------------- checks
def check_engines(bundle: Bundle) -> None:
    """Refuse engines that this machine cannot use, with one line: a backend version other than the
    installed one, or a GPU that is not among the targets. (Checksums of the engines and the plugin
    library were verified by load_bundle.)"""
    section = bundle.engines
    where = f"{bundle.path}/{MANIFEST}"
    if section is None:
        raise FastVError(f"{where} records no engines: build them with `fastv-export build {bundle.path}`")
    backend = section.backend
    try:
        installed = backend_version(backend)
    except FastVError as exc:
        raise FastVError(f"{where}: the engines were built with {backend} {section.backend_version}, which "
                         f"is not installed here ({exc})") from None
    if installed != section.backend_version:
        raise FastVError(f"{where}: the engines were built with {backend} {section.backend_version}, this machine "
                         f"has {installed}; rebuild them with `fastv-export build {bundle.path}`")
    gpu = gpu_target()
    if gpu is not None and "CURRENT" not in section.targets and gpu not in section.targets:
        raise FastVError(f"{where}: the engines target {', '.join(section.targets)}, this GPU is {gpu}; rebuild "
                         f"with --compute-capability {gpu[2:-1]}.{gpu[-1]}")


def current_gpu() -> str | None:
    """This machine's first GPU as ``SM<major><minor>-<name>`` (what a TensorRT 10 timing cache is
    named by); None without one or without torch.cuda."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return f"SM{major}{minor}-{torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - no usable CUDA: the GPU cannot be named
        return None


def gpu_target() -> str | None:
    """SM<major><minor> of this machine's first GPU (None without one or without torch.cuda)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return f"SM{major}{minor}"
    except Exception:  # noqa: BLE001 - no usable CUDA: nothing to check
        return None


def format_summary(section: Engines) -> str:
    """A table of the engines: file size, KV and activation bytes at the maxima, build time."""
    lines = [f"engines: {section.backend} {section.backend_version}, targets {', '.join(section.targets)}, "
             f"{section.precision}, TokenSelect as {section.token_select.replace('_', ' ')}",
             f"lengths: prompt n={section.lengths.prompt} ({section.lengths.image_tokens} image tokens), "
             f"post-K n'={section.lengths.kept}, new tokens {section.lengths.new_tokens}",
             f"{'engine':>8} {'MiB':>8} {'layers':>7} {'plugin':>6} {'KV MiB at max':>14} {'act. MiB':>9} {'build s':>8}"]
    for graph, e in section.engines.items():
        act = e.activation_bytes
        lines.append(f"{graph:>8} {e.bytes / 2**20:>8.2f} {e.layers:>7} {e.plugin_layers:>6} "
                     f"{e.kv_cache_bytes_at_max / 2**20:>14.3f} "
                     f"{'n/a' if act is None else f'{act / 2**20:.3f}':>9} {e.build_seconds:>8.2f}")
    total = sum(e.bytes for e in section.engines.values())
    secs = sum(e.build_seconds for e in section.engines.values())
    lines.append(f"{'total':>8} {total / 2**20:>8.2f} {'':>7} {'':>6} {'':>14} {'':>9} {secs:>8.2f}")
    if any(e.activation_bytes is None for e in section.engines.values()):
        lines.append("act. MiB n/a: ahead-of-time builds cannot measure activation memory without the target GPU")
    return "\n".join(lines)
