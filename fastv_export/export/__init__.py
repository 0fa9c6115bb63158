"""Stage 3: export a model with FastV as the bundle's ONNX graphs.

- :mod:`.modules`: the torch modules that torch.onnx traces (vision, embed, pre-K, post-K);
- :mod:`.onnx_export`: :func:`export_bundle`, which exports them, runs graph surgery
  (``fastv_export.graphs``) and writes the bundle (``fastv_export.bundle``) atomically.
"""
from fastv_export.export.onnx_export import DTYPES, ExportOptions, export_bundle

__all__ = ["DTYPES", "ExportOptions", "export_bundle"]
