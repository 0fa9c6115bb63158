"""The runners a command can name (``--runner``) and :func:`open_runner`, which imports the chosen
implementation only when it is opened (ONNX Runtime, or TensorRT with its GPU dependencies).

Light on purpose: command modules import it at module level for their ``--runner`` choices."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastv_export.errors import FastVError

if TYPE_CHECKING:
    from fastv_export.bundle import Bundle
    from fastv_export.runtime.runner import Runner

#: runner name -> what it runs (the ``--runner`` help)
RUNNERS = {"onnxruntime": "the bundle's ONNX graphs in ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)",
           "tensorrt": "the engines of `fastv-export build` (needs an NVIDIA GPU and the TensorRT they were built with)"}
DEFAULT_RUNNER = "onnxruntime"


def open_runner(bundle: Bundle, name: str = DEFAULT_RUNNER) -> Runner:
    """The runner ``name`` for ``bundle``: ONNX Runtime on its ONNX graphs, or TensorRT on the
    engines that ``fastv-export build`` recorded (a GPU is needed for those)."""
    if name == "onnxruntime":
        from fastv_export.runtime.ort import OrtRunner
        return OrtRunner(bundle)
    if name == "tensorrt":
        from fastv_export.engines.runner import TrtRunner
        return TrtRunner(bundle)
    raise FastVError(f"--runner must be one of {', '.join(RUNNERS)}, got {name!r}")

