"""A stand-in for TensorRT 10's Python module (``tensorrt``), enough for fastv_export.engines.build's
TensorRT 10 path to run on a machine without a GPU. It records what the builder is handed (the model
bytes given to the parser, flags, timing caches, plugins to serialize, plugin library loads) and
imports ONNX the way onnx-tensorrt 10.1 does: a built-in op, else the node's ONNX local function,
else a registered plugin (so a TokenSelect node that still has its function body never becomes a
plugin layer, as on those parsers)."""
from __future__ import annotations

import ctypes
import importlib.machinery
import types
from dataclasses import dataclass, field

import onnx

PLUGIN_KEY = ("TokenSelect", "1", "fastv")


@dataclass
class Record:
    parsed: list[bytes] = field(default_factory=list)            # model bytes handed to parse / load_model_proto
    #: per lean parse (load_model_proto): initializer name -> the bytes load_initializer pointed at
    initializers: list[dict[str, bytes]] = field(default_factory=list)
    streamed: int = 0                                             # builds written through an IStreamWriter
    configs: list["Config"] = field(default_factory=list)         # every builder config, in order
    loaded_libraries: list[str] = field(default_factory=list)     # every plugin registry load_library call
    built: int = 0


def make_module(version: str = "10.1.0", *, unreadable_cache: bool = False,
                lean: bool = True) -> tuple[types.ModuleType, Record]:
    """(the module, its record). ``unreadable_cache``: create_timing_cache returns None for a non-empty
    cache that this stand-in did not write (as TensorRT does for a cache it cannot read). ``lean``: the
    parser offers load_model_proto / load_initializer / parse_model_proto and the builder
    build_serialized_network_to_stream (TensorRT 10.x); without, only parse and build_serialized_network."""
    rec = Record()
    own = b"+timings of %d" % id(rec)        # what this stand-in appends to a cache it wrote
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version

    class Logger:
        WARNING, ERROR = "WARNING", "ERROR"

        def __init__(self, severity=None):
            self.severity = severity

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0

    class BuilderFlag:
        TF32, VERSION_COMPATIBLE, FP16 = "TF32", "VERSION_COMPATIBLE", "FP16"

    class Registry:
        def __init__(self):
            self.creators: set[tuple[str, str, str]] = set()

        def load_library(self, path):
            rec.loaded_libraries.append(str(path))
            if PLUGIN_KEY in self.creators:       # TensorRT refuses a creator registered twice
                return None
            self.creators.add(PLUGIN_KEY)
            return object()

    registry = Registry()

    class Layer:
        def __init__(self, kind: str):
            self.type = f"LayerType.{kind}"

    class Network:
        def __init__(self):
            self.layers: list[Layer] = []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class ParserError:
        def __init__(self, text):
            self.text = text

        def desc(self):
            return self.text

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse(self, data):
            rec.parsed.append(bytes(data))
            return self._import(onnx.load_from_string(bytes(data)))

        def _load_model_proto(self, data, path=None):
            rec.parsed.append(bytes(data))
            self.loaded = onnx.load_from_string(bytes(data))
            rec.initializers.append({})
            return True

        def _load_initializer(self, name, address, size):
            tensors = {t.name: t for t in self.loaded.graph.initializer}
            if name not in tensors:
                return False
            rec.initializers[-1][name] = ctypes.string_at(address, size)   # what TensorRT would read there
            return True

        def _parse_model_proto(self):
            external = {t.name for t in self.loaded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
            missing = external - set(rec.initializers[-1])
            if missing:
                self.errors.append(ParserError(f"initializers not given: {sorted(missing)}"))
                return False
            return self._import(self.loaded)

        def _import(self, model):
            functions = {(f.domain, f.name): f for f in model.functions}
            for node in model.graph.node:
                if node.domain in ("", "ai.onnx"):
                    self.network.layers.append(Layer("ELEMENTWISE"))
                elif (node.domain, node.op_type) in functions:          # 10.1: the local function first
                    self.network.layers += [Layer("ELEMENTWISE") for _ in functions[node.domain, node.op_type].node]
                elif PLUGIN_KEY in registry.creators and any(a.name == "plugin_namespace" for a in node.attribute):
                    self.network.layers.append(Layer("PLUGIN_V3"))
                else:
                    self.errors.append(ParserError(f"Plugin not found: {node.op_type}"))
                    return False
            return True

    class Cache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return self.data + own

    class Config:
        def __init__(self):
            self.flags = {BuilderFlag.TF32}          # TensorRT's default: TF32 allowed
            self.given_cache: bytes | None = None    # what create_timing_cache was given last
            self.cache: Cache | None = None
            self.serialize_plugins: list[str] | None = None
            self.profiles = 0

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def get_flag(self, flag):
            return flag in self.flags

        def create_timing_cache(self, data):
            self.given_cache = bytes(data)
            if unreadable_cache and data and not bytes(data).endswith(own):   # not one this TensorRT wrote
                return None
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            if not isinstance(cache, Cache):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        @property
        def plugins_to_serialize(self):
            return self.serialize_plugins or []

        @plugins_to_serialize.setter
        def plugins_to_serialize(self, value):
            self.serialize_plugins = list(value)

        def add_optimization_profile(self, profile):
            self.profiles += 1

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def get_plugin_registry(self):
            return registry

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            config = Config()
            rec.configs.append(config)
            return config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.built += 1
            return b"engine of %d layers" % network.num_layers

        def _build_serialized_network_to_stream(self, network, config, writer):
            rec.built += 1
            rec.streamed += 1
            data = b"engine of %d layers" % network.num_layers
            for i in range(0, len(data), 7):            # in chunks, as TensorRT writes
                if writer.write(data[i:i + 7]) != len(data[i:i + 7]):
                    return False
            return True

    class IStreamWriter:
        def __init__(self):
            pass

    if lean:
        OnnxParser.load_model_proto = OnnxParser._load_model_proto
        OnnxParser.load_initializer = OnnxParser._load_initializer
        OnnxParser.parse_model_proto = OnnxParser._parse_model_proto
        Builder.build_serialized_network_to_stream = Builder._build_serialized_network_to_stream

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return None                          # no GPU: no activation size

    for name, value in dict(Logger=Logger, NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
                            BuilderFlag=BuilderFlag, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
                            IStreamWriter=IStreamWriter,
                            get_plugin_registry=lambda: registry).items():
        setattr(trt, name, value)
    return trt, rec
