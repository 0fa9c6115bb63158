"""The TokenSelect CUDA kernels on a GPU, through the library's extern "C" entry point ``fastv_ts_run``
(ctypes, torch CUDA buffers), against the ONNX function body run by ONNX Runtime (CPU) and the PyTorch
reference. Skipped on machines without an NVIDIA GPU.

The library is built for the GPU at hand (its compute capability), in its own build folder (the
``plugin_build`` fixture of tests/conftest.py)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from onnx import TensorProto

from fastv_export.reference import selection as ref
from fastv_export.graphs import op
from fastv_export.graphs import token_select as ts


def _has_gpu() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:                                            # noqa: BLE001 - no driver, no GPU
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")]

RANK = {"last": 0, "mean": 1, "random": 2}
DTYPE = {"fp32": (torch.float32, 0), "fp16": (torch.float16, 1), "bf16": (torch.bfloat16, 2)}
SCALE = 0.125
POISON_INT = -12345
i64 = ctypes.c_int64


@pytest.fixture(scope="module")
def kernels(plugin_build):
    """The library's entry points (ctypes), built for this GPU's compute capability."""
    major, minor = torch.cuda.get_device_capability()
    lib = plugin_build(f"{major}{minor}")
    so = ctypes.CDLL(str(lib))
    so.fastv_ts_last_error.restype = ctypes.c_char_p
    so.fastv_ts_kept_length.restype = i64
    so.fastv_ts_kept_length.argtypes = [i64, i64, ctypes.c_int32, i64, i64, i64]
    so.fastv_ts_workspace_size.restype = ctypes.c_uint64
    so.fastv_ts_workspace_size.argtypes = [ctypes.c_int32, i64, i64, i64, ctypes.POINTER(i64)]
    so.fastv_ts_run.restype = ctypes.c_int32
    so.fastv_ts_run.argtypes = [ctypes.c_int32, i64, i64, i64, ctypes.c_float, i64, ctypes.c_int32,
                                ctypes.POINTER(i64)] + [ctypes.c_void_p] * 10 + [ctypes.c_uint64, ctypes.c_void_p]
    return so


def make_inputs(seed, *, ranking, dtype=torch.float32, b=2, n=64, m=30, d_model=16, h=4, hkv=2, head_dim=64,
                past=0, pads=None, position_rank=2):
    g = torch.Generator().manual_seed(seed)
    s = past + n
    nq = 1 if ranking == "last" else n
    inputs = dict(hidden_states=torch.randn(b, n, d_model, generator=g).to(dtype),
                  query=torch.randn(b, h, nq, head_dim, generator=g).to(dtype),
                  key=torch.randn(b, hkv, s, head_dim, generator=g).to(dtype))
    mask = torch.ones(b, s, dtype=torch.int64)
    pads = pads or [0] * b
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    cand = [torch.sort(torch.arange(max(0, pads[i] - past), n)[
        torch.randperm(n - max(0, pads[i] - past), generator=g)[:m]]).values for i in range(b)]
    pos = torch.arange(n).repeat(b, 1) + 1000 * torch.arange(b)[:, None]
    if position_rank == 3:
        pos = torch.stack([pos, pos + 7, pos + 11])
    inputs.update(attention_mask=mask, position_ids=pos,
                  candidate_positions=torch.stack(cand) if m else torch.zeros(b, 0, dtype=torch.int64))
    return inputs


def prepare(so, inputs, *, ranking, num, den, keep=-1, seed=0):
    """CUDA copies of ``inputs``, poisoned outputs and workspace, and a ``launch()`` that runs fastv_ts_run
    (of the library ``so``) on the current stream (asynchronously). Returns (launch, (out_x, out_pos, out_kept))."""
    dev = {k: v.cuda().contiguous() for k, v in inputs.items()}
    x, q, k = dev["hidden_states"], dev["query"], dev["key"]
    b, n, d_model = x.shape
    planes = 3 if dev["position_ids"].dim() == 3 else 1
    m = dev["candidate_positions"].shape[1]
    dims = np.array([b, n, d_model, q.shape[1], q.shape[2], q.shape[3], k.shape[1], k.shape[2], m, planes], np.int64)
    dims_p = dims.ctypes.data_as(ctypes.POINTER(i64))
    n_kept = so.fastv_ts_kept_length(n, m, RANK[ranking], num, den, keep)
    out_x = torch.full((b, n_kept, d_model), float("nan"), dtype=x.dtype, device="cuda")
    out_pos = torch.full(((3,) if planes == 3 else ()) + (b, n_kept), POISON_INT, dtype=torch.int64, device="cuda")
    out_kept = torch.full((b, n_kept), POISON_INT, dtype=torch.int64, device="cuda")
    ws_bytes = so.fastv_ts_workspace_size(RANK[ranking], num, den, keep, dims_p)
    ws = torch.full((max(1, ws_bytes),), 0xFF, dtype=torch.uint8, device="cuda")        # poisoned scratch
    dtype_code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]

    def launch():
        rc = so.fastv_ts_run(RANK[ranking], num, den, keep, SCALE, seed, dtype_code, dims_p, x.data_ptr(),
                             q.data_ptr(), k.data_ptr(), dev["attention_mask"].data_ptr(),
                             dev["position_ids"].data_ptr(), dev["candidate_positions"].data_ptr(), out_x.data_ptr(),
                             out_pos.data_ptr(), out_kept.data_ptr(), ws.data_ptr(), ws_bytes,
                             torch.cuda.current_stream().cuda_stream)
        assert rc == 0, so.fastv_ts_last_error()

    launch.keepalive = (dev, dims, ws)
    return launch, (out_x, out_pos, out_kept)


def run_plugin(so, inputs, *, ranking, num, den, keep=-1, seed=0):
    launch, outs = prepare(so, inputs, ranking=ranking, num=num, den=den, keep=keep, seed=seed)
    launch()
    torch.cuda.synchronize()
    return tuple(t.cpu() for t in outs)


def ort_session(ranking, num, den, keep, seed, position_rank):
    import onnxruntime as ort
    model = ts.make_token_select_model(ranking=ranking, ratio_num=num, ratio_den=den, keep=keep, scale=SCALE,
                                       seed=seed, dtype=TensorProto.FLOAT, position_rank=position_rank)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_ort(inputs, *, ranking, num, den, keep=-1, seed=0):
    """The function body in fp32 on the same values (fp16/bf16 inputs upcast exactly: the body casts to
    float32 first), so its kept indices are the reference selection."""
    feeds = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in inputs.items()}
    sess = ort_session(ranking, num, den, keep, seed, inputs["position_ids"].dim())
    return sess.run(None, feeds)


def ref_scores(inputs, ranking, seed=0):
    cand = inputs["candidate_positions"]
    if ranking == "random":
        return ref.random_scores(cand, seed)
    q, k = inputs["query"].float().cuda(), inputs["key"].float().cuda()
    valid = inputs["attention_mask"].bool().cuda()
    full = (ref.score_last if ranking == "last" else ref.score_mean)(q, k, valid, SCALE).cpu()
    return torch.gather(full, 1, cand + (k.shape[2] - inputs["hidden_states"].shape[1]))


def assert_kept(kept, kept_want, scores, cand, keep_m, tol):
    """Equal, except swaps of candidates whose reference scores lie within ``tol`` of the cut-off."""
    kept, kept_want = np.asarray(kept), np.asarray(kept_want)
    assert kept.shape == kept_want.shape
    for row in range(kept.shape[0]):
        assert np.all(np.diff(kept[row]) > 0)
        if np.array_equal(kept[row], kept_want[row]):
            continue
        by_pos = dict(zip(cand[row].tolist(), scores[row].tolist()))
        cutoff = sorted(by_pos.values(), reverse=True)[keep_m - 1]
        for p in set(kept[row].tolist()) ^ set(kept_want[row].tolist()):
            assert p in by_pos and abs(by_pos[p] - cutoff) <= tol, (row, p)


def check(inputs, outs, kept_want, ranking, keep_m, seed=0, tol=2e-6):
    out_x, out_pos, out_kept = outs
    kept = out_kept.numpy()
    assert (kept != POISON_INT).all() and not torch.isnan(out_x.float()).any()       # every element written
    assert_kept(kept, kept_want, ref_scores(inputs, ranking, seed).numpy(), inputs["candidate_positions"], keep_m, tol)
    idx = torch.from_numpy(kept)
    x = inputs["hidden_states"]
    assert torch.equal(out_x, torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2])))   # bit-exact
    pos = inputs["position_ids"]
    want_pos = torch.gather(pos, -1, idx.expand(pos.shape[:-1] + idx.shape[-1:]) if pos.dim() == 3 else idx)
    assert torch.equal(out_pos, want_pos)


def keep_count(m, num, den, keep=-1):
    return op.keep_count(m, num, den, keep)


# ---------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("dtype", list(DTYPE))
@pytest.mark.parametrize("ranking", ["last", "mean", "random"])
@pytest.mark.parametrize("num,den,keep", [(1, 2, -1), (2, 3, -1), (3, 7, -1), (4, 9, -1), (1, 2, 5)])
def test_small_cases_match_the_function_body(kernels, ranking, dtype, num, den, keep):
    inputs = make_inputs(num * 10 + den, ranking=ranking, dtype=DTYPE[dtype][0], b=3, n=70, m=33, past=5,
                         pads=[0, 4, 9], position_rank=3 if ranking == "mean" else 2)
    keep_m = keep_count(33, num, den, keep)
    outs = run_plugin(kernels, inputs, ranking=ranking, num=num, den=den, keep=keep, seed=7)
    _, _, kept_ort = run_ort(inputs, ranking=ranking, num=num, den=den, keep=keep, seed=7)
    check(inputs, outs, kept_ort, ranking, keep_m, seed=7)


@pytest.mark.parametrize("dtype", list(DTYPE))
@pytest.mark.parametrize("ranking,n,m", [("last", 8192, 4096), ("random", 8192, 4096), ("mean", 2048, 1024)])
def test_large_cases_match_the_function_body(kernels, ranking, n, m, dtype):
    inputs = make_inputs(n + m, ranking=ranking, dtype=DTYPE[dtype][0], b=1, n=n, m=m, h=4, hkv=1, head_dim=64)
    keep_m = keep_count(m, 3, 4)
    outs = run_plugin(kernels, inputs, ranking=ranking, num=3, den=4)
    _, _, kept_ort = run_ort(inputs, ranking=ranking, num=3, den=4)
    check(inputs, outs, kept_ort, ranking, keep_m, tol=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPE))
def test_mean_at_8192_matches_the_chunked_reference(kernels, dtype):
    """n = 8192, M = 4096 for `mean`: the n x n function body is too large for ORT on the host, so the
    chunked PyTorch reference (O(chunk x S) memory, on the GPU in float32) gives the selection."""
    inputs = make_inputs(8192, ranking="mean", dtype=DTYPE[dtype][0], b=1, n=8192, m=4096, h=4, hkv=2, head_dim=64)
    keep_m = keep_count(4096, 1, 2)
    outs = run_plugin(kernels, inputs, ranking="mean", num=1, den=2)
    scores = ref_scores(inputs, "mean")
    kept_want = ref.select_kept(scores, inputs["candidate_positions"], 8192, keep_m)
    check(inputs, outs, kept_want.numpy(), "mean", keep_m, tol=1e-7)


@pytest.mark.parametrize("ranking", ["last", "mean", "random"])
def test_no_candidates_is_the_identity(kernels, ranking):
    inputs = make_inputs(3, ranking=ranking, m=0, position_rank=3)
    out_x, out_pos, out_kept = run_plugin(kernels, inputs, ranking=ranking, num=1, den=2)
    assert torch.equal(out_kept, torch.arange(64).repeat(2, 1))
    assert torch.equal(out_x, inputs["hidden_states"]) and torch.equal(out_pos, inputs["position_ids"])


def test_exact_ties_keep_the_lowest_positions(kernels):
    inputs = make_inputs(4, ranking="last", m=20)
    inputs["key"] = torch.zeros_like(inputs["key"])
    _, _, kept = run_plugin(kernels, inputs, ranking="last", num=1, den=2)
    want = ref.select_kept(ref_scores(inputs, "last"), inputs["candidate_positions"], 64, 10)
    assert torch.equal(kept, want)


def test_malformed_candidates_poison_only_their_row(kernels):
    inputs = make_inputs(5, ranking="random", m=10)
    inputs["candidate_positions"][1, 3] = inputs["candidate_positions"][1, 2]      # duplicate
    out_x, out_pos, out_kept = run_plugin(kernels, inputs, ranking="random", num=1, den=2)
    assert (out_kept[1] == -1).all() and (out_pos[1] == -1).all() and torch.isnan(out_x[1]).all()
    assert (out_kept[0] >= 0).all()


# ---------------------------------------------------------------------------------------------- timing
def _cuda_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def test_timing_table_vs_naive_torch_softmax(kernels, capsys):
    """Median milliseconds of the whole op (mean ranking, fp16, H=32, Hkv=8, d=128) vs a naive PyTorch
    scoring that materialises the n x n softmax. Printed, not asserted (hardware dependent)."""
    rows = []
    for n in (1024, 4096, 8192):
        inputs = make_inputs(n, ranking="mean", dtype=torch.float16, b=1, n=n, m=n // 2, h=32, hkv=8, head_dim=128)
        q, k = inputs["query"].cuda(), inputs["key"].cuda().repeat_interleave(4, dim=1)
        causal = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()

        def naive():
            logits = (q.float() @ k.float().transpose(-1, -2)) * SCALE
            return torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).sum(2).mean(1)

        launch, _ = prepare(kernels, inputs, ranking="mean", num=1, den=2)
        plugin_ms = _cuda_ms(launch)
        naive_ms = _cuda_ms(naive)
        rows.append((n, plugin_ms, naive_ms))
    with capsys.disabled():
        print("\n   n | TokenSelect mean, whole op (ms) | naive torch softmax scores (ms)")
        for n, p, nv in rows:
            print(f"{n:5d} | {p:31.2f} | {nv:31.2f}")
    assert all(np.isfinite([p, nv]).all() for _, p, nv in rows)
