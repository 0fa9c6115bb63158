// Host-only test library (g++, no CUDA): exposes the per-element functions of fastv/token_select_math.h and
// the host code of token_select_host.cpp through extern "C", plus a CPU emulation of the kernels' passes
// (streaming log-sum-exp over 32-key tiles, candidate column sums, per-head mean, rank counting, prefix-sum
// compaction) built from the same functions. tests/test_plugin_math.py compiles it and compares with
// fastv_export/selection.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fastv/token_select_host.h"
#include "fastv/token_select_math.h"

using namespace fastv::ts;

namespace
{

constexpr int64_t kTile = 32; // the kernels' key tile

void copy_message(std::string const& s, char* out, int32_t out_len)
{
    if (out != nullptr && out_len > 0)
    {
        std::strncpy(out, s.c_str(), static_cast<size_t>(out_len - 1));
        out[out_len - 1] = '\0';
    }
}

// scale * q[b, h, row] . k[b, hkv, j] with the kernels' fmaf accumulation order
float logit(float const* q, float const* k, int64_t h_q_row_base, int64_t k_base, int64_t d, float scale)
{
    float acc = 0.0f;
    for (int64_t i = 0; i < d; ++i)
    {
        acc = std::fmaf(q[h_q_row_base + i], k[k_base + i], acc);
    }
    return acc * scale;
}

} // namespace

extern "C"
{

int64_t fastv_host_keep_count(int64_t m, int64_t num, int64_t den, int64_t keep)
{
    return keep_count(m, num, den, keep);
}

int64_t fastv_host_kept_length(int64_t n, int64_t m, int64_t num, int64_t den, int64_t keep)
{
    return kept_length(n, m, num, den, keep);
}

int64_t fastv_host_random_hash(int64_t c, int64_t seed)
{
    return random_hash(c, seed);
}

void fastv_host_random_scores(int64_t const* c, int64_t count, int64_t seed, float* out)
{
    for (int64_t i = 0; i < count; ++i)
    {
        out[i] = random_score(c[i], seed);
    }
}

uint32_t fastv_host_order_key(float s)
{
    return score_order_key(s);
}

int32_t fastv_host_ranks_before(float score_a, int64_t pos_a, float score_b, int64_t pos_b)
{
    return ranks_before(score_a, pos_a, score_b, pos_b) ? 1 : 0;
}

// Online softmax over `count` logits pushed one by one, or merged in tiles of `tile`; returns the lse.
float fastv_host_lse(float const* x, int64_t count, int64_t tile)
{
    float m, l;
    softmax_init(m, l);
    if (tile <= 1)
    {
        for (int64_t i = 0; i < count; ++i)
        {
            softmax_push(m, l, x[i]);
        }
        return softmax_lse(m, l);
    }
    for (int64_t j0 = 0; j0 < count; j0 += tile)
    {
        float tm, tl;
        softmax_init(tm, tl);
        for (int64_t j = j0; j < j0 + tile && j < count; ++j)
        {
            softmax_push(tm, tl, x[j]);
        }
        softmax_merge(m, l, tm, tl);
    }
    return softmax_lse(m, l);
}

// Candidate scores [B, M] for ranking 0 (last) / 1 (mean) / 2 (random), emulating the kernels' passes.
// dims: B, N, H, Nq, d, Hkv, S, M. q [B, H, Nq, d], k [B, Hkv, S, d] float32, mask [B, S], cand [B, M].
void fastv_host_scores(int32_t ranking, float const* q, float const* k, int64_t const* mask, int64_t const* cand,
    int64_t const* dims, float scale, int64_t seed, float* out)
{
    int64_t const B = dims[0], N = dims[1], H = dims[2], Nq = dims[3], d = dims[4], Hkv = dims[5], S = dims[6],
                  M = dims[7];
    if (ranking == kRankRandom)
    {
        fastv_host_random_scores(cand, B * M, seed, out);
        return;
    }
    bool const mean = ranking == kRankMean;
    int64_t const row_base = mean ? 0 : Nq - 1;
    int64_t const rows = mean ? Nq : 1;
    int64_t const past = S - N;
    std::vector<float> lse(static_cast<size_t>(rows));
    std::vector<float> colsum(static_cast<size_t>(H * M));
    for (int64_t b = 0; b < B; ++b)
    {
        int64_t const* mask_b = mask + b * S;
        for (int64_t h = 0; h < H; ++h)
        {
            int64_t const hkv = kv_head_of(h, H, Hkv);
            int64_t const q_head = ((b * H + h) * Nq) * d;
            int64_t const k_head = ((b * Hkv + hkv) * S) * d;
            // pass 1: lse of every row used, 32-key tiles merged online
            for (int64_t r = 0; r < rows; ++r)
            {
                int64_t const qrow = row_base + r;
                int64_t const pos = row_position(S, Nq, qrow);
                float m, l;
                softmax_init(m, l);
                for (int64_t j0 = 0; j0 <= pos; j0 += kTile)
                {
                    float tm, tl;
                    softmax_init(tm, tl);
                    float tile_max = -INFINITY;
                    float x[kTile];
                    bool vis[kTile];
                    for (int64_t t = 0; t < kTile; ++t)
                    {
                        int64_t const j = j0 + t;
                        vis[t] = j < S && key_visible(j, pos, mask_b[j] != 0);
                        x[t] = vis[t] ? logit(q, k, q_head + qrow * d, k_head + j * d, d, scale) : -INFINITY;
                        tile_max = x[t] > tile_max ? x[t] : tile_max;
                    }
                    float tile_sum = 0.0f;
                    for (int64_t t = 0; t < kTile; ++t)
                    {
                        tile_sum += (vis[t] && tile_max != -INFINITY) ? std::exp(x[t] - tile_max) : 0.0f;
                    }
                    tm = tile_max;
                    tl = tile_sum;
                    softmax_merge(m, l, tm, tl);
                }
                lse[static_cast<size_t>(r)] = softmax_lse(m, l);
            }
            // pass 2: probability received by each candidate key from the rows that see it
            for (int64_t i = 0; i < M; ++i)
            {
                int64_t const c = cand[b * M + i];
                float acc = 0.0f;
                if (c >= 0 && c < N)
                {
                    int64_t const j = past + c;
                    bool const key_real = mask_b[j] != 0;
                    for (int64_t r = 0; r < rows; ++r)
                    {
                        int64_t const qrow = row_base + r;
                        int64_t const pos = row_position(S, Nq, qrow);
                        bool const row_ok = mask_b[pos] != 0; // padded rows add nothing (last: score 0)
                        if (row_ok && key_visible(j, pos, key_real))
                        {
                            acc += prob_from_lse(
                                logit(q, k, q_head + qrow * d, k_head + j * d, d, scale), lse[static_cast<size_t>(r)]);
                        }
                    }
                }
                colsum[static_cast<size_t>(h * M + i)] = acc;
            }
        }
        // pass 3: mean over heads (and over valid rows for mean)
        int64_t valid = 0;
        for (int64_t r = 0; r < Nq; ++r)
        {
            valid += mask_b[row_position(S, Nq, r)] != 0 ? 1 : 0;
        }
        float const divisor = mean ? rows_divisor(valid) : 1.0f;
        for (int64_t i = 0; i < M; ++i)
        {
            float sum = 0.0f;
            for (int64_t h = 0; h < H; ++h)
            {
                sum += colsum[static_cast<size_t>(h * M + i)];
            }
            out[b * M + i] = finalize_score(sum, H, divisor);
        }
    }
}

// Kept positions [B, N - M + keep_m] like rank_kernel + compact_kernel. Returns the number of rows that
// were malformed (their kept row is all -1).
int64_t fastv_host_select(
    float const* scores, int64_t const* cand, int64_t B, int64_t N, int64_t M, int64_t keep_m, int64_t* kept)
{
    int64_t const n_kept = N - M + keep_m;
    int64_t bad_rows = 0;
    std::vector<uint8_t> mark(static_cast<size_t>(N));
    for (int64_t b = 0; b < B; ++b)
    {
        bool bad = false;
        std::fill(mark.begin(), mark.end(), uint8_t{1});
        for (int64_t i = 0; i < M; ++i)
        {
            float const si = scores[b * M + i];
            int64_t const ci = cand[b * M + i];
            bool const ok = candidate_ok(ci, i > 0 ? cand[b * M + i - 1] : 0, i > 0, N);
            bad = bad || !ok;
            int64_t rank = 0;
            for (int64_t j = 0; j < M; ++j)
            {
                rank += ranks_before(scores[b * M + j], cand[b * M + j], si, ci) ? 1 : 0;
            }
            if (ok)
            {
                mark[static_cast<size_t>(ci)] = is_kept(rank, keep_m) ? 1 : 0;
            }
        }
        int64_t out = 0;
        for (int64_t t = 0; t < N; ++t)
        {
            if (mark[static_cast<size_t>(t)])
            {
                if (out < n_kept)
                {
                    kept[b * n_kept + out] = t;
                }
                ++out;
            }
        }
        if (bad || out != n_kept)
        {
            ++bad_rows;
            for (int64_t o = 0; o < n_kept; ++o)
            {
                kept[b * n_kept + o] = -1;
            }
        }
    }
    return bad_rows;
}

// validate_attributes + collect_shapes + validate_shapes. ranks[6], dims[6 * 8] (-1 = unknown).
// Returns 0 (valid) or 1 with the message in msg.
int32_t fastv_host_validate(int32_t ranking, int64_t num, int64_t den, int64_t keep, float scale, int64_t seed,
    int32_t const* ranks, int64_t const* dims, char* msg, int32_t msg_len)
{
    Attributes a;
    a.ranking = ranking;
    a.ratio_num = num;
    a.ratio_den = den;
    a.keep = keep;
    a.scale = scale;
    a.seed = seed;
    std::string err = validate_attributes(a);
    if (err.empty())
    {
        TensorDims t[6];
        for (int i = 0; i < 6; ++i)
        {
            t[i].rank = ranks[i];
            for (int j = 0; j < 8; ++j)
            {
                t[i].d[j] = dims[i * 8 + j];
            }
        }
        Shapes s;
        err = collect_shapes(t, ranking != kRankRandom, s);
        if (err.empty())
        {
            err = validate_shapes(a, s);
        }
    }
    copy_message(err, msg, msg_len);
    return err.empty() ? 0 : 1;
}

int32_t fastv_host_ranking_from_name(char const* name)
{
    return ranking_from_name(name);
}

// workspace bytes for dims B, N, H, Nq, Hkv, S, M
uint64_t fastv_host_workspace_size(int32_t ranking, int64_t const* dims)
{
    Attributes a;
    a.ranking = ranking;
    Shapes s;
    s.batch = dims[0];
    s.n = dims[1];
    s.heads = dims[2];
    s.nq = dims[3];
    s.kv_heads = dims[4];
    s.s = dims[5];
    s.m = dims[6];
    return workspace_size(a, s);
}

} // extern "C"
