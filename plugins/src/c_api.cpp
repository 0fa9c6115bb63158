// extern "C" entry points that run the op WITHOUT TensorRT, on caller-owned CUDA buffers (device
// pointers): the kernel tests drive them through ctypes with torch CUDA tensors. Also usable by a C++
// runtime that wants the selection outside an engine.
#include <cstdint>
#include <string>

#include "fastv/token_select_kernels.h"

#define FASTV_EXPORT __attribute__((visibility("default")))

namespace
{

thread_local std::string gLastError;

// dims: B, N, D, H, Nq, d, Hkv, S, M, L (L = 1 for position ids [B, N], 3 for [3, B, N])
fastv::ts::Shapes shapes_from(int64_t const* dims)
{
    fastv::ts::Shapes s;
    if (dims == nullptr)
    {
        s.batch = -1; // refused by check()
        return s;
    }
    s.batch = dims[0];
    s.n = dims[1];
    s.hidden = dims[2];
    s.heads = dims[3];
    s.nq = dims[4];
    s.head_dim = dims[5];
    s.kv_heads = dims[6];
    s.s = dims[7];
    s.m = dims[8];
    s.planes = dims[9];
    return s;
}

fastv::ts::Attributes attributes_from(int32_t ranking, int64_t ratio_num, int64_t ratio_den, int64_t keep, float scale,
    int64_t seed)
{
    fastv::ts::Attributes a;
    a.ranking = ranking;
    a.ratio_num = ratio_num;
    a.ratio_den = ratio_den;
    a.keep = keep;
    a.scale = scale;
    a.seed = seed;
    return a;
}

// "" or the problem
std::string check(fastv::ts::Attributes const& a, fastv::ts::Shapes const& s, int32_t dtype)
{
    std::string err = fastv::ts::validate_attributes(a);
    if (err.empty())
    {
        for (int64_t v : {s.batch, s.n, s.hidden, s.heads, s.nq, s.head_dim, s.kv_heads, s.s, s.m})
        {
            if (v < 0)
            {
                return "dimensions must be known (>= 0)";
            }
        }
        if (s.planes != 1 && s.planes != 3)
        {
            return "position id planes must be 1 or 3";
        }
        if (dtype < fastv::ts::kF32 || dtype > fastv::ts::kBF16)
        {
            return "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)";
        }
        err = fastv::ts::validate_shapes(a, s);
    }
    return err;
}

// f(attributes, shapes) when the attributes and dims are valid; else `fail`, with the problem in
// fastv_ts_last_error (shared by the size and layout queries below).
template <typename T, typename F>
T with_checked_args(int32_t ranking, int64_t ratio_num, int64_t ratio_den, int64_t keep, int64_t const* dims,
    T fail, F f)
{
    try
    {
        fastv::ts::Attributes const a = attributes_from(ranking, ratio_num, ratio_den, keep, 1.0f, 0);
        fastv::ts::Shapes const s = shapes_from(dims);
        std::string const err = check(a, s, fastv::ts::kF32);
        if (!err.empty())
        {
            gLastError = err;
            return fail;
        }
        gLastError.clear();
        return f(a, s);
    }
    catch (...)
    {
        gLastError = "unexpected exception";
        return fail;
    }
}

} // namespace

extern "C"
{

FASTV_EXPORT char const* fastv_ts_last_error()
{
    return gLastError.c_str();
}

// N' = N - M + keep(M) for these attributes, or -1 with the problem in fastv_ts_last_error (invalid
// attributes, e.g. ratio_den = 0, or not 0 <= M <= N).
FASTV_EXPORT int64_t fastv_ts_kept_length(int64_t n, int64_t m, int32_t ranking, int64_t ratio_num, int64_t ratio_den,
    int64_t keep)
{
    try
    {
        fastv::ts::Attributes const a = attributes_from(ranking, ratio_num, ratio_den, keep, 1.0f, 0);
        std::string err = fastv::ts::validate_attributes(a);
        if (err.empty() && (n < 0 || m < 0 || m > n))
        {
            err = "lengths must satisfy 0 <= M <= N, got N = " + std::to_string(n) + ", M = " + std::to_string(m);
        }
        if (!err.empty())
        {
            gLastError = err;
            return -1;
        }
        fastv::ts::Shapes s;
        s.n = n;
        s.m = m;
        gLastError.clear();
        return fastv::ts::kept_length(a, s);
    }
    catch (...)
    {
        gLastError = "unexpected exception";
        return -1;
    }
}

// Bytes of workspace for fastv_ts_run with these attributes and dims; 0 with the problem in
// fastv_ts_last_error when they are invalid.
FASTV_EXPORT uint64_t fastv_ts_workspace_size(int32_t ranking, int64_t ratio_num, int64_t ratio_den, int64_t keep,
    int64_t const* dims)
{
    return with_checked_args<uint64_t>(ranking, ratio_num, ratio_den, keep, dims, 0,
        [](fastv::ts::Attributes const& a, fastv::ts::Shapes const& s) { return fastv::ts::workspace_size(a, s); });
}

// Byte offset, within the workspace of fastv_ts_run (same attributes and dims), of the candidate scores
// float32 [B, M] that the run leaves there (for tests: the scores themselves, not only the selection; not
// written when N' = 0 or B = 0). UINT64_MAX with the problem in fastv_ts_last_error when invalid.
FASTV_EXPORT uint64_t fastv_ts_scores_offset(int32_t ranking, int64_t ratio_num, int64_t ratio_den, int64_t keep,
    int64_t const* dims)
{
    return with_checked_args<uint64_t>(ranking, ratio_num, ratio_den, keep, dims, UINT64_MAX,
        [](fastv::ts::Attributes const& a, fastv::ts::Shapes const& s)
        { return static_cast<uint64_t>(fastv::ts::workspace_layout(a, s).scores); });
}

// Runs TokenSelect on device buffers. Returns 0, 1 (invalid arguments) or 2 (CUDA error); see
// fastv_ts_last_error. dtype: 0 float32, 1 float16, 2 bfloat16. stream: a cudaStream_t (0 = default).
FASTV_EXPORT int32_t fastv_ts_run(int32_t ranking, int64_t ratio_num, int64_t ratio_den, int64_t keep, float scale,
    int64_t seed, int32_t dtype, int64_t const* dims, void const* hidden_states, void const* query, void const* key,
    int64_t const* attention_mask, int64_t const* position_ids, int64_t const* candidate_positions,
    void* selected_hidden_states, int64_t* selected_position_ids, int64_t* kept_indices, void* workspace,
    uint64_t workspace_bytes, void* stream)
{
    try
    {
        fastv::ts::Attributes const a = attributes_from(ranking, ratio_num, ratio_den, keep, scale, seed);
        fastv::ts::Shapes const s = shapes_from(dims);
        std::string const err = check(a, s, dtype);
        if (!err.empty())
        {
            gLastError = err;
            return 1;
        }
        fastv::ts::Buffers io;
        io.hidden_states = hidden_states;
        io.query = query;
        io.key = key;
        io.attention_mask = attention_mask;
        io.position_ids = position_ids;
        io.candidate_positions = candidate_positions;
        io.selected_hidden_states = selected_hidden_states;
        io.selected_position_ids = selected_position_ids;
        io.kept_indices = kept_indices;
        cudaError_t const status = fastv::ts::enqueue(a, s, static_cast<fastv::ts::ElementType>(dtype), io, workspace,
            static_cast<size_t>(workspace_bytes), static_cast<cudaStream_t>(stream));
        if (status != cudaSuccess)
        {
            gLastError = cudaGetErrorString(status);
            return 2;
        }
        gLastError.clear();
        return 0;
    }
    catch (...)
    {
        gLastError = "unexpected exception";
        return 1;
    }
}

} // extern "C"
