"""TensorRT-RTX from Python: import the bindings, load plugin libraries, parse ONNX, build engines ahead of
time (AOT) for named GPU targets. AOT builds need no GPU, so CPU machines can check that a graph (plugin
layers included) converts, which layers it becomes and which output shapes TensorRT derives.

- :func:`import_trt` returns the ``tensorrt_rtx_bindings`` module, after making sure that the wheel's
  ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` link exists (without it the ONNX parser aborts the process
  when it creates a plugin; see ``docs/design.md`` §4).
- :func:`load_plugin_library` / :func:`unload_plugin_library` / :func:`plugin_library` register a plugin
  library (e.g. ``libfastv_plugins.so``) in TensorRT's global plugin registry, once per process.
- :func:`parse_onnx` parses a model into a network and reports its layer types and output shapes.
- :func:`build_engine_aot` builds a serialized engine for ``compute_capabilities`` and returns
  ``(engine bytes, layer types, log messages)``; failures raise :class:`TrtBuildError` carrying the log.
- :func:`build_engine_to_file` builds a graph file's engine into a file holding the weights once (the parser
  reads them in place, the engine streams to the file: :mod:`fastv_export.engines.graph_weights`).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, NamedTuple, Sequence, Union

import onnx

from fastv_export.engines.timing_cache import apply_timing_cache, serialized_timing_cache
from fastv_export.errors import FastVError

if TYPE_CHECKING:
    from fastv_export.engines import graph_weights

TRT_RTX_VERSION = "1.7.1.116"
TRT_RTX_PACKAGES = (f"tensorrt-rtx-cu13-libs=={TRT_RTX_VERSION}", f"tensorrt-rtx-cu13-bindings=={TRT_RTX_VERSION}")
INSTALL_HINT = ("install TensorRT-RTX with `pip install 'fastv-export[trt]'` (or `pip install "
                + " ".join(TRT_RTX_PACKAGES) + "`)")
LIB_NAME = "libtensorrt_rtx.so"
DEFAULT_TARGETS = ("SM86", "SM89")

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]
# one optimization profile: input name -> (min, opt, max) shapes
Profile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


class LogMessage(NamedTuple):
    severity: str  # INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE
    message: str
    source: str = "trt"  # "trt": TensorRT's logger; "stderr": a line written to stderr during the call


class AotBuild(NamedTuple):
    engine: bytes
    layer_types: list[str]
    messages: list[LogMessage]
    timing_cache: bytes = b""      # the builder's timing cache after the build (when one was given)


class TrtBuildError(FastVError):
    """Parsing or building failed; ``messages`` holds everything logged (``str``: plugin errors, then TensorRT's)."""

    def __init__(self, what: str, messages: Sequence[LogMessage]):
        errors = [m for m in messages if m.severity in ("ERROR", "INTERNAL_ERROR")]
        # plugin messages (captured from stderr) name the problem; TensorRT's own say where it surfaced
        first = [m.message for m in errors if m.source == "stderr"][:3]
        rest = [m.message for m in errors if m.source != "stderr"][-4:]
        detail = "; ".join(first + rest) if errors else "no error message was logged"
        super().__init__(f"{what}: {detail}")
        self.messages = list(messages)


# ---------------------------------------------------------------------------------------------- import
def _libs_dir() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_unversioned_library_link(libs_dir: Path | None = None) -> Path:
    """Make ``libtensorrt_rtx.so`` (a link to ``libtensorrt_rtx.so.1``) exist in the installed
    ``tensorrt_rtx_libs`` folder; returns the link. Raises FastVError when it cannot be created."""
    libs_dir = libs_dir or _libs_dir()
    if libs_dir is None:
        raise FastVError(f"TensorRT-RTX libraries (module tensorrt_rtx_libs) are not installed: {INSTALL_HINT}")
    target = libs_dir / f"{LIB_NAME}.1"
    link = libs_dir / LIB_NAME
    if not target.is_file():
        raise FastVError(f"{target} is missing: the TensorRT-RTX libraries are incomplete; reinstall them "
                         f"({INSTALL_HINT})")
    if link.exists():                                   # a file or a working link
        return link
    try:
        if link.is_symlink():                           # dangling
            link.unlink()
        os.symlink(target.name, link)
    except FileExistsError:                             # created concurrently
        pass
    except OSError as e:
        raise FastVError(
            f"cannot create the link {link} -> {target.name} ({e}); TensorRT-RTX's ONNX parser needs it to "
            f"create plugin layers. Create it by hand (ln -s {target.name} {link}), or put a folder holding such "
            f"a link on LD_LIBRARY_PATH before starting Python") from e
    if not link.exists():
        raise FastVError(f"the link {link} -> {target.name} does not resolve; create it by hand")
    return link


@functools.lru_cache(maxsize=None)
def import_trt():
    """The ``tensorrt_rtx_bindings`` module (same API as TensorRT 10), ready to create plugin layers."""
    if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        raise FastVError(f"TensorRT-RTX Python bindings (module tensorrt_rtx_bindings) are not installed: "
                         f"{INSTALL_HINT}")
    ensure_unversioned_library_link()
    try:
        import tensorrt_rtx_bindings as trt
    except ImportError as e:
        raise FastVError(f"TensorRT-RTX Python bindings failed to import ({e}): {INSTALL_HINT}") from e
    return trt


# ---------------------------------------------------------------------------------------------- logging
# TensorRT-RTX keeps ONE process-wide logger while any builder exists ("The logger passed into
# createInferBuilder differs from one already registered ... the current new logger is ignored"), so every
# builder and parser here shares one capturing logger, and each call collects what arrives while it runs.
_SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


class _Sink:
    def __init__(self, messages: list[LogMessage], min_severity: str):
        if min_severity not in _SEVERITIES:
            raise ValueError(f"min_severity must be one of {_SEVERITIES}, got {min_severity!r}")
        self.messages = messages
        self.min_level = _SEVERITIES.index(min_severity)


@functools.lru_cache(maxsize=None)
def shared_logger():
    """The process-wide TensorRT logger of this module (a trt.ILogger that forwards to active captures)."""
    trt = import_trt()

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.sinks: list[_Sink] = []
            self.lock = threading.RLock()

        def log(self, severity, msg):
            name = str(severity).rsplit(".", 1)[-1]
            level = _SEVERITIES.index(name) if name in _SEVERITIES else len(_SEVERITIES)
            with self.lock:
                for sink in self.sinks:
                    if level <= sink.min_level:
                        sink.messages.append(LogMessage(name, str(msg)))

    return CapturingLogger()


@contextlib.contextmanager
def capture_messages(messages: list[LogMessage], min_severity: str = "INFO", *,
                     stderr: bool = True) -> Iterator[list[LogMessage]]:
    """Append what TensorRT logs (at ``min_severity`` or above) and, with ``stderr``, the lines written to
    file descriptor 2, to ``messages`` while the block runs."""
    logger = shared_logger()
    sink = _Sink(messages, min_severity)
    with logger.lock:
        logger.sinks.append(sink)
    try:
        with _captured_stderr(messages, stderr):
            yield messages
    finally:
        with logger.lock:
            logger.sinks.remove(sink)


# ---------------------------------------------------------------------------------------------- stderr
# Plugin libraries log through the logger that TensorRT's ILoggerFinder offers; TensorRT-RTX 1.7's finder
# offers none, so libfastv_plugins.so then writes "[fastv] SEVERITY: message" lines to stderr. Parsing and
# building capture file descriptor 2 and turn such lines into LogMessages (source "stderr").
_STDERR_LINE = re.compile(r"^\[(?P<tag>[\w.-]+)\] (?P<sev>INTERNAL_ERROR|ERROR|WARNING|INFO|VERBOSE): (?P<msg>.*)$")
_fd_lock = threading.Lock()


@contextlib.contextmanager
def _captured_stderr(sink: list[LogMessage], enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    with _fd_lock, tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            for line in text.splitlines():
                if not line.strip():
                    continue
                m = _STDERR_LINE.match(line)
                sink.append(LogMessage(m["sev"], m["msg"], "stderr") if m else LogMessage("INFO", line, "stderr"))
            if text:                                   # pass it on, the caller's stderr still shows it
                os.write(2, text.encode())


# ---------------------------------------------------------------------------------------------- plugins
_plugin_handles: dict[str, object] = {}
_plugin_pins: dict[str, ctypes.CDLL] = {}
_plugin_lock = threading.Lock()


def load_plugin_library(path: str | os.PathLike):
    """Register the plugin library at ``path`` in TensorRT-RTX's plugin registry (once per process; a second
    call for the same file is a no-op). Returns the library handle."""
    trt = import_trt()
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise FastVError(f"plugin library {path} does not exist: build it with scripts/build_plugin.sh")
    with _plugin_lock:
        if real in _plugin_handles:
            return _plugin_handles[real]
        # Pin the library with an extra dlopen reference: deregistering dlcloses TensorRT's reference, and
        # networks or builders created meanwhile still hold plugin objects whose code must stay mapped.
        if real not in _plugin_pins:
            try:
                _plugin_pins[real] = ctypes.CDLL(real, mode=os.RTLD_NOW | os.RTLD_LOCAL)
            except OSError as e:
                raise FastVError(f"cannot load the plugin library {path}: {e}") from e
        handle = trt.get_plugin_registry().load_library(real)
        if handle is None:
            raise FastVError(f"TensorRT-RTX could not load the plugin library {path} (not a plugin library, built "
                             f"for another TensorRT, or its plugins are already registered)")
        _plugin_handles[real] = handle
        return handle


def unload_plugin_library(path: str | os.PathLike) -> bool:
    """Deregister a library loaded by :func:`load_plugin_library` (its creators leave the registry; its code
    stays mapped for objects that still use it); False when it was not loaded."""
    trt = import_trt()
    real = os.path.realpath(path)
    with _plugin_lock:
        handle = _plugin_handles.pop(real, None)
        if handle is None:
            return False
        trt.get_plugin_registry().deregister_library(handle)
        return True


@contextlib.contextmanager
def plugin_library(path: str | os.PathLike) -> Iterator[object]:
    """Load a plugin library for the duration of a ``with`` block (unloads it only if this block loaded it)."""
    real = os.path.realpath(path)
    was_loaded = real in _plugin_handles
    handle = load_plugin_library(real)
    try:
        yield handle
    finally:
        if not was_loaded:
            unload_plugin_library(real)


def registered_plugins() -> list[tuple[str, str, str]]:
    """(name, version, namespace) of every creator in the plugin registry."""
    trt = import_trt()
    return [(c.name, c.plugin_version, c.plugin_namespace) for c in trt.get_plugin_registry().all_creators]


# ---------------------------------------------------------------------------------------------- parsing
def _model_bytes(model: ModelLike) -> tuple[bytes, str | None]:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), None
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), None
    path = Path(model)
    if not path.is_file():
        raise FastVError(f"ONNX file {path} does not exist")
    return path.read_bytes(), str(path)


@dataclass
class ParsedNetwork:
    """A parsed network; keeps builder, network and parser alive together."""

    builder: object
    network: object
    parser: object
    min_severity: str = "INFO"
    messages: list[LogMessage] = field(default_factory=list)

    @property
    def layer_types(self) -> list[str]:
        return [str(self.network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(self.network.num_layers)]

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output name -> shape as TensorRT derived it (-1 for dimensions that depend on runtime shapes)."""
        outs = (self.network.get_output(i) for i in range(self.network.num_outputs))
        return {t.name: tuple(t.shape) for t in outs}

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        ins = (self.network.get_input(i) for i in range(self.network.num_inputs))
        return {t.name: tuple(t.shape) for t in ins}


def parse_onnx(model: ModelLike, *, plugin_library: str | os.PathLike | None = None, min_severity: str = "INFO",
               capture_stderr: bool = True) -> ParsedNetwork:
    """Parse an ONNX model (path, bytes or ModelProto) into a TensorRT-RTX network (strongly typed, as every
    TensorRT-RTX network is). With ``plugin_library`` that library is loaded first, so nodes carrying
    ``plugin_namespace`` become plugin layers. Raises TrtBuildError when parsing fails.

    ``messages`` of the result: what TensorRT logged at ``min_severity`` or above and, with
    ``capture_stderr``, the lines written to stderr meanwhile (plugin messages, see above)."""
    trt = import_trt()
    if plugin_library is not None:
        load_plugin_library(plugin_library)
    data, path = _model_bytes(model)
    messages: list[LogMessage] = []
    logger = shared_logger()
    with capture_messages(messages, min_severity, stderr=capture_stderr):
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse(data, path) if path else parser.parse(data)
    if not ok:
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            messages.append(LogMessage("ERROR", f"ONNX parser: {err.desc()} (node {err.node()} {err.node_name()!r}, "
                                                f"op {err.node_operator()!r})"))
        raise TrtBuildError("TensorRT-RTX could not parse the ONNX model", messages)
    return ParsedNetwork(builder, network, parser, min_severity, messages)


def _compute_capability(trt, name: str):
    members = trt.ComputeCapability.__members__
    key = name.upper().replace("SM_", "SM")
    if key not in members:
        offered = ", ".join(m for m in members if m.startswith("SM"))
        raise FastVError(f"TensorRT-RTX cannot build ahead of time for {name!r}; it offers {offered}")
    return members[key]


def _check_targets(trt, compute_capabilities: Sequence[str]) -> list:
    if not compute_capabilities:
        raise FastVError("name at least one compute capability to build for (e.g. SM86)")
    return [_compute_capability(trt, c) for c in compute_capabilities]


def build_engine_aot(model: ModelLike, *, plugin_library: str | os.PathLike | None = None,
                     compute_capabilities: Sequence[str] = DEFAULT_TARGETS, profiles: Sequence[Profile] | None = None,
                     workspace_bytes: int | None = None, min_severity: str = "INFO",
                     parsed: ParsedNetwork | None = None, capture_stderr: bool = True,
                     timing_cache: bytes | None = None, tf32: bool | None = None) -> AotBuild:
    """Build a serialized TensorRT-RTX engine ahead of time for ``compute_capabilities`` (no GPU needed).

    ``profiles``: optimization profiles, each {input name: (min, opt, max)}; required when the model has
    dynamic input dimensions. Returns AotBuild(engine bytes, layer types, log messages); raises
    TrtBuildError (a FastVError) with TensorRT's messages when parsing or building fails. ``parsed``: a
    network from :func:`parse_onnx` to build instead of parsing ``model`` again. ``timing_cache``: a
    serialized timing cache to start from (``b""`` for a new one); the result carries it updated.
    ``tf32``: False clears the builder's TF32 flag (on by default: fp32 matrix products in TF32 on Ampere
    and later), True sets it, None leaves the builder's default.
    """
    trt = import_trt()
    _check_targets(trt, compute_capabilities)
    net = parsed or parse_onnx(model, plugin_library=plugin_library, min_severity=min_severity,
                               capture_stderr=capture_stderr)
    config = _aot_config(trt, net, compute_capabilities, profiles, workspace_bytes, timing_cache, tf32)
    with capture_messages(net.messages, net.min_severity, stderr=capture_stderr):
        serialized = net.builder.build_serialized_network(net.network, config)
    if serialized is None:
        raise TrtBuildError(f"TensorRT-RTX could not build the engine for {', '.join(compute_capabilities)}",
                            net.messages)
    cache = b"" if timing_cache is None else serialized_timing_cache(config)
    return AotBuild(bytes(serialized), net.layer_types, list(net.messages), cache)


def _aot_config(trt, net: ParsedNetwork, compute_capabilities: Sequence[str], profiles: Sequence[Profile] | None,
                workspace_bytes: int | None, timing_cache: bytes | None, tf32: bool | None):
    """The builder config of an ahead-of-time build: targets, workspace, TF32, timing cache, profiles."""
    targets = _check_targets(trt, compute_capabilities)
    config = net.builder.create_builder_config()
    config.num_compute_capabilities = len(targets)
    for i, cc in enumerate(targets):
        config.set_compute_capability(cc, i)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if tf32 is not None and hasattr(trt.BuilderFlag, "TF32"):
        (config.set_flag if tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    if timing_cache is not None:
        apply_timing_cache(config, timing_cache)
    dynamic = [n for n, s in net.input_shapes.items() if any(d < 0 for d in s)]
    if dynamic and not profiles:
        raise FastVError(f"inputs {', '.join(dynamic)} have dynamic dimensions: pass profiles=[{{name: (min, opt, "
                         f"max)}}] covering them")
    for prof in profiles or ():
        p = net.builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            if name not in net.input_shapes:
                raise FastVError(f"profile names {name!r}, which is not an input ({', '.join(net.input_shapes)})")
            p.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(p)
    return config


# ---------------------------------------------------------------------------------------------- lean builds
class FileBuild(NamedTuple):
    """An engine built into a file: its ``sha256`` and ``bytes`` as written."""
    sha256: str
    bytes: int
    layer_types: list[str]
    messages: list[LogMessage]
    timing_cache: bytes = b""


def parse_into(trt, net: ParsedNetwork, onnx_path: str | os.PathLike, weights: "graph_weights.MappedWeights",
               model: onnx.ModelProto, refs: Sequence["graph_weights.WeightRef"]) -> None:
    """Hand ``net``'s parser the weight-less ``model`` (the skeleton of ``onnx_path``) and each initializer of
    ``refs`` in place in ``weights``; raises TrtBuildError when parsing fails."""
    parser = net.parser
    with capture_messages(net.messages, net.min_severity):
        ok = parser.load_model_proto(model.SerializeToString(), str(onnx_path))
        for ref in refs if ok else ():
            if ref.length and not parser.load_initializer(ref.name, weights.address(ref), ref.length):
                net.messages.append(LogMessage("ERROR", f"ONNX parser refused the bytes of initializer {ref.name!r}"))
                ok = False
                break
        ok = ok and parser.parse_model_proto()
    if not ok:
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            net.messages.append(LogMessage("ERROR", f"ONNX parser: {err.desc()} (node {err.node()} "
                                                    f"{err.node_name()!r}, op {err.node_operator()!r})"))
        raise TrtBuildError(f"TensorRT-RTX could not parse {Path(onnx_path).name}", net.messages)


def build_engine_to_file(onnx_path: str | os.PathLike, out: str | os.PathLike, *,
                         transform: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
                         compute_capabilities: Sequence[str] = DEFAULT_TARGETS,
                         profiles: Sequence[Profile] | None = None, workspace_bytes: int | None = None,
                         min_severity: str = "INFO", capture_stderr: bool = True,
                         timing_cache: bytes | None = None, tf32: bool | None = None) -> FileBuild:
    """:func:`build_engine_aot` of the graph file ``onnx_path`` into the file ``out`` (written atomically), holding
    the graph's weights once: the parser gets the graph's skeleton (``transform``, e.g. without a function body,
    applied to it) and every initializer in place in a read-only map of its file, and the engine streams to
    ``out`` (hashed as it is written) instead of being returned whole. A plugin library the graph needs must be
    loaded (:func:`plugin_library`). Nothing is left at ``out`` (nor a temporary file) when the build fails."""
    from fastv_export.engines import graph_weights
    from fastv_export.files import atomic_write

    trt = import_trt()
    _check_targets(trt, compute_capabilities)
    model = graph_weights.skeleton(onnx_path)
    if transform is not None:
        model = transform(model)
    refs = graph_weights.weight_refs(model, onnx_path)
    logger = shared_logger()
    result: list[FileBuild] = []

    def write(f) -> None:
        messages: list[LogMessage] = []
        with graph_weights.MappedWeights(refs) as weights:
            with capture_messages(messages, min_severity, stderr=capture_stderr):
                builder = trt.Builder(logger)
                network = builder.create_network(0)
                parser = trt.OnnxParser(network, logger)
            net = ParsedNetwork(builder, network, parser, min_severity, messages)
            try:
                parse_into(trt, net, onnx_path, weights, model, refs)
                config = _aot_config(trt, net, compute_capabilities, profiles, workspace_bytes, timing_cache, tf32)
                writer = graph_weights.stream_writer(trt, f)
                with weights.dropping(), capture_messages(messages, min_severity, stderr=capture_stderr):
                    ok = builder.build_serialized_network_to_stream(network, config, writer)
                if writer.result.error is not None:
                    raise FastVError(f"the engine could not be written to {out} ({writer.result.error})")
                if not ok or writer.result.bytes == 0:
                    raise TrtBuildError(f"TensorRT-RTX could not build {Path(onnx_path).name} for "
                                        f"{', '.join(compute_capabilities)}", messages)
                cache = b"" if timing_cache is None else serialized_timing_cache(config)
                result.append(FileBuild(writer.result.sha256, writer.result.bytes, net.layer_types, list(messages),
                                        cache))
            finally:       # the parser and builder go before the maps they point into
                del net, parser, network, builder
                config = writer = None

    atomic_write(out, write)
    return result[0]


def with_static_inputs(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs named in ``shapes`` have these fixed dimensions."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {vi.name for vi in out.graph.input}
    unknown = set(shapes) - names
    if unknown:
        raise FastVError(f"not graph inputs: {', '.join(sorted(unknown))}")
    for vi in out.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            new = list(shapes[vi.name])
            if len(dims) != len(new):
                raise FastVError(f"input {vi.name} has rank {len(dims)}, got shape {new}")
            for d, v in zip(dims, new):
                d.Clear()
                d.dim_value = int(v)
    return out
