"""ratio_den (and so ratio_num) stays in int32 range everywhere: TensorRT's ONNX parser hands integer node
attributes to plugins as int32, so ratio_den = 2^31 would reach the plugin as -2^31. The Python rules
(graphs/op.py, FastVConfig), the manifest schema and the plugin's host code all stop at 2^31 - 1 with a
message that says why; through TensorRT-RTX the wrapped value is refused by the plugin by name."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from fastv_export.bundle import MANIFEST, load_bundle
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.graphs import op
from tests.helpers import c_pointer as ptr
from tests.helpers import copy_bundle

INT32_MAX = 2**31 - 1


def test_op_rules_stop_at_int32():
    good = dict(ranking="last", ratio_num=1, ratio_den=2, keep=-1, seed=0)
    op.check_attributes(**good | dict(ratio_num=INT32_MAX - 1, ratio_den=INT32_MAX))
    with pytest.raises(ValueError, match=r"ratio_den must be in \[1, 2\^31 - 1\] \(an int32"):
        op.check_attributes(**good | dict(ratio_den=2**31))


def test_config_refuses_a_denominator_of_2_to_the_31():
    assert FastVConfig(ratio=Fraction(1, INT32_MAX)).r.denominator == INT32_MAX
    with pytest.raises(FastVError, match=r"denominator 2147483648 exceeds 2\^31 - 1"):
        FastVConfig(ratio=Fraction(1, 2**31))


def test_manifest_schema_refuses_ratio_den_2_to_the_31(exported_bundle, tmp_path):
    b = copy_bundle(exported_bundle("tiny-llava", 2, "1/2"), tmp_path)
    man = json.loads((b / MANIFEST).read_text())
    man["fastv"].update(ratio_den=2**31, ratio=f"1/{2**31}")
    (b / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(FastVError, match=r"field 'fastv.ratio_den': 2147483648 is greater than the maximum of "
                                         r"2147483647") as exc:
        load_bundle(b)
    assert "\n" not in str(exc.value)
    import fastv_export.bundle as bundle_pkg

    schema = json.loads((Path(bundle_pkg.__file__).parent / "manifest.schema.json").read_text())
    fastv = schema["properties"]["fastv"]["properties"]
    assert fastv["ratio_den"]["maximum"] == INT32_MAX and fastv["ratio_num"]["maximum"] == INT32_MAX - 1


def _validate(lib, den: int, num: int = 1) -> tuple[int, str]:
    import ctypes

    import numpy as np

    ranks = np.array([3, 4, 4, 2, 2, 2], np.int32)
    dims = np.full((6, 8), -1, np.int64)
    for i, shape in enumerate([[2, 30, 8], [2, 4, 30, 16], [2, 2, 30, 16], [2, 30], [2, 30], [2, 12]]):
        dims[i, :len(shape)] = shape
    buf = ctypes.create_string_buffer(512)
    rc = lib.fastv_host_validate(1, num, den, -1, 0.25, 0, ptr(ranks, ctypes.c_int32), ptr(dims, ctypes.c_int64),
                                 buf, 512)
    return rc, buf.value.decode()


def test_plugin_host_code_refuses_2_to_the_31_and_its_int32_wrap(host_math):
    assert _validate(host_math, INT32_MAX) == (0, "")
    for den in (2**31, -2**31):          # as given, and as TensorRT's int32 attribute delivers it
        rc, msg = _validate(host_math, den)
        assert rc == 1 and f"attribute 'ratio_den' must be in [1, 2^31 - 1] (an int32" in msg and str(den) in msg, msg


@pytest.mark.slow
@pytest.mark.tensorrt
def test_tensorrt_delivers_2_to_the_31_wrapped_and_the_plugin_names_it(plugin_library):
    """A TokenSelect node with ratio_den = 2^31 (written by hand: the exporter refuses it) through TensorRT-RTX's
    parser: the plugin receives -2^31 and refuses it with its int32 message."""
    import onnx

    from fastv_export.engines import trt_rtx
    from fastv_export.graphs import token_select as ts

    m = ts.make_token_select_model(ranking="mean", ratio_num=1, ratio_den=2, scale=0.25)
    node = m.graph.node[0]
    kept = [a for a in node.attribute if a.name != "ratio_den"]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute("ratio_den", 2**31)])
    shapes = dict(hidden_states=[2, 30, 8], query=[2, 4, 30, 16], key=[2, 2, 30, 16], attention_mask=[2, 30],
                  position_ids=[2, 30], candidate_positions=[2, 12])
    with trt_rtx.plugin_library(plugin_library):
        with pytest.raises(trt_rtx.TrtBuildError) as info:
            trt_rtx.build_engine_aot(trt_rtx.with_static_inputs(m, shapes), compute_capabilities=["SM86"])
    plugin = [x.message for x in info.value.messages if x.source == "stderr" and x.severity == "ERROR"]
    assert any("attribute 'ratio_den' must be in [1, 2^31 - 1]" in x and "-2147483648" in x for x in plugin), plugin
