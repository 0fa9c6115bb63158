"""Model adapters, one module per architecture family."""
from . import llava, qwen2_vl  # noqa: F401  (registration)
from .base import DecoderInfo, ModelAdapter, adapter_class_for, get_adapter, supported_architectures

__all__ = ["DecoderInfo", "ModelAdapter", "adapter_class_for", "get_adapter", "supported_architectures"]
