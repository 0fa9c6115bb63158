"""libfastv_plugins.so inside TensorRT-RTX, on a machine without a GPU: registry, ONNX parser (plugin
layer when the library is loaded, function body when not), ahead-of-time engine builds for SM86 and SM89,
output shapes from the plugin's integer shape expressions, and build-time errors that name the problem.

The library is loaded only inside ``trt_rtx.plugin_library(...)`` blocks and unloaded after, so no other
test module of the session sees the plugin registered."""
from __future__ import annotations

import math
import os
from fractions import Fraction

import onnx
import pytest
from onnx import TensorProto

from fastv_export.engines import trt_rtx
from fastv_export.errors import FastVError
from fastv_export.graphs import op
from fastv_export.graphs import token_select as ts

pytestmark = pytest.mark.tensorrt

SCALE = 0.125
TARGETS = ("SM86", "SM89")
CREATOR = ("TokenSelect", "1", "fastv")


@pytest.fixture(scope="module")
def trt():
    return trt_rtx.import_trt()


@pytest.fixture(scope="module")
def lib(trt, plugin_library):
    return plugin_library


@pytest.fixture
def loaded(lib):
    with trt_rtx.plugin_library(lib):
        yield lib


def model(ranking="mean", num=1, den=2, keep=-1, dtype=TensorProto.FLOAT, position_rank=2, seed=0):
    return ts.make_token_select_model(ranking=ranking, ratio_num=num, ratio_den=den, keep=keep, scale=SCALE,
                                      seed=seed, dtype=dtype, position_rank=position_rank)


def static_shapes(b=2, n=30, d_model=8, h=4, hkv=2, head_dim=16, nq=None, past=0, m=12, position_rank=2):
    s = past + n
    nq = n if nq is None else nq
    return dict(hidden_states=[b, n, d_model], query=[b, h, nq, head_dim], key=[b, hkv, s, head_dim],
                attention_mask=[b, s], position_ids=[b, n] if position_rank == 2 else [3, b, n],
                candidate_positions=[b, m])


def dynamic_profile(position_rank=2):
    lo, opt, hi = dict(b=1, n=1, s=1, m=0), dict(b=2, n=64, s=96, m=32), dict(b=4, n=256, s=320, m=256)

    def shapes(x):
        pos = [x["b"], x["n"]] if position_rank == 2 else [3, x["b"], x["n"]]
        return dict(hidden_states=(x["b"], x["n"], 8), query=(x["b"], 4, 1, 16), key=(x["b"], 2, x["s"], 16),
                    attention_mask=(x["b"], x["s"]), position_ids=tuple(pos), candidate_positions=(x["b"], x["m"]))

    a, b, c = shapes(lo), shapes(opt), shapes(hi)
    return {name: (a[name], b[name], c[name]) for name in a}


def expected_keep(m, num, den, keep=-1):
    return min(keep, m) if keep >= 0 else m - math.floor(Fraction(m) * Fraction(num, den))


def drop_attribute(m: onnx.ModelProto, name: str) -> onnx.ModelProto:
    node = m.graph.node[0]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    return m


def set_attribute(m: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    drop_attribute(m, name)
    m.graph.node[0].attribute.append(onnx.helper.make_attribute(name, value))
    return m


# ---------------------------------------------------------------------------------------------- install
def test_import_trt_makes_the_unversioned_library_link(trt):
    link = trt_rtx._libs_dir() / "libtensorrt_rtx.so"
    assert link.exists() and os.path.realpath(link) == os.path.realpath(link.with_name("libtensorrt_rtx.so.1"))


def test_link_helper_on_a_fresh_folder(tmp_path):
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    link = trt_rtx.ensure_unversioned_library_link(tmp_path)
    assert link.is_symlink() and os.readlink(link) == "libtensorrt_rtx.so.1"
    assert trt_rtx.ensure_unversioned_library_link(tmp_path) == link            # idempotent
    link.unlink()
    os.symlink("gone.so", link)                                                   # dangling: replaced
    trt_rtx.ensure_unversioned_library_link(tmp_path)
    assert os.readlink(link) == "libtensorrt_rtx.so.1"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FastVError, match="libtensorrt_rtx.so.1 is missing"):
        trt_rtx.ensure_unversioned_library_link(empty)


def test_missing_bindings_raise_an_install_hint(monkeypatch):
    real = trt_rtx.importlib.util.find_spec
    monkeypatch.setattr(trt_rtx.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorrt_rtx") else real(name, *a))
    with pytest.raises(FastVError, match=r"pip install .*tensorrt-rtx-cu13-bindings==1\.7\.1\.116"):
        trt_rtx.import_trt.__wrapped__()


# ---------------------------------------------------------------------------------------------- registry, parser
@pytest.mark.slow
def test_library_registers_the_creator_and_unloads(lib):
    assert CREATOR not in trt_rtx.registered_plugins()
    with trt_rtx.plugin_library(lib):
        assert CREATOR in trt_rtx.registered_plugins()
        trt_rtx.load_plugin_library(lib)                                          # a second load is a no-op
    assert CREATOR not in trt_rtx.registered_plugins()


@pytest.mark.slow
@pytest.mark.parametrize("ranking", op.RANKINGS)
def test_parser_uses_the_plugin_when_loaded_and_the_body_otherwise(lib, ranking):
    m = trt_rtx.with_static_inputs(model(ranking, 2, 3), static_shapes(nq=1 if ranking == "last" else None))
    body = trt_rtx.parse_onnx(m)
    assert "PLUGIN_V3" not in body.layer_types and len(body.layer_types) > 50
    with trt_rtx.plugin_library(lib):
        plugin = trt_rtx.parse_onnx(m)
    assert plugin.layer_types == ["PLUGIN_V3"]
    want = 30 - 12 + expected_keep(12, 2, 3)
    assert plugin.output_shapes == body.output_shapes == {
        "selected_hidden_states": (2, want, 8), "selected_position_ids": (2, want), "kept_indices": (2, want)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("ranking", op.RANKINGS)
def test_both_engines_build_ahead_of_time_for_sm86_and_sm89(lib, ranking, dtype):
    position_rank = 3 if ranking == "mean" else 2
    m = model(ranking, 3, 7, dtype=dtype, position_rank=position_rank)
    profile = dynamic_profile(position_rank)
    body = trt_rtx.build_engine_aot(m, compute_capabilities=TARGETS, profiles=[profile])
    assert len(body.engine) > 10_000 and "PLUGIN_V3" not in body.layer_types
    with trt_rtx.plugin_library(lib):
        plugin = trt_rtx.build_engine_aot(m, compute_capabilities=TARGETS, profiles=[profile])
    assert plugin.layer_types == ["PLUGIN_V3"] and len(plugin.engine) > 1_000
    assert b"TokenSelect" in plugin.engine                      # the plugin and its fields are serialized
    assert not [x for x in plugin.messages if x.severity in ("ERROR", "INTERNAL_ERROR")]


# ---------------------------------------------------------------------------------------------- shapes
SHAPE_RATIOS = [(0, 1), (1, 2), (1, 3), (2, 3), (1, 7), (3, 7), (6, 7), (1, 9), (4, 9), (8, 9), (3, 4), (9, 10)]
SHAPE_NM = [(1, 0), (1, 1), (7, 0), (7, 3), (7, 7), (30, 2), (30, 9), (30, 13), (100, 49), (612, 576),
            (1000, 999), (2000, 1152)]
SHAPE_KEEP = [0, 1, 5, 576, 10_000]


@pytest.mark.slow
def test_plugin_output_shapes_equal_the_reference_keep_count(loaded):
    """One static-shape network per (N, M, R): TensorRT evaluates the plugin's IExprBuilder expressions
    to constants, read back from the parsed network's outputs."""
    checked = 0
    cases = [(num, den, -1) for num, den in SHAPE_RATIOS] + [(1, 2, keep) for keep in SHAPE_KEEP]
    for num, den, keep in cases:
        base = model("random", num, den, keep)
        for n, m in SHAPE_NM:
            net = trt_rtx.parse_onnx(trt_rtx.with_static_inputs(base, static_shapes(b=3, n=n, m=m, nq=1)))
            want = n - m + expected_keep(m, num, den, keep)
            assert want == op.kept_length(n, m, num, den, keep)
            assert net.output_shapes == {"selected_hidden_states": (3, want, 8), "selected_position_ids": (3, want),
                                         "kept_indices": (3, want)}, (n, m, num, den, keep)
            checked += 1
    assert checked == len(cases) * len(SHAPE_NM)


@pytest.mark.slow
@pytest.mark.parametrize("num,den", [(1, 3), (3, 7), (4, 9)])
def test_mrope_output_shapes(loaded, num, den):
    m = trt_rtx.with_static_inputs(model("last", num, den, position_rank=3),
                                   static_shapes(b=2, n=40, m=21, nq=1, past=5, position_rank=3))
    want = 40 - 21 + expected_keep(21, num, den)
    assert trt_rtx.parse_onnx(m).output_shapes["selected_position_ids"] == (3, 2, want)


# ---------------------------------------------------------------------------------------------- bad input
def _retype(index, elem_type):
    def f(m):
        m.graph.input[index].type.tensor_type.elem_type = elem_type
        return m
    return f


BAD = {
    "candidates_int32": (_retype(5, TensorProto.INT32), {}, "input 5 'candidate_positions' must be int64, got int32"),
    "query_fp16_hidden_fp32": (_retype(1, TensorProto.FLOAT16), {}, "input 1 'query' must have the type of hidden_states"),
    "hidden_int64": (lambda m: _retype(2, TensorProto.INT64)(_retype(1, TensorProto.INT64)(_retype(0, TensorProto.INT64)(m))),
                     {}, "must be float32, float16 or bfloat16, got int64"),
    "mask_float": (_retype(3, TensorProto.FLOAT), {}, "input 3 'attention_mask' must be int64, got float32"),
    "hidden_rank_2": (lambda m: m, dict(hidden_states=[2, 30]), "input 0 'hidden_states' must have rank 3, got rank 2"),
    "positions_rank_4": (lambda m: m, dict(position_ids=[1, 3, 2, 30]), "input 4 'position_ids' must have rank 2"),
    "missing_ratio_den": (lambda m: drop_attribute(m, "ratio_den"), {}, "missing attribute 'ratio_den'"),
    "missing_scale": (lambda m: drop_attribute(m, "scale"), {}, "missing attribute 'scale'"),
    "missing_ranking": (lambda m: drop_attribute(m, "ranking"), {}, "missing attribute 'ranking'"),
    "unknown_ranking": (lambda m: set_attribute(m, "ranking", "top"), {},
                        "attribute 'ranking' must be one of last, mean, random; got 'top'"),
    "ratio_out_of_range": (lambda m: set_attribute(m, "ratio_num", 5), {}, "0 <= ratio_num < ratio_den, got 5/2"),
    "gqa_mismatch": (lambda m: m, dict(key=[2, 3, 30, 16]), "query heads H = 4 must be a multiple of key heads Hkv = 3"),
    "more_candidates_than_tokens": (lambda m: m, dict(candidate_positions=[2, 31]), "M = 31 entries but there are only N = 30"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_the_build_with_a_plugin_message(loaded, case):
    edit, shape_change, needle = BAD[case]
    shapes = static_shapes()
    shapes.update(shape_change)
    m = trt_rtx.with_static_inputs(edit(model("mean")), {k: v for k, v in shapes.items()
                                                          if len(v) == len(static_shapes()[k])})
    for name, dims in shape_change.items():                      # rank changes: rewrite the input's dims
        vi = next(v for v in m.graph.input if v.name == name)
        vi.type.tensor_type.shape.Clear()
        for x in dims:
            vi.type.tensor_type.shape.dim.add().dim_value = x
    with pytest.raises(trt_rtx.TrtBuildError) as info:
        trt_rtx.build_engine_aot(m, compute_capabilities=TARGETS)
    plugin_errors = [x.message for x in info.value.messages if x.source == "stderr" and x.severity == "ERROR"]
    assert any(needle in x and x.startswith("fastv::TokenSelect plugin") for x in plugin_errors), info.value.messages
    assert needle in str(info.value)                             # the exception's text names it too


@pytest.mark.slow
def test_inconsistent_profile_fails_at_configure_time(loaded):
    profile = dynamic_profile()
    lo, opt, hi = profile["candidate_positions"]
    profile["candidate_positions"] = (lo, opt, (hi[0], 300))    # M up to 300 > N up to 256
    with pytest.raises(trt_rtx.TrtBuildError, match="M = 300 entries but there are only N = 256"):
        trt_rtx.build_engine_aot(model("last"), compute_capabilities=TARGETS, profiles=[profile])


@pytest.mark.slow
def test_dynamic_inputs_need_a_profile(loaded):
    with pytest.raises(FastVError, match="dynamic dimensions"):
        trt_rtx.build_engine_aot(model("last"), compute_capabilities=TARGETS)
    with pytest.raises(FastVError, match="offers"):
        trt_rtx.build_engine_aot(model("last"), compute_capabilities=("SM87",), profiles=[dynamic_profile()])


# ------------------------------------------------------------------ exported pre-K graphs of the presets
@pytest.mark.slow
@pytest.mark.parametrize("preset,ranking,k", [("tiny-llava", "last", 2), ("tiny-qwen2-vl", "mean", 2),
                                              ("tiny-qwen2.5-vl", "last", 2), ("tiny-qwen3-vl", "mean", 1),
                                              ("tiny-llava-onevision", "last", 2), ("tiny-internvl", "last", 2)])
def test_exported_pre_k_uses_the_plugin_and_builds_for_sm86_sm89(lib, preset, ranking, k, exported_bundle,
                                                                  model_and_adapter):
    """The real pre_k.onnx of every family (prefill shapes, empty past): one PLUGIN_V3 layer with the
    library loaded, the function body without it, and ahead-of-time engines for SM86 + SM89. Qwen3-VL
    at K = 1 (inside its two DeepStack layers): its DeepStack levels enter, level 1 leaves gathered."""
    path = exported_bundle(preset, k, "1/2", ranking)
    _, adapter = model_and_adapter(preset)
    info = adapter.decoder_shape()
    m = adapter.image_tokens_per_image()
    b, n = 1, m + (19 if preset == "tiny-llava" else 21)   # tiny-llava 83, the Qwen presets 57
    shapes = {"inputs_embeds": (b, n, info.hidden_size), "attention_mask": (b, n),
              "position_ids": (b, n) if adapter.position_rank == 2 else (3, b, n), "candidate_positions": (b, m)}
    for i in range(k):
        for t in ("key", "value"):
            shapes[f"past_key_values.{i}.{t}"] = (b, info.num_kv_heads, 0, info.head_dim)
    for level in range(adapter.deepstack_layers()):
        shapes[f"deepstack_embeds.{level}"] = (b, n, info.hidden_size)
    static = trt_rtx.with_static_inputs(onnx.load(str(path / "pre_k.onnx")), shapes)
    body = trt_rtx.parse_onnx(static)
    assert "PLUGIN_V3" not in body.layer_types
    with trt_rtx.plugin_library(lib):
        parsed = trt_rtx.parse_onnx(static)
        assert parsed.layer_types.count("PLUGIN_V3") == 1
        built = trt_rtx.build_engine_aot(static, compute_capabilities=TARGETS)
    assert built.layer_types.count("PLUGIN_V3") == 1 and len(built.engine) > 10_000
    keep = m - m // 2
    assert parsed.output_shapes["hidden_states"] == (b, n - m + keep, info.hidden_size)
    for level in range(k, adapter.deepstack_layers()):
        assert parsed.output_shapes[f"kept_deepstack_embeds.{level}"] == (b, n - m + keep, info.hidden_size)
