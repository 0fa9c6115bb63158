"""The TensorRT runner's checks, on the CPU: feeds against the engine's inputs and dtypes, TensorRT's return
values, and shapes with unresolved (-1) dimensions. The engine and execution context are stand-ins that
answer as TensorRT's do; buffers are host tensors."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from fastv_export.engines import runner as trt_runner
from fastv_export.engines.runner import DeviceBuffers, TrtRunner
from fastv_export.errors import FastVError

INPUT, OUTPUT = "INPUT", "OUTPUT"


class _Trt:
    """What the runner reads of the TensorRT module."""
    class TensorIOMode:
        INPUT, OUTPUT = INPUT, OUTPUT

    @staticmethod
    def nptype(dtype):
        return {"FLOAT": np.float32, "INT64": np.int64}[dtype]


class _Engine:
    tensors = {"inputs_embeds": (INPUT, "FLOAT"), "attention_mask": (INPUT, "INT64"), "logits": (OUTPUT, "FLOAT")}
    num_io_tensors = 3

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]


class _Context:
    """Each setter returns True unless told to fail; the output shape follows the inputs (-1 until set)."""

    def __init__(self, failing: str | None = None, output_shape=None):
        self.failing, self.output_shape, self.calls = failing, output_shape, []
        self.shapes: dict[str, tuple] = {}

    def _result(self, call):
        self.calls.append(call)
        return call != self.failing

    def set_optimization_profile_async(self, index, stream):
        return self._result("set_optimization_profile_async")

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return self._result("set_input_shape")

    def set_tensor_address(self, name, address):
        return self._result("set_tensor_address")

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        if self.output_shape is not None:
            return self.output_shape
        b, n, _ = self.shapes.get("inputs_embeds", (-1, -1, 8))
        return (b, n, 16)

    def execute_async_v3(self, stream):
        return self._result("execute_async_v3")


class _Stream:
    cuda_stream = 0

    def synchronize(self):
        pass


def _runner(monkeypatch, ctx: _Context) -> TrtRunner:
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    runner = TrtRunner.__new__(TrtRunner)
    runner.trt, runner.torch, runner.stream = _Trt(), torch, _Stream()
    runner.engines, runner.contexts, runner.profiles = {"pre_k": _Engine()}, {"pre_k": ctx}, {"pre_k": []}
    runner._active, runner._dtypes = {"pre_k": 0}, {}
    runner.buffers = DeviceBuffers(lambda n: torch.zeros(n, dtype=torch.uint8))
    return runner


def _feeds(**change):
    feeds = {"inputs_embeds": np.ones((1, 4, 8), np.float32), "attention_mask": np.ones((1, 4), np.int64)}
    return feeds | change


def test_good_feeds_run_and_return_the_outputs(monkeypatch):
    ctx = _Context()
    out = _runner(monkeypatch, ctx).infer("pre_k", _feeds())
    assert out["logits"].shape == (1, 4, 16) and out["logits"].dtype == np.float32
    assert ctx.calls[-1] == "execute_async_v3"


@pytest.mark.parametrize("change,message", [
    (dict(attention_mask=np.ones((1, 4), np.int32)), "pre_k: input attention_mask is int32, the engine takes int64"),
    (dict(inputs_embeds=np.ones((1, 4, 8), np.float16)), "pre_k: input inputs_embeds is float16, the engine takes "
                                                         "float32"),
    (dict(position_ids=np.zeros((1, 4), np.int64)), "pre_k: 'position_ids' is not an input of the engine"),
])
def test_feeds_of_another_dtype_or_name_are_refused_with_one_line(monkeypatch, change, message):
    ctx = _Context()
    with pytest.raises(FastVError, match=message) as exc:
        _runner(monkeypatch, ctx).infer("pre_k", _feeds(**change))
    assert "\n" not in str(exc.value) and "execute_async_v3" not in ctx.calls


def test_a_missing_feed_is_named(monkeypatch):
    feeds = _feeds()
    del feeds["attention_mask"]
    with pytest.raises(FastVError, match="pre_k: no feed for the engine's inputs attention_mask"):
        _runner(monkeypatch, _Context()).infer("pre_k", feeds)


@pytest.mark.parametrize("call", ["set_input_shape", "set_tensor_address", "execute_async_v3"])
def test_a_tensorrt_call_that_fails_stops_the_call(monkeypatch, call):
    ctx = _Context(failing=call)
    with pytest.raises(FastVError, match=f"pre_k: TensorRT's {call}.* failed") as exc:
        _runner(monkeypatch, ctx).infer("pre_k", _feeds())
    assert "\n" not in str(exc.value)
    assert ctx.calls[-1] == call, "the runner went on after a failed call"


def test_a_failed_profile_switch_stops_the_call(monkeypatch):
    ctx = _Context(failing="set_optimization_profile_async")
    runner = _runner(monkeypatch, ctx)
    runner._active["pre_k"] = 1                      # the next call switches to profile 0
    with pytest.raises(FastVError, match=r"set_optimization_profile_async\(0\) failed"):
        runner.infer("pre_k", _feeds())
    assert ctx.calls == ["set_optimization_profile_async"]


def test_an_unresolved_output_shape_is_an_error_not_an_empty_tensor(monkeypatch):
    ctx = _Context(output_shape=(1, -1, 16))
    with pytest.raises(FastVError, match=r"pre_k/logits has the unresolved shape \[1, -1, 16\]"):
        _runner(monkeypatch, ctx).infer("pre_k", _feeds())
    assert "execute_async_v3" not in ctx.calls


def test_volume_refuses_unknown_dimensions():
    pool = DeviceBuffers(lambda n: torch.zeros(n, dtype=torch.uint8))
    with pytest.raises(FastVError, match="unresolved"):                # was a (2, 0, 8) view: -1 became 0
        pool.view("post_k/logits", (2, -1, 8), torch.float32)
    volume = trt_runner.volume
    assert volume((2, 3, 4)) == 24 and volume((2, 0, 4)) == 0 and volume(()) == 1
    with pytest.raises(FastVError, match=r"has the unresolved shape \[2, -1\]"):
        volume((2, -1))
