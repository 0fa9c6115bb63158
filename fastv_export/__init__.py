"""fastv-export: FastV visual-token pruning for Hugging Face VLMs, exported to ONNX / TensorRT."""
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError

__version__ = "0.1.0"
__all__ = ["FastVConfig", "FastVError", "apply_fastv", "FastVHandle", "load_model", "__version__"]


def __getattr__(name: str):  # lazy: importing the package must not import transformers
    if name in ("apply_fastv", "FastVHandle"):
        from fastv_export import reference
        return getattr(reference, name)
    if name == "load_model":
        from fastv_export.presets import load_model
        return load_model
    raise AttributeError(name)
