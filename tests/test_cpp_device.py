"""The device-resident executor's buffer logic on the CPU (runtime/tests/device_tests.cpp, ctest fastv_device_unit):
the TensorRT executor's buffers, KV-cache swapping and host <-> device traffic, over host memory and fake engines."""
from __future__ import annotations

import subprocess

import pytest


@pytest.mark.slow
def test_device_executor_buffer_logic(runtime_build):
    """The vision calls copy nothing back (embed reads their stacked rows on the device); the prefill copies back
    kept_indices and the last position's logits only; per decode step only the logits come back to the host and only
    the step's ids, masks and positions go up; no allocation after load; decode calls on every engine's decode
    profile."""
    proc = subprocess.run([str(runtime_build.parent / "fastv_device_tests")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(" 0 failed"), proc.stdout + proc.stderr
    passed = int(proc.stdout.split()[0])
    assert passed >= 142, proc.stdout
