// fastv::TokenSelect, ranking `mean`: the probability each candidate's key receives, summed over every query
// row that sees it, per head, without materialising the n x n attention map (docs/token_select.md; the whole
// pipeline: token_select_kernels.cu). Two passes: the log-sum-exp of every query row, then the candidates'
// column sums (recomputing the logits); valid_rows_kernel counts the query rows whose own token is real (the
// divisor), and a row whose own token is padding adds nothing.
//   - fp16 / bf16, d <= 128, aligned tensors: the per-warp kernels of token_select_mean_warp.cu;
//   - otherwise the block-tiled row_lse_kernel and colsum_kernel here (32 x 32 logits tiles, head_dim in chunks of
//     32 through shared memory; tensor cores for fp16 / bf16, CUDA cores for fp32).
#include "token_select_device.cuh"

#include <mma.h>

namespace fastv
{
namespace ts
{
namespace detail
{
namespace
{

constexpr int kTile = 32;  // query rows and keys per logits tile
constexpr int kChunk = 32; // head_dim elements per shared-memory chunk
constexpr int kRowsPerWarp = kTile / (kThreads / 32);
constexpr int kLogitsLd = kTile + 4;       // row stride of the logits tile (a multiple of 4 floats: wmma stores)
constexpr int64_t kDirectMaxHeadDim = 256; // the gathered key tile of colsum stays under 17 KB of shared memory

// Row stride of the staged q / k chunks: wmma loads need a multiple of 8 elements (16-bit types); fp32
// rows get one float of padding against bank conflicts.
template <typename T>
struct StageLd
{
    static constexpr int value = kChunk + 8;
};
template <>
struct StageLd<float>
{
    static constexpr int value = kChunk + 1;
};

template <typename T>
struct TileSmem
{
    alignas(32) T q[kTile][StageLd<T>::value];
    alignas(32) T k[kTile][StageLd<T>::value];
    alignas(32) float logits[kTile][kLogitsLd];
    int64_t key_index[kTile]; // key j of each column, -1 = none
};

// Stages q[row0 .. row0 + 31, k0 .. k0 + 31] and k[key_index[c], k0 .. k0 + 31] (zeros where the row, the
// key or the element does not exist) and waits for the whole block.
template <typename T>
__device__ __forceinline__ void stage_chunk(
    T const* q_base, int64_t row0, int64_t row_end, T const* k_base, int64_t d, int64_t k0, TileSmem<T>& sm)
{
    for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads)
    {
        int const rr = e / kChunk;
        int const cc = e % kChunk;
        int64_t const dd = k0 + cc;
        int64_t const qrow = row0 + rr;
        sm.q[rr][cc] = (qrow < row_end && dd < d) ? q_base[qrow * d + dd] : zero_of<T>();
        int64_t const kj = sm.key_index[rr];
        sm.k[rr][cc] = (kj >= 0 && dd < d) ? k_base[kj * d + dd] : zero_of<T>();
    }
    __syncthreads();
}

// logits[r][c] = scale * q[row0 + r] . k[key_index[c]] (zero where the row or the key does not exist).
// q_base points at query[b, h, 0, 0], k_base at key[b, hkv, 0, 0]; rows of the query are < row_end.
// Products and sums in fp32 (tensor cores for fp16 / bf16, see use_mma). Ends with a barrier: logits are
// visible to the whole block.
template <typename T>
__device__ void logits_tile(
    T const* q_base, int64_t row0, int64_t row_end, T const* k_base, int64_t d, float scale, TileSmem<T>& sm)
{
    int const tid = threadIdx.x;
    if constexpr (use_mma<T>())
    {
        namespace wmma = nvcuda::wmma;
        int const warp = tid / 32;
        int const wr = (warp >> 1) & 1; // warps 0-3 own one 16 x 16 quarter of the tile each
        int const wc = warp & 1;
        constexpr int ld = StageLd<T>::value;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int64_t k0 = 0; k0 < d; k0 += kChunk)
        {
            stage_chunk(q_base, row0, row_end, k_base, d, k0, sm);
            if (warp < 4)
            {
#pragma unroll
                for (int kk = 0; kk < kChunk; kk += 16)
                {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                    wmma::load_matrix_sync(fa, &sm.q[wr * 16][kk], ld);
                    wmma::load_matrix_sync(fb, &sm.k[wc * 16][kk], ld);
                    wmma::mma_sync(acc, fa, fb, acc);
                }
            }
            __syncthreads();
        }
        if (warp < 4)
        {
#pragma unroll
            for (int t = 0; t < acc.num_elements; ++t)
            {
                acc.x[t] *= scale;
            }
            wmma::store_matrix_sync(&sm.logits[wr * 16][wc * 16], acc, kLogitsLd, wmma::mem_row_major);
        }
        __syncthreads();
    }
    else
    {
        int const r = tid / 8;
        int const c0 = tid % 8;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t k0 = 0; k0 < d; k0 += kChunk)
        {
            stage_chunk(q_base, row0, row_end, k_base, d, k0, sm);
#pragma unroll 8
            for (int cc = 0; cc < kChunk; ++cc)
            {
                float const qv = to_f32(sm.q[r][cc]);
#pragma unroll
                for (int t = 0; t < 4; ++t)
                {
                    acc[t] = fmaf(qv, to_f32(sm.k[c0 + 8 * t][cc]), acc[t]);
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int t = 0; t < 4; ++t)
        {
            sm.logits[r][c0 + 8 * t] = acc[t] * scale;
        }
        __syncthreads();
    }
}

// The same logits tile as logits_tile for a FULL tile on tensor cores, the fragments read straight from
// memory: a = 32 query rows (row-major, lda elements apart), b = 32 keys (row-major [key][d], ldb apart).
// Needs d % 16 == 0, lda and ldb multiples of 8 and 32-byte aligned rows (AttnArgs::direct). Starts with a
// barrier (the previous tile's logits are read by then) and ends with one.
template <typename T>
__device__ void logits_tile_direct(T const* a_ptr, int64_t lda, T const* b_ptr, int64_t ldb, int64_t d, float scale,
    TileSmem<T>& sm)
{
    __syncthreads();
    if constexpr (use_mma<T>())
    {
        namespace wmma = nvcuda::wmma;
        int const warp = threadIdx.x / 32;
        if (warp < 4)
        {
            int const wr = (warp >> 1) & 1;
            int const wc = warp & 1;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            T const* a_rows = a_ptr + wr * 16 * lda;
            T const* b_rows = b_ptr + wc * 16 * ldb;
            for (int64_t kk = 0; kk < d; kk += 16)
            {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                wmma::load_matrix_sync(fa, a_rows + kk, static_cast<unsigned>(lda));
                wmma::load_matrix_sync(fb, b_rows + kk, static_cast<unsigned>(ldb));
                wmma::mma_sync(acc, fa, fb, acc);
            }
#pragma unroll
            for (int t = 0; t < acc.num_elements; ++t)
            {
                acc.x[t] *= scale;
            }
            wmma::store_matrix_sync(&sm.logits[wr * 16][wc * 16], acc, kLogitsLd, wmma::mem_row_major);
        }
    }
    __syncthreads();
}


// grid (ceil(rows / 32), H, B): lse[b, h, r] of every query row used.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_lse_kernel(
    T const* __restrict__ query, T const* __restrict__ key, int64_t const* __restrict__ mask, float* __restrict__ lse,
    AttnArgs a)
{
    __shared__ TileSmem<T> sm;
    __shared__ float row_m[kTile];
    __shared__ float row_l[kTile];
    int64_t const b = blockIdx.z;
    int64_t const h = blockIdx.y;
    int64_t const hkv = kv_head_of(h, a.heads, a.kv_heads);
    int64_t const row0 = a.row_base + int64_t{blockIdx.x} * kTile;
    int64_t const row_end = a.row_base + a.rows;
    T const* q_base = query + (b * a.heads + h) * a.nq * a.d;
    T const* k_base = key + (b * a.kv_heads + hkv) * a.s * a.d;
    int64_t const* mask_b = mask + b * a.s;
    int const tid = threadIdx.x;
    int const warp = tid / 32;
    int const lane = tid % 32;
    if (tid < kTile)
    {
        softmax_init(row_m[tid], row_l[tid]);
    }
    int64_t const last_row = (row0 + kTile < row_end ? row0 + kTile : row_end) - 1;
    int64_t const key_limit = row_position(a.s, a.nq, last_row) + 1; // causal bound of the tile
    for (int64_t j0 = 0; j0 < key_limit; j0 += kTile)
    {
        if (tid < kTile)
        {
            sm.key_index[tid] = j0 + tid < key_limit ? j0 + tid : -1;
        }
        __syncthreads();
        if (use_mma<T>() && a.direct && row0 + kTile <= row_end && j0 + kTile <= a.s)
        {
            logits_tile_direct(q_base + row0 * a.d, a.d, k_base + j0 * a.d, a.d, a.d, a.scale, sm);
        }
        else
        {
            logits_tile(q_base, row0, row_end, k_base, a.d, a.scale, sm);
        }
        int64_t const j = j0 + lane;
        bool const key_real = j < a.s && mask_b[j] != 0;
        for (int rr = 0; rr < kRowsPerWarp; ++rr)
        {
            int const r = warp * kRowsPerWarp + rr;
            int64_t const qrow = row0 + r;
            if (qrow >= row_end)
            {
                break; // uniform across the warp
            }
            bool const vis = key_visible(j, row_position(a.s, a.nq, qrow), key_real);
            float const x = vis ? sm.logits[r][lane] : -INFINITY;
            float const tile_max = warp_max(x);
            float const e = (vis && tile_max != -INFINITY) ? expf(x - tile_max) : 0.0f;
            float const tile_sum = warp_sum(e);
            if (lane == 0)
            {
                softmax_merge(row_m[r], row_l[r], tile_max, tile_sum);
            }
        }
        __syncthreads();
    }
    if (tid < kTile && row0 + tid < row_end)
    {
        lse[(b * a.heads + h) * a.rows + (row0 - a.row_base) + tid] = softmax_lse(row_m[tid], row_l[tid]);
    }
}

// grid (B): number of query rows whose own token is real (mean's divisor before max(1, .)).
__global__ void valid_rows_kernel(int64_t const* __restrict__ mask, int32_t* __restrict__ valid_rows, int64_t s,
    int64_t nq)
{
    __shared__ int32_t partial[kThreads / 32];
    int64_t const b = blockIdx.x;
    int32_t count = 0;
    for (int64_t r = threadIdx.x; r < nq; r += blockDim.x)
    {
        count += mask[b * s + row_position(s, nq, r)] != 0 ? 1 : 0;
    }
    for (int o = 16; o > 0; o >>= 1)
    {
        count += __shfl_xor_sync(0xFFFFFFFFu, count, o);
    }
    if (threadIdx.x % 32 == 0)
    {
        partial[threadIdx.x / 32] = count;
    }
    __syncthreads();
    if (threadIdx.x == 0)
    {
        int32_t total = 0;
        for (int w = 0; w < kThreads / 32; ++w)
        {
            total += partial[w];
        }
        valid_rows[b] = total;
    }
}

// grid (ceil(M / 32), H, B): colsum[b, h, i] = sum over the query rows r that see candidate i's key of
// p[b, h, r, key(i)] (rows whose own token is padding skipped for mean).
template <typename T>
__global__ void __launch_bounds__(kThreads) colsum_kernel(T const* __restrict__ query, T const* __restrict__ key,
    int64_t const* __restrict__ mask, int64_t const* __restrict__ cand, float const* __restrict__ lse,
    float* __restrict__ colsum, AttnArgs a)
{
    __shared__ TileSmem<T> sm;
    __shared__ float partial[kThreads / kTile][kTile];
    __shared__ int64_t first_row;
    int64_t const b = blockIdx.z;
    int64_t const h = blockIdx.y;
    int64_t const hkv = kv_head_of(h, a.heads, a.kv_heads);
    int64_t const i0 = int64_t{blockIdx.x} * kTile;
    int64_t const past = a.s - a.n;
    int64_t const row_end = a.row_base + a.rows;
    T const* q_base = query + (b * a.heads + h) * a.nq * a.d;
    T const* k_base = key + (b * a.kv_heads + hkv) * a.s * a.d;
    int64_t const* mask_b = mask + b * a.s;
    float const* lse_bh = lse + (b * a.heads + h) * a.rows;
    int const tid = threadIdx.x;
    int const group = tid / kTile; // rows group*4 .. group*4+3 of each tile
    int const col = tid % kTile;
    if (tid < kTile)
    {
        int64_t const i = i0 + tid;
        int64_t j = -1;
        if (i < a.m)
        {
            int64_t const c = cand[b * a.m + i];
            j = (c >= 0 && c < a.n) ? past + c : -1; // malformed positions: no key (the row is poisoned later)
        }
        sm.key_index[tid] = j;
    }
    __syncthreads();
    if (tid == 0)
    {
        // the first query row that can see any key of this tile (causal: row position >= j)
        int64_t jmin = a.s;
        for (int c = 0; c < kTile; ++c)
        {
            if (sm.key_index[c] >= 0 && sm.key_index[c] < jmin)
            {
                jmin = sm.key_index[c];
            }
        }
        int64_t const r = jmin - (a.s - a.nq);
        first_row = r > a.row_base ? r : a.row_base;
    }
    __syncthreads();
    // direct: the tile's candidate keys, gathered once into dynamic shared memory ([32][d + 8], zeros for
    // missing keys), read as the b fragments of every full row tile
    extern __shared__ __align__(32) unsigned char dynamic_smem[];
    T* kfix = reinterpret_cast<T*>(dynamic_smem);
    int64_t const ld_fix = a.d + 8;
    if (use_mma<T>() && a.direct)
    {
        for (int64_t e = tid; e < kTile * a.d; e += kThreads)
        {
            int64_t const c = e / a.d;
            int64_t const dd = e % a.d;
            int64_t const kj = sm.key_index[c];
            kfix[c * ld_fix + dd] = kj >= 0 ? k_base[kj * a.d + dd] : zero_of<T>();
        }
    }
    int64_t const j = sm.key_index[col];
    bool const key_real = j >= 0 && mask_b[j] != 0;
    float acc = 0.0f;
    for (int64_t row0 = first_row; row0 < row_end; row0 += kTile)
    {
        if (use_mma<T>() && a.direct && row0 + kTile <= row_end)
        {
            logits_tile_direct(q_base + row0 * a.d, a.d, kfix, ld_fix, a.d, a.scale, sm);
        }
        else
        {
            logits_tile(q_base, row0, row_end, k_base, a.d, a.scale, sm);
        }
        for (int rr = 0; rr < kTile / (kThreads / kTile); ++rr)
        {
            int const r = group * (kTile / (kThreads / kTile)) + rr;
            int64_t const qrow = row0 + r;
            if (qrow >= row_end || !key_real)
            {
                continue;
            }
            int64_t const pos = row_position(a.s, a.nq, qrow);
            bool const row_ok = !a.rows_masked || mask_b[pos] != 0;
            if (row_ok && key_visible(j, pos, key_real))
            {
                acc += prob_from_lse(sm.logits[r][col], lse_bh[qrow - a.row_base]);
            }
        }
    }
    partial[group][col] = acc;
    __syncthreads();
    if (tid < kTile && i0 + tid < a.m)
    {
        float total = 0.0f;
        for (int g = 0; g < kThreads / kTile; ++g)
        {
            total += partial[g][tid];
        }
        colsum[(b * a.heads + h) * a.m + i0 + tid] = total;
    }
}

template <typename T>
cudaError_t launch_mean_tiled(AttnArgs const& a, Buffers const& io, AttnScratch const& w, cudaStream_t stream)
{
    T const* q = static_cast<T const*>(io.query);
    T const* k = static_cast<T const*>(io.key);
    size_t const kfix_bytes = a.direct ? static_cast<size_t>(kTile * (a.d + 8)) * sizeof(T) : 0;
    dim3 const row_grid(static_cast<unsigned>(ceil_div(a.rows, kTile)), static_cast<unsigned>(a.heads),
        static_cast<unsigned>(a.batch));
    row_lse_kernel<T><<<row_grid, kThreads, 0, stream>>>(q, k, io.attention_mask, w.lse, a);
    cudaError_t err;
    if ((err = check_launch()) != cudaSuccess)
    {
        return err;
    }
    dim3 const col_grid(static_cast<unsigned>(ceil_div(a.m, kTile)), static_cast<unsigned>(a.heads),
        static_cast<unsigned>(a.batch));
    colsum_kernel<T><<<col_grid, kThreads, kfix_bytes, stream>>>(
        q, k, io.attention_mask, io.candidate_positions, w.lse, w.colsum, a);
    return check_launch();
}

} // namespace

cudaError_t launch_mean(ElementType type, AttnArgs a, Buffers const& io, AttnScratch const& w, cudaStream_t stream)
{
    valid_rows_kernel<<<static_cast<unsigned>(a.batch), kThreads, 0, stream>>>(
        io.attention_mask, w.valid_rows, a.s, a.nq);
    cudaError_t const err = check_launch();
    if (err != cudaSuccess)
    {
        return err;
    }
    // tensor cores read full tiles' fragments straight from memory when the layout allows it
    bool const aligned = reinterpret_cast<uintptr_t>(io.query) % 32 == 0 && reinterpret_cast<uintptr_t>(io.key) % 32 == 0;
    a.direct = type != kF32 && aligned && a.d % 16 == 0 && a.d <= kDirectMaxHeadDim;
    if (mean_warp_ok(type, a))
    {
        return launch_mean_warp(type, a, io, w, stream);
    }
    switch (type)
    {
    case kF32: return launch_mean_tiled<float>(a, io, w, stream);
    case kF16: return launch_mean_tiled<__half>(a, io, w, stream);
    case kBF16: return launch_mean_tiled<__nv_bfloat16>(a, io, w, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace detail
} // namespace ts
} // namespace fastv
