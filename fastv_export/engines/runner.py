"""The TensorRT runner: a bundle's engines behind the :class:`~fastv_export.runtime.runner.Runner`
interface, so the one generation loop and validation drive them as they drive ONNX Runtime.

Needs a GPU, torch with CUDA (device buffers) and the backend the engines were built with
(``tensorrt`` 10 or ``tensorrt_rtx_bindings``). Each call picks the first optimization profile whose
ranges hold the feeds' shapes (prefill or decode), binds torch tensors by the spec's names and runs
``execute_async_v3`` on one CUDA stream. Feeds must have the engine's input dtypes (no silent casts),
and every TensorRT call that reports failure (profile switch, input shape, tensor address, execution)
stops the call with one line naming the graph and the tensor.

Device memory is allocated once, not per call: every input and output of every engine gets one buffer
(:class:`DeviceBuffers`) sized for its largest shape over the engine's profiles (inputs: the profile
maxima; outputs: TensorRT's output shapes with the inputs at those maxima), and each call binds views of
them. A shape beyond that (an output the maxima do not bound) grows its buffer, doubling, and logs it.
The interface is numpy (as every runner's), so feeds and outputs, KV caches included, cross to and from
the host once per call: this runner is for validation; the C++ runtime keeps the caches on the device.
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from fastv_export.bundle import Bundle
from fastv_export.engines.build import check_engines, load_plugin_library
from fastv_export.errors import FastVError
from fastv_export.graphs import op
from fastv_export.runtime.runner import Runner

log = logging.getLogger(__name__)


def volume(shape: tuple[int, ...], what: str = "tensor") -> int:
    """Elements of ``shape``; a negative (unknown, -1) dimension is an error, never a size."""
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise FastVError(f"{what} has the unresolved shape {list(dims)} (a -1 dimension): TensorRT could not "
                         "derive it from the inputs bound so far; check the feeds against the engine's inputs")
    return int(np.prod(dims, dtype=np.int64))


def _check(ok, graph: str, call: str, name: str | None = None) -> None:
    """TensorRT's setters and execute return False on failure (the reason goes to its logger)."""
    if ok is False:
        on = f" for {name}" if name is not None else ""
        raise FastVError(f"{graph}: TensorRT's {call} failed{on} (its log above says why); check the feeds' names, "
                         "shapes and dtypes against the engine and its profiles")


class DeviceBuffers:
    """One reusable buffer per tensor name, handed out as views of the requested shape and dtype.

    ``allocate(nbytes)`` returns a 1-D uint8 tensor (on the GPU in the runner; any device in tests).
    ``reserve`` sizes a buffer up front; ``view`` never allocates unless the shape needs more bytes than
    the buffer holds, then grows it to max(needed, 2 x capacity) and counts the growth."""

    def __init__(self, allocate) -> None:
        self._allocate = allocate
        self._buffers: dict[str, object] = {}
        self.allocations = 0        # buffers created or grown, ever (a test reads it)

    def capacity(self, name: str) -> int:
        buf = self._buffers.get(name)
        return 0 if buf is None else int(buf.numel())

    def address(self, name: str, view) -> int:
        """The device address to bind for ``view`` of buffer ``name``: torch reports 0 for an empty
        tensor, TensorRT wants a valid one, so an empty view binds its buffer's start."""
        return view.data_ptr() if view.numel() else self._buffers[name].data_ptr()

    def reserve(self, name: str, nbytes: int) -> None:
        if nbytes > self.capacity(name) or name not in self._buffers:
            self._buffers[name] = self._allocate(max(int(nbytes), 1))
            self.allocations += 1

    def view(self, name: str, shape: tuple[int, ...], dtype):
        import torch

        nbytes = volume(shape, name) * torch.empty((), dtype=dtype).element_size()
        have = self.capacity(name)
        if nbytes > have or name not in self._buffers:
            if have:
                log.info("TensorRT runner: %s needs %d bytes, more than the %d reserved; growing", name, nbytes, have)
            self.reserve(name, max(nbytes, 2 * have))
        return self._buffers[name][:nbytes].view(dtype).view(shape)


def _backend_module(backend: str):
    if backend == "tensorrt-rtx":
        from fastv_export.engines.trt_rtx import import_trt
        return import_trt()
    import tensorrt
    return tensorrt


class TrtRunner(Runner):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: str = "cuda:0") -> None:
        super().__init__(bundle)
        import torch

        if not torch.cuda.is_available():
            raise FastVError("the TensorRT runner needs an NVIDIA GPU (torch.cuda is not available here); "
                             "use the ONNX Runtime runner (--runner onnxruntime)")
        check_engines(bundle)
        section = bundle.engines
        self.trt = trt = _backend_module(section.backend)
        self.torch = torch
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if section.plugin is not None:
            if section.plugin["serialized_in_engine"]:   # the engine carries it: loading it too registers it twice
                self.runtime.engine_host_code_allowed = True
            else:
                load_plugin_library(section.backend, bundle.path / op.PLUGIN_LIBRARY)
        self.engines, self.contexts, self.profiles = {}, {}, {}
        for graph, e in section.engines.items():
            engine = self.runtime.deserialize_cuda_engine((bundle.path / e.file).read_bytes())
            if engine is None:
                raise FastVError(f"{bundle.path / e.file}: TensorRT could not deserialize the engine (built for "
                                 f"another GPU or TensorRT version?); rebuild with fastv-export build")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
            self.profiles[graph] = e.profiles
        self._active: dict[str, int] = {}
        self._dtypes: dict[tuple[int, str], object] = {}
        self.buffers = DeviceBuffers(lambda n: torch.empty(n, dtype=torch.uint8, device=self.device))
        for graph in self.engines:
            self._reserve(graph)

    def _torch_dtype(self, engine, name: str):
        """The torch dtype of an engine tensor (looked up once per tensor)."""
        key = (id(engine), name)
        if key not in self._dtypes:
            self._dtypes[key] = self.torch.from_numpy(
                np.empty(0, dtype=self.trt.nptype(engine.get_tensor_dtype(name)))).dtype
        return self._dtypes[key]

    def _reserve(self, graph: str) -> None:
        """Buffers for every tensor of ``graph`` at its largest shape over the engine's profiles."""
        trt, engine, ctx = self.trt, self.engines[graph], self.contexts[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for index in range(max(1, engine.num_optimization_profiles)):
            if engine.num_optimization_profiles > 1:
                _check(ctx.set_optimization_profile_async(index, self.stream.cuda_stream), graph,
                       f"set_optimization_profile_async({index})")
                self._active[graph] = index
            for name in inputs:
                shape = tuple(engine.get_tensor_profile_shape(name, index)[2]) if -1 in tuple(
                    engine.get_tensor_shape(name)) else tuple(engine.get_tensor_shape(name))
                _check(ctx.set_input_shape(name, shape), graph, f"set_input_shape{shape}", name)
            for name in names:
                shape = tuple(ctx.get_tensor_shape(name))
                if all(d >= 0 for d in shape):   # an output the maxima do not bound grows when it is known
                    size = self.torch.empty((), dtype=self._torch_dtype(engine, name)).element_size()
                    self.buffers.reserve(f"{graph}/{name}", volume(shape, f"{graph}/{name}") * size)
        self.stream.synchronize()

    def _profile_index(self, graph: str, feeds: Mapping[str, np.ndarray]) -> int:
        profiles = self.profiles[graph]
        if not profiles:
            return 0
        for i, p in enumerate(profiles):
            if p.holds({name: arr.shape for name, arr in feeds.items()}):
                return i
        shapes = {n: list(a.shape) for n, a in feeds.items()}
        raise FastVError(f"{graph}: no optimization profile of the engine holds these shapes {shapes}; rebuild with "
                         "larger limits (fastv-export build --max-prompt/--max-batch/--max-new-tokens)")

    def _check_feeds(self, graph: str, feeds: Mapping[str, np.ndarray]) -> None:
        """Every feed is an input of the engine, with the engine's dtype (one line otherwise)."""
        engine, trt = self.engines[graph], self.trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name, arr in feeds.items():
            if name not in inputs:
                raise FastVError(f"{graph}: {name!r} is not an input of the engine (its inputs: {', '.join(inputs)})")
            want = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if np.asarray(arr).dtype != want:
                raise FastVError(f"{graph}: input {name} is {np.asarray(arr).dtype}, the engine takes {want}; "
                                 f"feed {want} (the bundle's precision and the graph spec say which)")
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise FastVError(f"{graph}: no feed for the engine's inputs {', '.join(missing)}")

    def infer(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self.torch, self.trt
        engine, ctx = self.engines[graph], self.contexts[graph]
        self._check_feeds(graph, feeds)
        index = self._profile_index(graph, feeds)
        if self._active.get(graph) != index:
            _check(ctx.set_optimization_profile_async(index, self.stream.cuda_stream), graph,
                   f"set_optimization_profile_async({index})")
            self._active[graph] = index
        with torch.cuda.stream(self.stream):
            for name, arr in feeds.items():
                host = torch.from_numpy(np.ascontiguousarray(arr))
                key = f"{graph}/{name}"
                dev = self.buffers.view(key, tuple(arr.shape), host.dtype)
                dev.copy_(host)
                _check(ctx.set_input_shape(name, tuple(arr.shape)), graph, f"set_input_shape{tuple(arr.shape)}", name)
                _check(ctx.set_tensor_address(name, self.buffers.address(key, dev)), graph, "set_tensor_address",
                       name)
            outputs = {}
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                    continue
                key = f"{graph}/{name}"
                t = self.buffers.view(key, tuple(ctx.get_tensor_shape(name)), self._torch_dtype(engine, name))
                outputs[name] = t
                _check(ctx.set_tensor_address(name, self.buffers.address(key, t)), graph, "set_tensor_address", name)
            _check(ctx.execute_async_v3(self.stream.cuda_stream), graph, "execute_async_v3")
            result = {name: t.cpu().numpy() for name, t in outputs.items()}
        self.stream.synchronize()
        return result
