"""Model adapters, one module per architecture family."""
from fastv_export.adapters import (  # noqa: F401  (registration)
    internvl, llava, llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl)
from fastv_export.adapters.base import Media, ModelAdapter, adapter_class_for, get_adapter, supported_architectures

__all__ = ["Media", "ModelAdapter", "adapter_class_for", "get_adapter", "supported_architectures"]
