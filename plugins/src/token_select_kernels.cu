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
//
// Files: token_select_last.cu (the steps of `last`), token_select_mean.cu (the steps of `mean`), this file
// (scores, selection, gather and enqueue), token_select_device.cuh (what they share).
#include "token_select_device.cuh"

namespace fastv
{
namespace ts
{
using namespace detail;

namespace
{

constexpr int kScanThreads = 512;
constexpr int kGatherThreads = 128;

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

// The attention passes' arguments for these shapes (the ranking picks the query rows it reads).
AttnArgs attention_args(Attributes const& at, Shapes const& s)
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
    return a;
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
            AttnArgs const a = attention_args(at, s);
            err = at.ranking == kRankMean ? launch_mean(type, a, io, scratch, stream)
                                          : launch_last(type, a, io, scratch, stream);
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
