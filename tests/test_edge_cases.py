"""Edge cases of fastv::TokenSelect found by reading the code (issue 12), one test each, run on the CPU:
the ONNX function body in ONNX Runtime, the PyTorch reference, the plugin's host math (g++) and its C API
(g++ with host stand-ins for the two CUDA symbols it uses), plus source checks of the launcher and the
plugin's enqueue. Every test here failed before its fix (recorded in the issue's report).

- n' = 0 (every position a candidate, keep = 0): the body's final Reshape copied the input dim;
- ties must not depend on the backend's TopK tie order (TensorRT's TopK promises none);
- NaN scores rank highest, lower position first, in every implementation;
- `last` with a padded query row (right padding / an all-padding row): every score 0 in the body,
  the host math and the reference's scoring functions; apply_fastv refuses a right-padded batch;
- an all-padding row: every score 0 for every ranking that reads attention;
- C API: ratio_den = 0 no longer divides by zero; H = 0 is refused;
- the launcher checks every launch; the plugin's enqueue validates nothing and allocates nothing."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fastv_export.graphs import op
from fastv_export.graphs import token_select as ts
from fastv_export.reference import selection as ref
from tests.helpers import c_pointer as _ptr

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
SCALE = 0.25
RANK = {"last": 0, "mean": 1, "random": 2}
i64, f32 = ctypes.c_int64, ctypes.c_float
P = ctypes.POINTER
CUDA_INCLUDE = next((p for p in (os.environ.get("CUDA_HOME", "") + "/include", "/usr/local/cuda/include")
                     if p and Path(p, "cuda_runtime_api.h").is_file()), None)


# ---------------------------------------------------------------------------------------------- helpers
def _cxx() -> str:
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler (g++) is needed"
    return cxx


def _compile(out: Path, sources: list[Path], extra: list[str] = ()) -> ctypes.CDLL:
    cmd = [_cxx(), "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{PLUGINS / 'include'}", *extra,
           *map(str, sources), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return ctypes.CDLL(str(out))


C_API_SOURCES = [PLUGINS / "src" / "c_api.cpp", PLUGINS / "src" / "token_select_host.cpp",
                 PLUGINS / "tests" / "c_api_host_stub.cpp"]


@pytest.fixture(scope="module")
def c_api_lib(tmp_path_factory) -> Path:
    assert CUDA_INCLUDE is not None, ("the CUDA toolkit's headers (cuda_runtime_api.h) are needed to compile the "
                                      "C API; install the CUDA toolkit (nvcc) or set CUDA_HOME")
    out = tmp_path_factory.mktemp("edge-capi") / "libcapi.so"
    _compile(out, C_API_SOURCES, [f"-I{CUDA_INCLUDE}"])
    return out


def _c_api_call(lib: Path, body: str) -> subprocess.CompletedProcess:
    """Runs ``body`` in a fresh interpreter with ``so`` = the C API library (a crash stays there)."""
    prelude = (f"import ctypes\nso = ctypes.CDLL({str(lib)!r})\ni64 = ctypes.c_int64\n"
               "so.fastv_ts_last_error.restype = ctypes.c_char_p\n"
               "so.fastv_ts_kept_length.restype = i64\n"
               "so.fastv_ts_kept_length.argtypes = [i64, i64, ctypes.c_int32, i64, i64, i64]\n"
               "so.fastv_ts_workspace_size.restype = ctypes.c_uint64\n"
               "so.fastv_ts_workspace_size.argtypes = [ctypes.c_int32, i64, i64, i64, ctypes.POINTER(i64)]\n"
               "so.fastv_ts_run.restype = ctypes.c_int32\n"
               "so.fastv_ts_run.argtypes = [ctypes.c_int32, i64, i64, i64, ctypes.c_float, i64, ctypes.c_int32,"
               " ctypes.POINTER(i64)] + [ctypes.c_void_p] * 10 + [ctypes.c_uint64, ctypes.c_void_p]\n"
               "def dims(*v):\n    return (i64 * 10)(*v)\n")
    return subprocess.run([sys.executable, "-c", prelude + body], capture_output=True, text=True, timeout=60)




def session(ranking, num=1, den=2, keep=-1, seed=0, model=None):
    model = model or ts.make_token_select_model(ranking=ranking, ratio_num=num, ratio_den=den, keep=keep,
                                                scale=SCALE, seed=seed)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def scores_model(ranking, seed=0, keep=-1):
    """The body inlined, with its internal ``candidate_scores`` [B, M] as an extra output."""
    model = onnx.inliner.inline_local_functions(
        ts.make_token_select_model(ranking=ranking, ratio_num=1, ratio_den=2, keep=keep, scale=SCALE, seed=seed))
    name = next(o for n in model.graph.node for o in n.output if o.startswith("candidate_scores"))
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "M"]))
    return model


def make_inputs(seed, *, ranking, b=2, n=12, m=6, h=4, hkv=2, d=8, d_model=4, cand=None):
    g = torch.Generator().manual_seed(seed)
    nq = 1 if ranking == "last" else n
    if cand is None:
        cand = torch.stack([torch.sort(torch.randperm(n, generator=g)[:m]).values for _ in range(b)])
    return dict(hidden_states=torch.randn(b, n, d_model, generator=g),
                query=torch.randn(b, h, nq, d, generator=g),
                key=torch.randn(b, hkv, n, d, generator=g),
                attention_mask=torch.ones(b, n, dtype=torch.int64),
                position_ids=torch.arange(n).repeat(b, 1) + 100,
                candidate_positions=cand)


def feeds(inputs):
    return {k: v.numpy() for k, v in inputs.items()}


def ref_full_scores(ranking, inputs):
    fn = ref.score_last if ranking == "last" else ref.score_mean
    return fn(inputs["query"], inputs["key"], inputs["attention_mask"].bool(), SCALE)


def host_scores(so, ranking, inputs, seed=0):
    q = np.ascontiguousarray(inputs["query"].numpy(), dtype=np.float32)
    k = np.ascontiguousarray(inputs["key"].numpy(), dtype=np.float32)
    mask = np.ascontiguousarray(inputs["attention_mask"].numpy())
    cand = np.ascontiguousarray(inputs["candidate_positions"].numpy())
    b, h, nq, d = q.shape
    n = inputs["hidden_states"].shape[1]
    dims = np.array([b, n, h, nq, d, k.shape[1], k.shape[2], cand.shape[1]], np.int64)
    out = np.full((b, cand.shape[1]), np.nan, np.float32)
    so.fastv_host_scores(RANK[ranking], _ptr(q, f32), _ptr(k, f32), _ptr(mask, i64), _ptr(cand, i64),
                         _ptr(dims, i64), SCALE, seed, _ptr(out, f32))
    return out


def host_select(so, scores, cand, n, keep_m):
    scores = np.ascontiguousarray(scores, np.float32)
    cand = np.ascontiguousarray(cand, np.int64)
    b, m = cand.shape
    kept = np.full((b, n - m + keep_m), -7, np.int64)
    so.fastv_host_select(_ptr(scores, f32), _ptr(cand, i64), b, n, m, keep_m, _ptr(kept, i64))
    return kept


# ---------------------------------------------------------------------------------------------- n' = 0
@pytest.mark.parametrize("ranking", op.RANKINGS)
@pytest.mark.parametrize("position_rank,opset", [(2, 18), (3, 18), (2, 21)])
def test_body_with_nothing_kept_gives_empty_outputs(ranking, position_rank, opset):
    """Every position a candidate and keep = 0: N' = 0. Reshape's default allowzero=0 copied the input's
    dim for the 0 in the target shape and ORT failed ("requested shape {2,2}")."""
    inputs = make_inputs(1, ranking=ranking, b=2, n=5, m=5, cand=torch.arange(5).repeat(2, 1))
    if position_rank == 3:
        inputs["position_ids"] = torch.stack([inputs["position_ids"]] * 3)
    model = ts.make_token_select_model(ranking=ranking, ratio_num=1, ratio_den=2, keep=0, scale=SCALE,
                                       position_rank=position_rank, opset=opset)
    x, pos, kept = session(ranking, model=model).run(None, feeds(inputs))
    assert x.shape == (2, 0, 4) and kept.shape == (2, 0)
    assert pos.shape == ((3,) if position_rank == 3 else ()) + (2, 0)


# ---------------------------------------------------------------------------------------------- ties
def _reverse_topk_ties(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every TopK of the (inlined) graph replaced by one that puts the HIGHER index first among equal
    values (a legal TopK: ONNX fixes the tie order, TensorRT does not): reverse the axis, TopK, map back."""
    g = model.graph
    nodes = []
    for node in g.node:
        if node.op_type != "TopK":
            nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        x, k = node.input
        vals, idx = node.output
        tag = node.output[1] + "_rev"
        c = lambda name, v: helper.make_node("Constant", [], [f"{tag}_{name}"],  # noqa: E731
                                             value=onnx.numpy_helper.from_array(np.array(v, np.int64)))
        nodes += [c("start", [-1]), c("end", [np.iinfo(np.int64).min]), c("axes", [axis]), c("step", [-1]),
                  c("one", 1), c("axis0", [axis]),
                  helper.make_node("Slice", [x, f"{tag}_start", f"{tag}_end", f"{tag}_axes", f"{tag}_step"],
                                   [f"{tag}_x"]),
                  helper.make_node("TopK", [f"{tag}_x", k], [vals, f"{tag}_idx"],
                                   **{a.name: helper.get_attribute_value(a) for a in node.attribute}),
                  helper.make_node("Shape", [x], [f"{tag}_shape"]),
                  helper.make_node("Gather", [f"{tag}_shape", f"{tag}_axis0"], [f"{tag}_len"]),
                  helper.make_node("Sub", [f"{tag}_len", f"{tag}_one"], [f"{tag}_last"]),
                  helper.make_node("Sub", [f"{tag}_last", f"{tag}_idx"], [idx])]
    del g.node[:]
    g.node.extend(nodes)
    return model


@pytest.mark.parametrize("keep", [-1, 2, 0, 8])
def test_ties_do_not_depend_on_topk_tie_order(keep):
    """`last` with all-zero keys: every candidate scores the same; the lowest positions must win even where
    TopK returns the higher index first."""
    ranking = "last"
    inputs = make_inputs(2, ranking=ranking, n=14, m=8)
    inputs["key"] = torch.zeros_like(inputs["key"])
    m = 8
    keep_m = op.keep_count(m, 1, 2, keep)
    want = ref.select_kept(ref.candidate_scores(ranking, inputs["candidate_positions"], query=inputs["query"],
                                                key=inputs["key"], key_valid=inputs["attention_mask"].bool(),
                                                scale=SCALE), inputs["candidate_positions"], 14, keep_m).numpy()
    model = onnx.inliner.inline_local_functions(
        ts.make_token_select_model(ranking=ranking, ratio_num=1, ratio_den=2, keep=keep, scale=SCALE))
    for variant in (model, _reverse_topk_ties(model)):
        _, _, kept = session(ranking, model=variant).run(None, feeds(inputs))
        np.testing.assert_array_equal(kept, want)


def test_nan_scores_rank_highest_lower_position_first(host_math):
    """A row whose query is NaN: every score NaN. The reference (stable sort, NaN highest), the body
    and the host math all keep the lowest candidate positions; the other row is unaffected."""
    inputs = make_inputs(3, ranking="last", n=12, m=6)
    inputs["query"][1] = float("nan")
    keep_m = op.keep_count(6, 1, 2)
    cand = inputs["candidate_positions"]
    scores = ref.candidate_scores("last", cand, query=inputs["query"], key=inputs["key"],
                                  key_valid=inputs["attention_mask"].bool(), scale=SCALE)
    want = ref.select_kept(scores, cand, 12, keep_m).numpy()
    assert set(cand[1, :keep_m].tolist()) <= set(want[1].tolist())
    model = ts.make_token_select_model(ranking="last", ratio_num=1, ratio_den=2, scale=SCALE)
    for variant in (model, _reverse_topk_ties(onnx.inliner.inline_local_functions(model))):
        _, _, kept = session("last", model=variant).run(None, feeds(inputs))
        np.testing.assert_array_equal(kept, want)
    np.testing.assert_array_equal(host_select(host_math, scores.numpy(), cand.numpy(), 12, keep_m), want)


# ---------------------------------------------------------------------------------------------- padding
def _right_padded(ranking):
    """Row 0 right-padded by 3 (its last token is padding), row 1 all padding, row 2 complete."""
    inputs = make_inputs(4, ranking=ranking, b=3, n=12, m=5,
                         cand=torch.tensor([[1, 2, 4, 6, 8], [0, 3, 5, 7, 9], [2, 3, 5, 8, 11]]))
    inputs["attention_mask"][0, 9:] = 0
    inputs["attention_mask"][1, :] = 0
    return inputs


@pytest.mark.parametrize("ranking", ["last", "mean"])
def test_padded_rows_score_zero_everywhere(ranking, host_math):
    """An all-padding row (rows 1) gives every candidate score 0 in the reference (was NaN for `last`),
    the body (was 1/S for `last`) and the host math; for `last` a row whose last token is padding (row
    0, right padding) does too. Selection then keeps the lowest candidate positions there."""
    inputs = _right_padded(ranking)
    cand = inputs["candidate_positions"]
    ref_scores = torch.gather(ref_full_scores(ranking, inputs), 1, cand).numpy()
    sess = session(ranking, model=scores_model(ranking))
    *_, kept, body_scores = sess.run(None, feeds(inputs))
    mine = host_scores(host_math, ranking, inputs)
    zero_rows = [0, 1] if ranking == "last" else [1]
    for scores in (ref_scores, body_scores, mine):
        assert np.all(scores[zero_rows] == 0), scores
        assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(body_scores, ref_scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mine, ref_scores, rtol=1e-5, atol=1e-7)
    keep_m = op.keep_count(5, 1, 2)
    want = ref.select_kept(torch.from_numpy(ref_scores), cand, 12, keep_m).numpy()
    np.testing.assert_array_equal(kept, want)
    for row in zero_rows:
        assert set(cand[row, :keep_m].tolist()) <= set(kept[row].tolist())


def test_reference_refuses_last_with_right_padding(model_and_adapter):
    """apply_fastv with `last` on a right-padded batch raises FastVError at prefill (it would read a
    padding row); left padding and `mean` run."""
    from fastv_export import FastVConfig, FastVError, apply_fastv
    from fastv_export.prompts import make_prompt

    model, adapter = model_and_adapter("tiny-llava")
    p = make_prompt(adapter, [6], num_images=1, seed=1).model_inputs()
    right = dict(p)
    right["input_ids"] = torch.cat([p["input_ids"], p["input_ids"][:, -1:]], dim=1)
    right["attention_mask"] = torch.cat([p["attention_mask"], torch.zeros_like(p["attention_mask"][:, :1])], dim=1)
    with apply_fastv(model, FastVConfig(k=1, ratio="1/2", ranking="last")):
        with pytest.raises(FastVError, match="right.padd"):
            with torch.no_grad():
                model(**right, use_cache=False)
        with torch.no_grad():
            model(**p, use_cache=False)                  # no padding: fine
    with apply_fastv(model, FastVConfig(k=1, ratio="1/2", ranking="mean")):
        with torch.no_grad():
            model(**right, use_cache=False)              # mean skips padded rows


# ---------------------------------------------------------------------------------------------- C API
def test_c_api_rejects_a_zero_denominator(c_api_lib):
    """fastv_ts_kept_length / fastv_ts_workspace_size with ratio_den = 0 divided by zero (SIGFPE)."""
    proc = _c_api_call(c_api_lib, (
        "assert so.fastv_ts_kept_length(10, 4, 1, 1, 0, -1) == -1\n"
        "assert b'ratio' in so.fastv_ts_last_error(), so.fastv_ts_last_error()\n"
        "assert so.fastv_ts_kept_length(10, 4, 1, 1, 2, -1) == 8 and so.fastv_ts_last_error() == b''\n"
        "assert so.fastv_ts_kept_length(3, 4, 1, 1, 2, -1) == -1\n"
        "assert so.fastv_ts_workspace_size(1, 1, 0, -1, dims(1, 10, 4, 4, 10, 8, 2, 10, 4, 1)) == 0\n"
        "assert b'ratio' in so.fastv_ts_last_error()\n"
        "assert so.fastv_ts_workspace_size(1, 1, 2, -1, dims(1, 10, 4, 4, 10, 8, 2, 10, 4, 1)) > 0\n"
        "print('ok')\n"))
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_c_api_and_validation_reject_zero_heads(c_api_lib, host_math):
    """H = 0 passed validate_shapes (then `heads % kv_heads == 0` and a grid of 0 blocks)."""
    proc = _c_api_call(c_api_lib, (
        "rc = so.fastv_ts_run(1, 1, 2, -1, 0.1, 0, 0, dims(1, 10, 4, 0, 10, 8, 2, 10, 4, 1), *[None] * 10, 0, None)\n"
        "assert rc == 1, rc\n"
        "assert b'head' in so.fastv_ts_last_error(), so.fastv_ts_last_error()\n"
        "assert so.fastv_ts_workspace_size(1, 1, 2, -1, dims(1, 10, 4, 0, 10, 8, 2, 10, 4, 1)) == 0\n"
        "print('ok')\n"))
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    ranks = np.array([3, 4, 4, 2, 2, 2], np.int32)
    dims = np.full((6, 8), -1, np.int64)
    for i, shape in enumerate([(1, 10, 4), (1, 0, 10, 8), (1, 2, 10, 8), (1, 10), (1, 10), (1, 4)]):
        dims[i, :len(shape)] = shape
    msg = ctypes.create_string_buffer(512)
    assert host_math.fastv_host_validate(1, 1, 2, -1, 0.1, 0, _ptr(ranks, ctypes.c_int32), _ptr(dims, i64), msg,
                                         512) == 1
    assert b"head" in msg.value


# ---------------------------------------------------------------------------------------------- launch checks
def test_launcher_checks_every_launch():
    """cudaGetLastError once after all launches could blame the last kernel for an earlier failure:
    every <<<...>>> launch is followed by its own check before anything else is launched."""
    src = "\n".join(f.read_text() for f in sorted((PLUGINS / "src").glob("token_select_*.cu")))
    body = src[src.index("cudaError_t enqueue("):]
    launches = [m.end() for m in re.finditer(r">>>\(", src)]
    assert launches
    for pos in launches:
        stmt_end = src.index(";", pos)
        following = src[stmt_end:stmt_end + 200]
        assert re.search(r"^\s*;\s*\n\s*(if \(\(?err(or)? = |return |FASTV_CHECK_LAUNCH|err = check_launch)",
                         following) or "check_launch(" in following[:120], src[pos - 200:stmt_end + 200]
    assert body.count("cudaGetLastError") + src.count("check_launch(") >= len(launches)


def test_plugin_enqueue_does_not_validate_or_allocate():
    """enqueue re-validated the shapes and built std::ostringstream / std::string messages on every call:
    the checks run in configurePlugin / onShapeChange, enqueue only reads the cached shapes."""
    src = (PLUGINS / "src" / "token_select_plugin.cpp").read_text()
    start = src.index("int32_t TokenSelectPlugin::enqueue(")
    end = src.index("\n}\n", start)
    enqueue = src[start:end]
    for banned in ("check_dims", "validate_shapes", "collect_shapes", "ostringstream", "std::string", "prefix()",
                   "to_string"):
        assert banned not in enqueue, banned
    host = (PLUGINS / "src" / "token_select_host.cpp").read_text()
    for fn in ("std::string validate_shapes(", "std::string validate_attributes("):
        body = host[host.index(fn):]
        assert "ostringstream" not in body[:body.index(" if (")], f"{fn} builds a stream before finding a problem"
