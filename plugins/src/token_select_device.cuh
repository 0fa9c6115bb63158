// fastv::TokenSelect: what the kernel files share (plugins/src/token_select_*.cu): device helpers, the
// arguments and workspace scratch of the attention passes, and the launchers of the two attention rankings.
// Internal to the kernels; the public interface is fastv/token_select_kernels.h.
#ifndef FASTV_TS_DEVICE_CUH
#define FASTV_TS_DEVICE_CUH

#include "fastv/token_select_kernels.h"
#include "fastv/token_select_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fastv
{
namespace ts
{
namespace detail
{

constexpr int kThreads = 256; // threads of the block-wide kernels (8 warps)

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half v)
{
    return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
    {
        v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    }
    return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
    {
        v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    }
    return v;
}

template <typename T>
__device__ __forceinline__ T zero_of()
{
    return T(0.0f);
}

// Tensor cores for this element type on the architecture being compiled: fp16 from sm_70, bf16 from
// sm_80 (16 x 16 x 16 fragments, fp32 accumulation). fp32 inputs always use CUDA cores (TF32 would round
// the inputs).
template <typename T>
__device__ constexpr bool use_mma()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    return std::is_same<T, __half>::value;
#else
    return false;
#endif
}

struct AttnArgs
{
    int64_t batch, heads, kv_heads, nq, s, n, d, m;
    int64_t row_base; // first query row used (Nq - 1 for last, 0 for mean)
    int64_t rows;     // query rows used (1 for last, Nq for mean)
    bool rows_masked; // a row whose own token is padding adds nothing (mean: skipped; last: every score 0)
    bool direct;      // mean on tensor cores: full tiles read their fragments straight from memory (see below)
    float scale;
};

// Where the attention passes keep their results in the workspace (token_select_host.h, WorkspaceLayout).
struct AttnScratch
{
    float* lse;
    float* colsum;
    float* logits;   // last only
    float* partials; // last only
    int32_t* valid_rows;
};

inline int64_t ceil_div(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

// The error of the launch just made (each launch is checked on its own, so an error is never blamed on a
// later kernel).
inline cudaError_t check_launch()
{
    return cudaGetLastError();
}

// colsum[b, h, i] (and what it needs) for `last` (token_select_last.cu) and `mean` (token_select_mean.cu): the
// probability each candidate's key receives, per head, from the query rows the ranking reads.
cudaError_t launch_last(ElementType type, AttnArgs const& a, Buffers const& io, AttnScratch const& w,
    cudaStream_t stream);
cudaError_t launch_mean(ElementType type, AttnArgs a, Buffers const& io, AttnScratch const& w, cudaStream_t stream);

// The per-warp `mean` passes (token_select_mean_warp.cu): whether they can run this call (AttnArgs::direct
// set), and the launch of both passes.
bool mean_warp_ok(ElementType type, AttnArgs const& a);
cudaError_t launch_mean_warp(ElementType type, AttnArgs const& a, Buffers const& io, AttnScratch const& w,
    cudaStream_t stream);

} // namespace detail
} // namespace ts
} // namespace fastv

#endif // FASTV_TS_DEVICE_CUH
