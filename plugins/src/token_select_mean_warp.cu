// fastv::TokenSelect, ranking `mean`, per warp: the two passes of token_select_mean.cu with one warp per 16
// query rows (row log-sum-exp) or per 16 candidate keys (column sums), the warp's own operand held in
// registers as tensor-core fragments for the whole walk, the other operand's fragments read straight from
// memory (staged through the warp's shared memory only at the ends of the query / key range), 16 x 16 logits
// per step, fp32 accumulation, no block-wide barriers. For fp16 / bf16 when the library was built for tensor
// cores on the running GPU, d % 16 == 0, d <= 128 and the tensors are 32-byte aligned (mean_warp_ok);
// otherwise token_select_mean.cu's block-tiled kernels run.
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


template <typename T>
cudaError_t launch_mean_warp_typed(AttnArgs const& a, Buffers const& io, AttnScratch const& w, cudaStream_t stream)
{
    T const* q = static_cast<T const*>(io.query);
    T const* k = static_cast<T const*>(io.key);
    dim3 const row_grid(static_cast<unsigned>(ceil_div(a.rows, 16 * kFlashWarps)), static_cast<unsigned>(a.heads),
        static_cast<unsigned>(a.batch));
    row_lse_flash_kernel<T><<<row_grid, kFlashThreads, 0, stream>>>(q, k, io.attention_mask, w.lse, a);
    cudaError_t err;
    if ((err = check_launch()) != cudaSuccess)
    {
        return err;
    }
    dim3 const col_grid(static_cast<unsigned>(ceil_div(a.m, 16 * kFlashWarps)), static_cast<unsigned>(a.heads),
        static_cast<unsigned>(a.batch));
    colsum_flash_kernel<T><<<col_grid, kFlashThreads, 0, stream>>>(
        q, k, io.attention_mask, io.candidate_positions, w.lse, w.colsum, a);
    return check_launch();
}

} // namespace

bool mean_warp_ok(ElementType type, AttnArgs const& a)
{
    switch (type)
    {
    case kF32: return flash_mean_ok<float>(a);
    case kF16: return flash_mean_ok<__half>(a);
    case kBF16: return flash_mean_ok<__nv_bfloat16>(a);
    default: return false;
    }
}

cudaError_t launch_mean_warp(ElementType type, AttnArgs const& a, Buffers const& io, AttnScratch const& w,
    cudaStream_t stream)
{
    switch (type)
    {
    case kF32: return launch_mean_warp_typed<float>(a, io, w, stream);
    case kF16: return launch_mean_warp_typed<__half>(a, io, w, stream);
    case kBF16: return launch_mean_warp_typed<__nv_bfloat16>(a, io, w, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace detail
} // namespace ts
} // namespace fastv
