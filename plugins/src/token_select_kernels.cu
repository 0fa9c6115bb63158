// fastv::TokenSelect: CUDA kernels and their launcher (docs/token_select.md).
//
// Pipeline for one call (everything on `stream`, scratch in the caller's workspace, nothing allocated):
//   last (one query row, split over the keys):
//   1. last_logits_kernel  blocks of kLastKeysPerBlock keys per (batch, head): one warp per key computes
//                          the scaled logit of the last query row, kept in the workspace; each block
//                          leaves the softmax state (max, sum) of its keys.
//   2. last_colsum_kernel  merges the blocks' states into the row's log-sum-exp (fixed order) and gives
//                          each CANDIDATE key its probability; a padded last token gives every score 0,
//                          as in the reference and the function body.
//   mean (every query row): for fp16 / bf16 with d <= 128 and aligned tensors, row_lse_flash_kernel and
//   colsum_flash_kernel (below: one warp per 16 rows / 16 candidate keys, its operand held in registers as
//   tensor-core fragments, fp32 accumulation, no block barriers); otherwise the block-tiled kernels (32 x 32
//   logits tiles, head_dim in chunks of 32 through shared memory; tensor cores for fp16 / bf16, CUDA cores
//   for fp32). Both do:
//   1. row_lse_kernel   log-sum-exp of every query row, streaming over key tiles: the n x n attention map
//                       is never materialised.
//   2. valid_rows_kernel number of query rows whose own token is real.
//   3. colsum_kernel    probability received by each CANDIDATE key, summed over the query rows that see it
//                       (recomputing the logits tile by tile), per head; a row whose own token is padding
//                       adds nothing.
//   4. scores_kernel    candidate score: mean over heads (divided by the valid rows for mean), or the
//                       seeded hash for random.
//   5. rank_kernel      rank of every candidate (how many candidates rank before it: higher score, or
//                       equal score at a lower position, one 64-bit key compare), counted over slices of
//                       kRankSlice candidates in parallel; mark_kernel: kept iff rank < keep(M).
//   6. compact_kernel   block-wide prefix sum over the marks: kept positions in ascending order.
//   7. gather_kernel    rows of hidden states and position ids (all L planes) at the kept positions.
// Every launch is checked on its own (cudaGetLastError right after it).
// All per-element arithmetic lives in fastv/token_select_math.h (tested on the CPU); sums over rows,
// key tiles and heads run in a fixed order, so results are deterministic.
#include "fastv/token_select_kernels.h"
#include "fastv/token_select_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace fastv
{
namespace ts
{
namespace
{

constexpr int kTile = 32;     // query rows and keys per logits tile
constexpr int kChunk = 32;    // head_dim elements per shared-memory chunk
constexpr int kThreads = 256; // threads of the tiled kernels (8 warps)
constexpr int kRowsPerWarp = kTile / (kThreads / 32);
constexpr int kLogitsLd = kTile + 4; // row stride of the logits tile (a multiple of 4 floats: wmma stores)
constexpr int kScanThreads = 512;
constexpr int kGatherThreads = 128;
constexpr int kLastWarps = static_cast<int>(kLastKeysPerBlock / 32);
constexpr int64_t kDirectMaxHeadDim = 256; // the gathered key tile of colsum stays under 17 KB of shared memory

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

struct AttnArgs
{
    int64_t batch, heads, kv_heads, nq, s, n, d, m;
    int64_t row_base; // first query row used (Nq - 1 for last, 0 for mean)
    int64_t rows;     // query rows used (1 for last, Nq for mean)
    bool rows_masked; // a row whose own token is padding adds nothing (mean: skipped; last: every score 0)
    bool direct;      // mean on tensor cores: full tiles read their fragments straight from memory (see below)
    float scale;
};

// grid (P = ceil(S / kLastKeysPerBlock), H, B), kLastKeysPerBlock threads, d floats of dynamic shared
// memory: logits[b, h, j] = scale * q[b, h, Nq - 1] . k[b, kv(h), j] for this block's keys (-inf where the
// key is padding), and partials[b, h, p] = (max, sum of exp(x - max)) over them. One warp per key: the
// lanes split head_dim, a butterfly sum; warps take the block's keys in turn.
template <typename T>
__global__ void __launch_bounds__(kLastKeysPerBlock) last_logits_kernel(T const* __restrict__ query,
    T const* __restrict__ key, int64_t const* __restrict__ mask, float* __restrict__ logits,
    float* __restrict__ partials, AttnArgs a)
{
    extern __shared__ float q_row[];
    __shared__ float warp_m[kLastWarps];
    __shared__ float warp_l[kLastWarps];
    int64_t const b = blockIdx.z;
    int64_t const h = blockIdx.y;
    int64_t const hkv = kv_head_of(h, a.heads, a.kv_heads);
    int64_t const j0 = int64_t{blockIdx.x} * kLastKeysPerBlock;
    T const* q = query + ((b * a.heads + h) * a.nq + (a.nq - 1)) * a.d;
    T const* k_base = key + (b * a.kv_heads + hkv) * a.s * a.d;
    int64_t const* mask_b = mask + b * a.s;
    float* logits_bh = logits + (b * a.heads + h) * a.s;
    int const tid = threadIdx.x;
    int const warp = tid / 32;
    int const lane = tid % 32;
    for (int64_t dd = tid; dd < a.d; dd += blockDim.x)
    {
        q_row[dd] = to_f32(q[dd]);
    }
    __syncthreads();
    // warp w handles keys j0 + w*32 .. j0 + w*32 + 31; lane t keeps the logit of key t
    float mine = -INFINITY;
    bool mine_visible = false;
    for (int t = 0; t < 32; ++t)
    {
        int64_t const j = j0 + warp * 32 + t;
        if (j >= a.s)
        {
            break; // uniform across the warp
        }
        T const* kj = k_base + j * a.d;
        float part = 0.0f;
        for (int64_t dd = lane; dd < a.d; dd += 32)
        {
            part = fmaf(q_row[dd], to_f32(kj[dd]), part);
        }
        float const dot = warp_sum(part);
        if (lane == t)
        {
            mine_visible = key_visible(j, a.s - 1, mask_b[j] != 0);
            mine = mine_visible ? dot * a.scale : -INFINITY;
        }
    }
    int64_t const j = j0 + warp * 32 + lane;
    if (j < a.s)
    {
        logits_bh[j] = mine;
    }
    float const tile_max = warp_max(mine);
    float const e = (mine_visible && tile_max != -INFINITY) ? expf(mine - tile_max) : 0.0f;
    float const tile_sum = warp_sum(e);
    if (lane == 0)
    {
        warp_m[warp] = tile_max;
        warp_l[warp] = tile_sum;
    }
    __syncthreads();
    if (tid == 0)
    {
        float m, l;
        softmax_init(m, l);
        for (int w = 0; w < kLastWarps; ++w) // fixed order: deterministic
        {
            softmax_merge(m, l, warp_m[w], warp_l[w]);
        }
        int64_t const p = (b * a.heads + h) * gridDim.x + blockIdx.x;
        partials[2 * p] = m;
        partials[2 * p + 1] = l;
    }
}

// grid (ceil(M / 256), H, B): lse[b, h] from the blocks' partial states (merged in block order), and
// colsum[b, h, i] = probability of candidate i's key in the last query row (0 when the last token is
// padding, when the key is padding, or for a malformed position: its row is poisoned later).
__global__ void __launch_bounds__(kThreads) last_colsum_kernel(int64_t const* __restrict__ mask,
    int64_t const* __restrict__ cand, float const* __restrict__ logits, float const* __restrict__ partials,
    int64_t blocks, float* __restrict__ lse, float* __restrict__ colsum, AttnArgs a)
{
    __shared__ float row_lse;
    int64_t const b = blockIdx.z;
    int64_t const h = blockIdx.y;
    int64_t const bh = b * a.heads + h;
    if (threadIdx.x == 0)
    {
        float m, l;
        softmax_init(m, l);
        for (int64_t p = 0; p < blocks; ++p)
        {
            softmax_merge(m, l, partials[2 * (bh * blocks + p)], partials[2 * (bh * blocks + p) + 1]);
        }
        row_lse = softmax_lse(m, l);
        if (blockIdx.x == 0)
        {
            lse[bh] = row_lse;
        }
    }
    __syncthreads();
    int64_t const i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
    if (i >= a.m)
    {
        return;
    }
    int64_t const* mask_b = mask + b * a.s;
    int64_t const c = cand[b * a.m + i];
    int64_t const j = (c >= 0 && c < a.n) ? (a.s - a.n) + c : -1;
    bool const row_ok = mask_b[a.s - 1] != 0;
    bool const key_real = j >= 0 && mask_b[j] != 0;
    colsum[bh * a.m + i] = (row_ok && key_visible(j, a.s - 1, key_real)) ? prob_from_lse(logits[bh * a.s + j], row_lse)
                                                                          : 0.0f;
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

// ------------------------------------------------------------------------------------------ mean, per warp
// The two mean passes with one warp per 16 query rows (row log-sum-exp) or per 16 candidate keys (column
// sums), the warp's own operand held in registers as tensor-core fragments for the whole walk, the other
// operand's fragments read straight from memory (staged through the warp's shared memory only at the ends
// of the query / key range), 16 x 16 logits per step. No block-wide barriers. Used for fp16 / bf16 when the
// library was built for tensor cores on the running GPU, d % 16 == 0, d <= 128 and the tensors are 32-byte
// aligned (flash_mean_ok); otherwise the tiled kernels above run.
constexpr int kFlashWarps = 4;
constexpr int kFlashThreads = kFlashWarps * 32;
constexpr int kFlashMaxFrags = 8;                // d <= 128
constexpr int kFlashStageLd = 16 * kFlashMaxFrags + 8;
constexpr int kFlashLogitsLd = 16 + 4;

template <typename T>
struct FlashSmem
{
    alignas(32) T stage[kFlashWarps][16][kFlashStageLd];      // 16 rows x d of one operand, zero padded
    alignas(32) float logits[kFlashWarps][16][kFlashLogitsLd];
    int64_t key_index[kFlashWarps][16];
};

// Copies rows[0 .. 15] of a [rows, d] operand (row r at base + index(r) * d; index < 0: a zero row) into
// the warp's stage.
template <typename T, typename Index>
__device__ __forceinline__ void flash_stage(T const* base, int64_t d, Index index, T (*stage)[kFlashStageLd])
{
    int const lane = threadIdx.x % 32;
    for (int64_t e = lane; e < 16 * d; e += 32)
    {
        int const r = static_cast<int>(e / d);
        int64_t const dd = e % d;
        int64_t const src = index(r);
        stage[r][dd] = src >= 0 ? base[src * d + dd] : zero_of<T>();
    }
    __syncwarp();
}

// One 16 x 16 step of the per-warp kernels: logits = scale * (query rows) . (keys), one operand held in
// registers (`held`: the query rows' matrix_a fragments, or the keys' matrix_b fragments), the other walking:
// rows row0 .. row0 + 15 of a [count, d] operand at `base`, read straight from memory when all 16 exist,
// else staged through the warp's shared memory with zero rows past `count`. Ends with __syncwarp: the
// logits are visible to the whole warp.
template <bool HeldIsQuery, typename T, typename Held>
__device__ __forceinline__ void flash_step(Held const (&held)[kFlashMaxFrags], int nf, T const* base, int64_t row0,
    int64_t count, int64_t d, float scale, T (*stage)[kFlashStageLd], float (*logits)[kFlashLogitsLd])
{
    namespace wmma = nvcuda::wmma;
    bool const full = row0 + 16 <= count;
    if (!full)
    {
        flash_stage(base, d, [&](int r) { return row0 + r < count ? row0 + r : int64_t{-1}; }, stage);
    }
    unsigned const ld = full ? static_cast<unsigned>(d) : static_cast<unsigned>(kFlashStageLd);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int f = 0; f < kFlashMaxFrags; ++f)
    {
        if (f < nf)
        {
            T const* src = full ? base + row0 * d + f * 16 : &stage[0][f * 16];
            if constexpr (HeldIsQuery)
            {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, src, ld);
                wmma::mma_sync(acc, held[f], kf, acc);
            }
            else
            {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa;
                wmma::load_matrix_sync(qa, src, ld);
                wmma::mma_sync(acc, qa, held[f], acc);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < acc.num_elements; ++t)
    {
        acc.x[t] *= scale;
    }
    wmma::store_matrix_sync(&logits[0][0], acc, kFlashLogitsLd, wmma::mem_row_major);
    __syncwarp();
}

// grid (ceil(Nq / 64), H, B), kFlashThreads threads: lse[b, h, r] of every query row (mean).
template <typename T>
__global__ void __launch_bounds__(kFlashThreads) row_lse_flash_kernel(
    T const* __restrict__ query, T const* __restrict__ key, int64_t const* __restrict__ mask, float* __restrict__ lse,
    AttnArgs a)
{
    if constexpr (use_mma<T>())
    {
        namespace wmma = nvcuda::wmma;
        __shared__ FlashSmem<T> sm;
        int const warp = threadIdx.x / 32;
        int const lane = threadIdx.x % 32;
        int64_t const b = blockIdx.z;
        int64_t const h = blockIdx.y;
        int64_t const r0 = int64_t{blockIdx.x} * (16 * kFlashWarps) + warp * 16;
        if (r0 >= a.nq)
        {
            return; // the whole warp; no block-wide barrier follows
        }
        int64_t const hkv = kv_head_of(h, a.heads, a.kv_heads);
        T const* q_base = query + (b * a.heads + h) * a.nq * a.d;
        T const* k_base = key + (b * a.kv_heads + hkv) * a.s * a.d;
        int64_t const* mask_b = mask + b * a.s;
        int const nf = static_cast<int>(a.d / 16);
        T (*stage)[kFlashStageLd] = sm.stage[warp];
        float (*logits)[kFlashLogitsLd] = sm.logits[warp];

        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kFlashMaxFrags];
        bool const rows_full = r0 + 16 <= a.nq;
        if (!rows_full)
        {
            flash_stage(q_base, a.d, [&](int r) { return r0 + r < a.nq ? r0 + r : int64_t{-1}; }, stage);
        }
        T const* q_rows = rows_full ? q_base + r0 * a.d : &stage[0][0];
        unsigned const ld = rows_full ? static_cast<unsigned>(a.d) : static_cast<unsigned>(kFlashStageLd);
#pragma unroll
        for (int f = 0; f < kFlashMaxFrags; ++f)
        {
            if (f < nf)
            {
                wmma::load_matrix_sync(qf[f], q_rows + f * 16, ld);
            }
        }
        __syncwarp();
        // lane: row lr = lane / 2, columns (lane % 2) * 8 .. + 7 of every 16-key step
        int const lr = lane / 2;
        int const c0 = (lane % 2) * 8;
        int64_t const qrow = r0 + lr;
        bool const row_exists = qrow < a.nq;
        int64_t const rpos = row_position(a.s, a.nq, row_exists ? qrow : a.nq - 1);
        float m, l;
        softmax_init(m, l);
        int64_t const last = (r0 + 16 < a.nq ? r0 + 16 : a.nq) - 1;
        int64_t const key_limit = row_position(a.s, a.nq, last) + 1;
        for (int64_t j0 = 0; j0 < key_limit; j0 += 16)
        {
            flash_step<true>(qf, nf, k_base, j0, a.s, a.d, a.scale, stage, logits);
#pragma unroll
            for (int c = 0; c < 8; ++c)
            {
                int64_t const j = j0 + c0 + c;
                bool const vis = row_exists && j < a.s && key_visible(j, rpos, mask_b[j < a.s ? j : 0] != 0);
                softmax_push(m, l, vis ? logits[lr][c0 + c] : -INFINITY);
            }
            __syncwarp();
        }
        float const m2 = __shfl_xor_sync(0xFFFFFFFFu, m, 1);
        float const l2 = __shfl_xor_sync(0xFFFFFFFFu, l, 1);
        if (lane % 2 == 0)
        {
            softmax_merge(m, l, m2, l2); // columns 0-7 then 8-15: a fixed order
            if (row_exists)
            {
                lse[(b * a.heads + h) * a.rows + qrow] = softmax_lse(m, l);
            }
        }
    }
}

// grid (ceil(M / 64), H, B), kFlashThreads threads: colsum[b, h, i] (mean), as colsum_kernel.
template <typename T>
__global__ void __launch_bounds__(kFlashThreads) colsum_flash_kernel(T const* __restrict__ query,
    T const* __restrict__ key, int64_t const* __restrict__ mask, int64_t const* __restrict__ cand,
    float const* __restrict__ lse, float* __restrict__ colsum, AttnArgs a)
{
    if constexpr (use_mma<T>())
    {
        namespace wmma = nvcuda::wmma;
        __shared__ FlashSmem<T> sm;
        int const warp = threadIdx.x / 32;
        int const lane = threadIdx.x % 32;
        int64_t const b = blockIdx.z;
        int64_t const h = blockIdx.y;
        int64_t const i0 = int64_t{blockIdx.x} * (16 * kFlashWarps) + warp * 16;
        if (i0 >= a.m)
        {
            return;
        }
        int64_t const hkv = kv_head_of(h, a.heads, a.kv_heads);
        int64_t const past = a.s - a.n;
        T const* q_base = query + (b * a.heads + h) * a.nq * a.d;
        T const* k_base = key + (b * a.kv_heads + hkv) * a.s * a.d;
        int64_t const* mask_b = mask + b * a.s;
        float const* lse_bh = lse + (b * a.heads + h) * a.rows;
        int const nf = static_cast<int>(a.d / 16);
        T (*stage)[kFlashStageLd] = sm.stage[warp];
        float (*logits)[kFlashLogitsLd] = sm.logits[warp];
        int64_t* key_index = sm.key_index[warp];

        int64_t jl = -1; // lanes 0-15: the key of candidate i0 + lane (-1: none or malformed)
        if (lane < 16 && i0 + lane < a.m)
        {
            int64_t const c = cand[b * a.m + i0 + lane];
            jl = (c >= 0 && c < a.n) ? past + c : -1;
        }
        if (lane < 16)
        {
            key_index[lane] = jl;
        }
        int64_t jmin = jl >= 0 ? jl : a.s;
        for (int o = 16; o > 0; o >>= 1)
        {
            int64_t const other = __shfl_xor_sync(0xFFFFFFFFu, jmin, o);
            jmin = other < jmin ? other : jmin;
        }
        __syncwarp();
        flash_stage(k_base, a.d, [&](int r) { return key_index[r]; }, stage);
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf[kFlashMaxFrags];
#pragma unroll
        for (int f = 0; f < kFlashMaxFrags; ++f)
        {
            if (f < nf)
            {
                wmma::load_matrix_sync(kf[f], &stage[0][f * 16], kFlashStageLd);
            }
        }
        __syncwarp();
        // lane: column col = lane % 16 (candidate i0 + col), rows (lane / 16) * 8 .. + 7 of every 16-row step
        int const col = lane % 16;
        int const rbase = (lane / 16) * 8;
        int64_t const j = key_index[col];
        bool const key_real = j >= 0 && mask_b[j] != 0;
        int64_t const first = jmin - (a.s - a.nq);
        float acc_col = 0.0f;
        for (int64_t row0 = first > 0 ? first : 0; row0 < a.nq; row0 += 16)
        {
            flash_step<false>(kf, nf, q_base, row0, a.nq, a.d, a.scale, stage, logits);
            if (key_real)
            {
#pragma unroll
                for (int rr = 0; rr < 8; ++rr)
                {
                    int64_t const qrow = row0 + rbase + rr;
                    if (qrow < a.nq)
                    {
                        int64_t const pos = row_position(a.s, a.nq, qrow);
                        if (mask_b[pos] != 0 && key_visible(j, pos, key_real))
                        {
                            acc_col += prob_from_lse(logits[rbase + rr][col], lse_bh[qrow]);
                        }
                    }
                }
            }
            __syncwarp();
        }
        float const total = acc_col + __shfl_xor_sync(0xFFFFFFFFu, acc_col, 16); // rows 0-7 then 8-15
        if (lane < 16 && i0 + lane < a.m)
        {
            colsum[(b * a.heads + h) * a.m + i0 + lane] = total;
        }
    }
}

// True when the warp-level mean kernels can run this call: their binary for the running GPU was built
// with tensor cores for T (cudaFuncGetAttributes' binaryVersion, looked up once per type), d fits, and
// the layout suits direct fragment loads.
template <typename T>
bool flash_mean_ok(AttnArgs const& a)
{
    if (!a.direct || a.d > 16 * kFlashMaxFrags)
    {
        return false;
    }
    static int const binary = [] {
        cudaFuncAttributes attr{};
        return cudaFuncGetAttributes(&attr, row_lse_flash_kernel<T>) == cudaSuccess ? attr.binaryVersion : 0;
    }();
    int const needed = std::is_same<T, __nv_bfloat16>::value ? 80 : 70;
    return binary >= needed;
}

struct SelectArgs
{
    int64_t batch, n, m, heads, keep_m, seed, n_kept;
    int32_t ranking;
};

// grid (ceil(M / 256), B): candidate scores [B, M] and their order keys.
__global__ void scores_kernel(int64_t const* __restrict__ cand, float const* __restrict__ colsum,
    int32_t const* __restrict__ valid_rows, float* __restrict__ scores, uint64_t* __restrict__ order, SelectArgs a)
{
    int64_t const b = blockIdx.y;
    int64_t const i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
    if (i >= a.m)
    {
        return;
    }
    float score;
    if (a.ranking == kRankRandom)
    {
        score = random_score(cand[b * a.m + i], a.seed);
    }
    else
    {
        float sum = 0.0f;
        for (int64_t h = 0; h < a.heads; ++h)
        {
            sum += colsum[(b * a.heads + h) * a.m + i];
        }
        float const divisor = a.ranking == kRankMean ? rows_divisor(valid_rows[b]) : 1.0f;
        score = finalize_score(sum, a.heads, divisor);
    }
    scores[b * a.m + i] = score;
    order[b * a.m + i] = order_key64(score, cand[b * a.m + i]);
}

// grid (ceil(M / 256), B, ceil(M / kRankSlice)): rank[b, i] += how many candidates of slice z rank before
// candidate i (rank zeroed before). Integer atomics: the sum does not depend on the order.
__global__ void __launch_bounds__(kThreads) rank_kernel(
    uint64_t const* __restrict__ order, int32_t* __restrict__ rank, SelectArgs a)
{
    __shared__ uint64_t tile[kThreads];
    int64_t const b = blockIdx.y;
    int64_t const i = int64_t{blockIdx.x} * kThreads + threadIdx.x;
    int64_t const j_begin = int64_t{blockIdx.z} * kRankSlice;
    int64_t const j_end = j_begin + kRankSlice < a.m ? j_begin + kRankSlice : a.m;
    uint64_t const mine = i < a.m ? order[b * a.m + i] : 0;
    int32_t count = 0;
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kThreads)
    {
        int64_t const j = j0 + threadIdx.x;
        if (j < j_end)
        {
            tile[threadIdx.x] = order[b * a.m + j];
        }
        __syncthreads();
        int const n_tile = static_cast<int>(j_end - j0 < kThreads ? j_end - j0 : kThreads);
        for (int t = 0; t < n_tile; ++t)
        {
            count += tile[t] > mine ? 1 : 0;
        }
        __syncthreads();
    }
    if (i < a.m && count > 0)
    {
        atomicAdd(&rank[b * a.m + i], count);
    }
}

// grid (ceil(M / 256), B): marks kept / dropped candidate positions from the ranks; flags malformed
// candidate positions in status[b].
__global__ void mark_kernel(int64_t const* __restrict__ cand, int32_t const* __restrict__ rank,
    uint8_t* __restrict__ mark, int32_t* __restrict__ status, SelectArgs a)
{
    int64_t const b = blockIdx.y;
    int64_t const i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
    if (i >= a.m)
    {
        return;
    }
    int64_t const ci = cand[b * a.m + i];
    if (!candidate_ok(ci, i > 0 ? cand[b * a.m + i - 1] : 0, i > 0, a.n))
    {
        atomicExch(&status[b], 1);
        return;
    }
    mark[b * a.n + ci] = is_kept(rank[b * a.m + i], a.keep_m) ? 1 : 0;
}

// grid (B), kScanThreads threads: kept[b, :] = positions t with mark[b, t] = 1, ascending.
__global__ void __launch_bounds__(kScanThreads) compact_kernel(
    uint8_t const* __restrict__ mark, int64_t* __restrict__ kept, int32_t* __restrict__ status, SelectArgs a)
{
    __shared__ int64_t warp_total[kScanThreads / 32];
    __shared__ int64_t chunk_total;
    int64_t const b = blockIdx.x;
    int const tid = threadIdx.x;
    int const lane = tid % 32;
    int const warp = tid / 32;
    int64_t base = 0;
    for (int64_t t0 = 0; t0 < a.n; t0 += kScanThreads)
    {
        int64_t const t = t0 + tid;
        int64_t const f = (t < a.n && mark[b * a.n + t] != 0) ? 1 : 0;
        int64_t incl = f; // inclusive scan within the warp
        for (int o = 1; o < 32; o <<= 1)
        {
            int64_t const v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
            if (lane >= o)
            {
                incl += v;
            }
        }
        if (lane == 31)
        {
            warp_total[warp] = incl;
        }
        __syncthreads();
        if (tid == 0)
        {
            int64_t run = 0;
            for (int w = 0; w < kScanThreads / 32; ++w)
            {
                int64_t const v = warp_total[w];
                warp_total[w] = run; // exclusive prefix of the warps
                run += v;
            }
            chunk_total = run;
        }
        __syncthreads();
        int64_t const out = base + warp_total[warp] + incl - f;
        if (f && out < a.n_kept)
        {
            kept[b * a.n_kept + out] = t;
        }
        base += chunk_total;
        __syncthreads();
    }
    if (tid == 0 && base != a.n_kept)
    {
        status[b] = 1;
    }
}

// grid (N', B): row o of the outputs of batch row b. Poisons rows flagged in status.
template <typename E>
__global__ void gather_kernel(E const* __restrict__ hidden, int64_t const* __restrict__ pos,
    int32_t const* __restrict__ status, E* __restrict__ out_hidden, int64_t* __restrict__ out_pos,
    int64_t* __restrict__ kept, int64_t n, int64_t width, int64_t planes, int64_t batch, int64_t n_kept, E nan_bits)
{
    int64_t const o = blockIdx.x;
    int64_t const b = blockIdx.y;
    bool const bad = status[b] != 0;
    int64_t const k = bad ? -1 : kept[b * n_kept + o];
    __syncthreads(); // every thread has read kept[] before thread 0 may overwrite it
    E* dst = out_hidden + (b * n_kept + o) * width;
    E const* src = hidden + (b * n + (bad ? 0 : k)) * width;
    for (int64_t e = threadIdx.x; e < width; e += blockDim.x)
    {
        dst[e] = bad ? nan_bits : src[e];
    }
    for (int64_t l = threadIdx.x; l < planes; l += blockDim.x)
    {
        out_pos[(l * batch + b) * n_kept + o] = bad ? -1 : pos[(l * batch + b) * n + k];
    }
    if (bad && threadIdx.x == 0)
    {
        kept[b * n_kept + o] = -1;
    }
}

int64_t ceil_div(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

// The error of the launch just made (each launch is checked on its own, so an error is never blamed on a
// later kernel).
inline cudaError_t check_launch()
{
    return cudaGetLastError();
}

struct AttnScratch
{
    float* lse;
    float* colsum;
    float* logits;   // last only
    float* partials; // last only
    int32_t* valid_rows;
};

template <typename T>
cudaError_t launch_attention(Attributes const& at, Shapes const& s, Buffers const& io, AttnScratch const& w,
    cudaStream_t stream)
{
    AttnArgs a{};
    a.batch = s.batch;
    a.heads = s.heads;
    a.kv_heads = s.kv_heads;
    a.nq = s.nq;
    a.s = s.s;
    a.n = s.n;
    a.d = s.head_dim;
    a.m = s.m;
    a.scale = at.scale;
    bool const mean = at.ranking == kRankMean;
    a.row_base = mean ? 0 : s.nq - 1;
    a.rows = mean ? s.nq : 1;
    // a query row whose own token is padding adds nothing: for mean that skips padded rows, for last (one
    // row, at S - 1) it gives every score 0 when the last token is padding (right padding, all-padding rows)
    a.rows_masked = true;
    T const* q = static_cast<T const*>(io.query);
    T const* k = static_cast<T const*>(io.key);
    cudaError_t err = cudaSuccess;
    if (!mean)
    {
        int64_t const blocks = ceil_div(s.s, kLastKeysPerBlock);
        dim3 const key_grid(static_cast<unsigned>(blocks), static_cast<unsigned>(s.heads),
            static_cast<unsigned>(s.batch));
        size_t const q_bytes = static_cast<size_t>(s.head_dim) * sizeof(float);
        last_logits_kernel<T><<<key_grid, kLastKeysPerBlock, q_bytes, stream>>>(
            q, k, io.attention_mask, w.logits, w.partials, a);
        if ((err = check_launch()) != cudaSuccess)
        {
            return err;
        }
        dim3 const cand_grid(static_cast<unsigned>(ceil_div(s.m, kThreads)), static_cast<unsigned>(s.heads),
            static_cast<unsigned>(s.batch));
        last_colsum_kernel<<<cand_grid, kThreads, 0, stream>>>(
            io.attention_mask, io.candidate_positions, w.logits, w.partials, blocks, w.lse, w.colsum, a);
        return check_launch();
    }
    // mean on tensor cores reads full tiles' fragments straight from memory when the layout allows it
    bool const sixteen_bit = !std::is_same<T, float>::value;
    bool const aligned = reinterpret_cast<uintptr_t>(q) % 32 == 0 && reinterpret_cast<uintptr_t>(k) % 32 == 0;
    a.direct = sixteen_bit && aligned && s.head_dim % 16 == 0 && s.head_dim <= kDirectMaxHeadDim;
    size_t const kfix_bytes = a.direct ? static_cast<size_t>(kTile * (s.head_dim + 8)) * sizeof(T) : 0;
    bool const flash = flash_mean_ok<T>(a);
    unsigned const rows_per_block = flash ? 16 * kFlashWarps : kTile;
    dim3 const row_grid(static_cast<unsigned>(ceil_div(a.rows, rows_per_block)), static_cast<unsigned>(s.heads),
        static_cast<unsigned>(s.batch));
    if (flash)
    {
        row_lse_flash_kernel<T><<<row_grid, kFlashThreads, 0, stream>>>(q, k, io.attention_mask, w.lse, a);
        err = check_launch();
    }
    else
    {
        row_lse_kernel<T><<<row_grid, kThreads, 0, stream>>>(q, k, io.attention_mask, w.lse, a);
        err = check_launch();
    }
    if (err != cudaSuccess)
    {
        return err;
    }
    valid_rows_kernel<<<static_cast<unsigned>(s.batch), kThreads, 0, stream>>>(
        io.attention_mask, w.valid_rows, s.s, s.nq);
    if ((err = check_launch()) != cudaSuccess)
    {
        return err;
    }
    dim3 const col_grid(static_cast<unsigned>(ceil_div(s.m, rows_per_block)), static_cast<unsigned>(s.heads),
        static_cast<unsigned>(s.batch));
    if (flash)
    {
        colsum_flash_kernel<T><<<col_grid, kFlashThreads, 0, stream>>>(
            q, k, io.attention_mask, io.candidate_positions, w.lse, w.colsum, a);
        return check_launch();
    }
    colsum_kernel<T><<<col_grid, kThreads, kfix_bytes, stream>>>(
        q, k, io.attention_mask, io.candidate_positions, w.lse, w.colsum, a);
    return check_launch();
}

template <typename E>
cudaError_t launch_gather(Shapes const& s, Buffers const& io, int32_t const* status, int64_t n_kept, E nan_bits,
    cudaStream_t stream)
{
    dim3 const grid(static_cast<unsigned>(n_kept), static_cast<unsigned>(s.batch));
    gather_kernel<E><<<grid, kGatherThreads, 0, stream>>>(static_cast<E const*>(io.hidden_states), io.position_ids,
        status, static_cast<E*>(io.selected_hidden_states), io.selected_position_ids, io.kept_indices, s.n, s.hidden,
        s.planes, s.batch, n_kept, nan_bits);
    return check_launch();
}

} // namespace

cudaError_t enqueue(Attributes const& at, Shapes const& s, ElementType type, Buffers const& io, void* workspace,
    size_t workspace_bytes, cudaStream_t stream)
{
    int64_t const n_kept = kept_length(at, s);
    if (s.batch == 0 || n_kept == 0)
    {
        return cudaSuccess; // empty outputs
    }
    WorkspaceLayout const w = workspace_layout(at, s);
    if (workspace == nullptr || workspace_bytes < w.total)
    {
        return cudaErrorInvalidValue;
    }
    char* ws = static_cast<char*>(workspace);
    AttnScratch const scratch{reinterpret_cast<float*>(ws + w.lse), reinterpret_cast<float*>(ws + w.colsum),
        reinterpret_cast<float*>(ws + w.logits), reinterpret_cast<float*>(ws + w.partials),
        reinterpret_cast<int32_t*>(ws + w.valid_rows)};
    float* colsum = scratch.colsum;
    float* scores = reinterpret_cast<float*>(ws + w.scores);
    int32_t* valid_rows = scratch.valid_rows;
    int32_t* status = reinterpret_cast<int32_t*>(ws + w.status);
    uint8_t* mark = reinterpret_cast<uint8_t*>(ws + w.mark);
    uint64_t* order = reinterpret_cast<uint64_t*>(ws + w.order);
    int32_t* rank = reinterpret_cast<int32_t*>(ws + w.rank);

    cudaError_t err = cudaMemsetAsync(status, 0, static_cast<size_t>(s.batch) * sizeof(int32_t), stream);
    if (err == cudaSuccess)
    {
        err = cudaMemsetAsync(mark, 1, static_cast<size_t>(s.batch * s.n), stream);
    }
    if (err == cudaSuccess && s.m > 0)
    {
        err = cudaMemsetAsync(rank, 0, static_cast<size_t>(s.batch * s.m) * sizeof(int32_t), stream);
    }
    if (err != cudaSuccess)
    {
        return err;
    }

    SelectArgs sa{};
    sa.batch = s.batch;
    sa.n = s.n;
    sa.m = s.m;
    sa.heads = s.heads;
    sa.keep_m = keep_count(s.m, at.ratio_num, at.ratio_den, at.keep);
    sa.seed = at.seed;
    sa.n_kept = n_kept;
    sa.ranking = at.ranking;

    if (s.m > 0) // M = 0: every position is kept (identity)
    {
        if (at.ranking != kRankRandom)
        {
            switch (type)
            {
            case kF32: err = launch_attention<float>(at, s, io, scratch, stream); break;
            case kF16: err = launch_attention<__half>(at, s, io, scratch, stream); break;
            case kBF16: err = launch_attention<__nv_bfloat16>(at, s, io, scratch, stream); break;
            default: return cudaErrorInvalidValue;
            }
            if (err != cudaSuccess)
            {
                return err;
            }
        }
        dim3 const grid(static_cast<unsigned>(ceil_div(s.m, kThreads)), static_cast<unsigned>(s.batch));
        scores_kernel<<<grid, kThreads, 0, stream>>>(io.candidate_positions, colsum, valid_rows, scores, order, sa);
        if ((err = check_launch()) != cudaSuccess)
        {
            return err;
        }
        dim3 const rank_grid(grid.x, grid.y, static_cast<unsigned>(ceil_div(s.m, kRankSlice)));
        rank_kernel<<<rank_grid, kThreads, 0, stream>>>(order, rank, sa);
        if ((err = check_launch()) != cudaSuccess)
        {
            return err;
        }
        mark_kernel<<<grid, kThreads, 0, stream>>>(io.candidate_positions, rank, mark, status, sa);
        if ((err = check_launch()) != cudaSuccess)
        {
            return err;
        }
    }
    compact_kernel<<<static_cast<unsigned>(s.batch), kScanThreads, 0, stream>>>(mark, io.kept_indices, status, sa);
    if ((err = check_launch()) != cudaSuccess)
    {
        return err;
    }
    switch (type)
    {
    case kF32: return launch_gather<uint32_t>(s, io, status, n_kept, 0x7FC00000u, stream);
    case kF16: return launch_gather<uint16_t>(s, io, status, n_kept, uint16_t{0x7E00}, stream);
    case kBF16: return launch_gather<uint16_t>(s, io, status, n_kept, uint16_t{0x7FC0}, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace ts
} // namespace fastv
