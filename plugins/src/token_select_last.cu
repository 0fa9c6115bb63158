// fastv::TokenSelect, ranking `last`: the probability each candidate's key receives in the last query row,
// per head, split over the keys (docs/token_select.md; the whole pipeline: token_select_kernels.cu).
//   1. last_logits_kernel  blocks of kLastKeysPerBlock keys per (batch, head): one warp per key computes the
//                          scaled logit of the last query row, kept in the workspace; each block leaves the
//                          softmax state (max, sum) of its keys.
//   2. last_colsum_kernel  merges the blocks' states into the row's log-sum-exp (fixed order) and gives each
//                          CANDIDATE key its probability; a padded last token gives every score 0, as in the
//                          reference and the function body.
#include "token_select_device.cuh"

namespace fastv
{
namespace ts
{
namespace detail
{
namespace
{

constexpr int kLastWarps = static_cast<int>(kLastKeysPerBlock / 32);

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

template <typename T>
cudaError_t launch_last_typed(AttnArgs const& a, Buffers const& io, AttnScratch const& w, cudaStream_t stream)
{
    int64_t const blocks = ceil_div(a.s, kLastKeysPerBlock);
    dim3 const key_grid(static_cast<unsigned>(blocks), static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch));
    size_t const q_bytes = static_cast<size_t>(a.d) * sizeof(float);
    last_logits_kernel<T><<<key_grid, kLastKeysPerBlock, q_bytes, stream>>>(static_cast<T const*>(io.query),
        static_cast<T const*>(io.key), io.attention_mask, w.logits, w.partials, a);
    cudaError_t err;
    if ((err = check_launch()) != cudaSuccess)
    {
        return err;
    }
    dim3 const cand_grid(static_cast<unsigned>(ceil_div(a.m, kThreads)), static_cast<unsigned>(a.heads),
        static_cast<unsigned>(a.batch));
    last_colsum_kernel<<<cand_grid, kThreads, 0, stream>>>(
        io.attention_mask, io.candidate_positions, w.logits, w.partials, blocks, w.lse, w.colsum, a);
    return check_launch();
}

} // namespace

cudaError_t launch_last(ElementType type, AttnArgs const& a, Buffers const& io, AttnScratch const& w,
    cudaStream_t stream)
{
    switch (type)
    {
    case kF32: return launch_last_typed<float>(a, io, w, stream);
    case kF16: return launch_last_typed<__half>(a, io, w, stream);
    case kBF16: return launch_last_typed<__nv_bfloat16>(a, io, w, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace detail
} // namespace ts
} // namespace fastv
