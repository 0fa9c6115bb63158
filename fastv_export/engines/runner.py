"""The TensorRT runner: a bundle's engines behind the :class:`~fastv_export.runtime.runner.Runner`
interface, so the one generation loop and validation drive them as they drive ONNX Runtime.

Needs a GPU, torch with CUDA (device buffers) and the backend the engines were built with
(``tensorrt`` 10 or ``tensorrt_rtx_bindings``). Each call picks the first optimization profile whose
ranges hold the feeds' shapes (prefill or decode), binds torch tensors by the spec's names and runs
``execute_async_v3`` on one CUDA stream. Correctness first: buffers are allocated per call (the C++
runtime is where preallocated KV caches belong).
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from fastv_export.bundle import Bundle
from fastv_export.engines.build import check_engines
from fastv_export.errors import FastVError
from fastv_export.graphs import op
from fastv_export.runtime.runner import Runner

log = logging.getLogger(__name__)


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
                             "use the ONNX Runtime runner (--backend onnxruntime)")
        check_engines(bundle)
        section = bundle.manifest["engines"]
        self.trt = trt = _backend_module(section["backend"])
        self.torch = torch
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        if section.get("plugin") is not None:
            lib = str(bundle.path / op.PLUGIN_LIBRARY)
            if section["backend"] == "tensorrt-rtx":
                from fastv_export.engines.trt_rtx import load_plugin_library
                load_plugin_library(lib)
            else:
                trt.get_plugin_registry().load_library(lib)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts, self.profiles = {}, {}, {}
        for graph, e in section["engines"].items():
            engine = self.runtime.deserialize_cuda_engine((bundle.path / e["file"]).read_bytes())
            if engine is None:
                raise FastVError(f"{bundle.path / e['file']}: TensorRT could not deserialize the engine (built for "
                                 f"another GPU or TensorRT version?); rebuild with fastv-export build")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
            self.profiles[graph] = e["profiles"]
        self._active: dict[str, int] = {}

    def _profile_index(self, graph: str, feeds: Mapping[str, np.ndarray]) -> int:
        profiles = self.profiles[graph]
        if not profiles:
            return 0
        for i, p in enumerate(profiles):
            if all(name not in p["shapes"] or all(lo <= d <= hi for lo, d, hi in
                                                  zip(p["shapes"][name]["min"], arr.shape, p["shapes"][name]["max"]))
                   for name, arr in feeds.items()):
                return i
        shapes = {n: list(a.shape) for n, a in feeds.items()}
        raise FastVError(f"{graph}: no optimization profile of the engine holds these shapes {shapes}; rebuild with "
                         "larger limits (fastv-export build --max-prompt/--max-batch/--max-new-tokens)")

    def infer(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self.torch, self.trt
        engine, ctx = self.engines[graph], self.contexts[graph]
        index = self._profile_index(graph, feeds)
        if self._active.get(graph) != index:
            ctx.set_optimization_profile_async(index, self.stream.cuda_stream)
            self._active[graph] = index
        keep = []                                           # tensors alive until the stream is done
        for name, arr in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
            keep.append(t)
            ctx.set_input_shape(name, tuple(arr.shape))
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy())
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            t = torch.empty(shape, dtype=dtype, device=self.device)
            outputs[name] = t
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise FastVError(f"TensorRT failed to run the {graph} engine")
        self.stream.synchronize()
        del keep
        return {name: t.cpu().numpy() for name, t in outputs.items()}

    def _dummy(self) -> int:
        """A valid device address for an empty tensor (TensorRT wants a non-null one)."""
        if not hasattr(self, "_dummy_buffer"):
            self._dummy_buffer = self.torch.empty(16, dtype=self.torch.uint8, device=self.device)
        return self._dummy_buffer.data_ptr()
