import functools

import pytest
import torch

from fastv_export.adapters import get_adapter
from fastv_export.presets import load_model

PRESET_NAMES = ["tiny-llava", "tiny-qwen2-vl"]


@functools.lru_cache(maxsize=None)
def _model(name: str, attn: str):
    return load_model(name, attn_implementation=attn)


@pytest.fixture(params=PRESET_NAMES)
def preset(request):
    return request.param


def model_and_adapter(name: str, attn: str = "sdpa"):
    m = _model(name, attn)
    assert getattr(m, "_fastv_handle", None) is None, "a test left FastV applied"
    return m, get_adapter(m)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
