"""The ONNX Runtime runner: one InferenceSession per graph of a bundle (only the manifest and the
ONNX files are used)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnxruntime as ort

from fastv_export.bundle import Bundle
from fastv_export.graphs import spec
from fastv_export.runtime.runner import Runner


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def default_session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options for a pipeline of sessions run in turn: no spinning, optional thread count.

    Intra-op threads do not spin after a run: the four sessions run one after another, each with its
    own thread pool, and a pool spinning after its graph finished steals the cores of the next graph
    (bench-llava on 2 cores, measured: pre_k 199 -> 141 ms, decode 69 -> 46 ms per token)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # A quantized bundle's DequantizeLinear -> MatMul is fused into MatMulNBits on the CPU; its default accuracy
    # level 4 quantizes the activations to int8 as well. Level 0 keeps float activations: the graph's meaning.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    # Weights: held once with these defaults. A graph's external data is memory-mapped, and MatMul weights are
    # prepacked into ONNX Runtime's layout with the original released (bench-llava post_k, 0.78 GiB fp32, ONNX
    # Runtime 1.31: +0.80 GiB after the session opened, +0.92 GiB peak while it opens, one tensor packed at a time).
    # "session.disable_prepacking" would leave the weights in the memory map (+0.01 GiB at load, +0.82 GiB once
    # run, so no saving) and doubles the CPU prefill (242 -> 501 ms; decode 54 -> 59 ms per token): not set.
    if threads:
        so.intra_op_num_threads = threads
    return so


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None,
                 session_options: ort.SessionOptions | None = None) -> None:
        """``session_options`` (threads, profiling, ...) applies to every session."""
        super().__init__(bundle)
        self.providers = providers or default_providers()
        so = session_options or default_session_options()
        so.log_severity_level = 3
        self.sessions = {g: ort.InferenceSession(str(bundle.file(g)), so, providers=self.providers)
                         for g in spec.GRAPHS}
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}

    def infer(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[graph]
        return dict(zip(names, self.sessions[graph].run(names, dict(feeds))))
