"""The runner interface: one object that executes a bundle's graphs by name.

As in Polygraphy, a runner knows how to run a graph and nothing about the pipeline: the generation
loop (:mod:`fastv_export.runtime.generate`) drives any runner through :meth:`Runner.infer`, so a
new backend (TensorRT engines, a remote service) implements one method and reuses the loop, and
validation compares any runner with the PyTorch reference. This module imports no implementation:
choosing one by name is :mod:`fastv_export.runtime.runners`.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    from fastv_export.bundle import Bundle


class Runner(abc.ABC):
    """Runs the graphs of one bundle. Inputs and outputs are named as ``fastv_export.graphs.spec``
    says; every input of a graph must be fed."""

    #: short name used in reports (e.g. "onnxruntime", "tensorrt")
    name: str = "runner"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @abc.abstractmethod
    def infer(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph ``graph`` ("vision", "embed", "pre_k" or "post_k") once; all outputs by name."""
