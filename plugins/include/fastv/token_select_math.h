// fastv::TokenSelect: the per-element arithmetic of the op (docs/token_select.md), shared by the CUDA
// kernels and the CPU unit tests. Everything here is a plain function of scalars, compiled for the host
// and (under nvcc) for the device, so a CPU test can check it bit for bit against the Python reference.
//
// Contents:
//   keep_count / kept_length   keep(M) and N' = N - M + keep(M), integer arithmetic only
//   random_score               the seeded int64 hash of a candidate index, as a float32 in [0, 1)
//   score_order_key / ranks_before / order_key64
//                              the total order of candidates: higher score first, equal scores -> lower
//                              position first (NaN ranks above everything, as in torch.sort)
//   softmax_push / softmax_merge / softmax_lse / prob_from_lse
//                              the online (streaming) softmax of one query row over key tiles
//   key_visible / row_position / kv_head_of / rows_divisor
//                              causal + padding visibility, GQA head mapping, the `mean` divisor
#ifndef FASTV_TOKEN_SELECT_MATH_H
#define FASTV_TOKEN_SELECT_MATH_H

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTV_HD __host__ __device__ __forceinline__
#else
#define FASTV_HD inline
#endif

namespace fastv
{
namespace ts
{

// ranking codes (the `ranking` attribute)
enum Ranking : int32_t
{
    kRankLast = 0,
    kRankMean = 1,
    kRankRandom = 2,
};

// the hash of docs/token_select.md (the same constants as graphs/op.py, checked by tests/test_op_constants.py)
constexpr int64_t kHashPrime = 2147483647; // 2^31 - 1
constexpr int64_t kHashA = 48271;
constexpr int64_t kHashB = 69621;
constexpr int64_t kHashC = 12345;
constexpr int64_t kHashD = 1013904223;
constexpr int64_t kSeedLimit = int64_t{1} << 31;

// ------------------------------------------------------------------------------------------- keep count
// keep(M) = M - floor(M * num / den) when keep < 0, else min(keep, M). Requires M >= 0, den > 0,
// 0 <= num < den: then M * num >= 0 and C++ truncation equals floor.
FASTV_HD int64_t keep_count(int64_t m, int64_t num, int64_t den, int64_t keep)
{
    if (keep >= 0)
    {
        return keep < m ? keep : m;
    }
    return m - (m * num) / den;
}

// N' = N - M + keep(M)
FASTV_HD int64_t kept_length(int64_t n, int64_t m, int64_t num, int64_t den, int64_t keep)
{
    return n - m + keep_count(m, num, den, keep);
}

// -------------------------------------------------------------------------------------------- random
// x mod p with a non-negative result (Python's %, which the reference uses)
FASTV_HD int64_t mod_prime(int64_t x)
{
    int64_t r = x % kHashPrime;
    return r < 0 ? r + kHashPrime : r;
}

// h2 of the contract: h1 = (c*A + seed*B + C) mod p; h2 = (h1*h1 + D) mod p. For 0 <= c < 2^31 and
// 0 <= seed < 2^31 no intermediate exceeds 2^63 (h1 < 2^31, so h1*h1 + D < 2^62 + 2^30).
FASTV_HD int64_t random_hash(int64_t c, int64_t seed)
{
    int64_t const h1 = mod_prime(c * kHashA + seed * kHashB + kHashC);
    return mod_prime(h1 * h1 + kHashD);
}

// floor(h2 / 128) * 2^-24: an integer below 2^24 times a power of two, exact in float32
FASTV_HD float random_score(int64_t c, int64_t seed)
{
    return static_cast<float>(random_hash(c, seed) >> 7) * 5.9604644775390625e-08f; // 2^-24
}

// ----------------------------------------------------------------------------------------- the order
// A 32-bit key that orders float32 scores as numbers: larger key = larger score. -0 and +0 map to the
// same key (they compare equal); every NaN maps to the largest key (torch.sort ranks NaN highest).
FASTV_HD uint32_t score_order_key(float s)
{
    if (s != s)
    {
        return 0xFFFFFFFFu;
    }
    if (s == 0.0f)
    {
        s = 0.0f;
    }
    uint32_t bits;
    memcpy(&bits, &s, sizeof(bits));
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// True when candidate a ranks before candidate b: a higher score, or an equal score at a lower position.
FASTV_HD bool ranks_before(float score_a, int64_t pos_a, float score_b, int64_t pos_b)
{
    uint32_t const ka = score_order_key(score_a);
    uint32_t const kb = score_order_key(score_b);
    return ka > kb || (ka == kb && pos_a < pos_b);
}

// One 64-bit key with the same order as ranks_before: a ranks before b iff order_key64(a) > order_key64(b).
// The score's order key in the high half, the position (0 <= pos < 2^32) reversed in the low half.
FASTV_HD uint64_t order_key64(float score, int64_t pos)
{
    uint32_t const p = static_cast<uint32_t>(pos < 0 ? 0 : (pos > 0xFFFFFFFFll ? 0xFFFFFFFFll : pos));
    return (static_cast<uint64_t>(score_order_key(score)) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - p);
}

// A candidate is kept iff fewer than keep(M) candidates rank before it.
FASTV_HD bool is_kept(int64_t rank, int64_t keep_m)
{
    return rank < keep_m;
}

// ------------------------------------------------------------------------------------ online softmax
// State of one query row: m = max of the logits seen so far (-inf: none), l = sum of exp(x - m).
FASTV_HD void softmax_init(float& m, float& l)
{
    m = -INFINITY;
    l = 0.0f;
}

// Adds one (visible) logit x.
FASTV_HD void softmax_push(float& m, float& l, float x)
{
    if (x == -INFINITY)
    {
        return;
    }
    if (x > m)
    {
        l = l * expf(m - x) + 1.0f; // m = -inf: l = 0 * 0 + 1
        m = x;
    }
    else
    {
        l += expf(x - m);
    }
}

// Merges the state (m2, l2) of another group of logits (a tile) into (m, l).
FASTV_HD void softmax_merge(float& m, float& l, float m2, float l2)
{
    if (m2 == -INFINITY || l2 == 0.0f)
    {
        return;
    }
    if (m == -INFINITY || l == 0.0f)
    {
        m = m2;
        l = l2;
        return;
    }
    float const mx = m > m2 ? m : m2;
    l = l * expf(m - mx) + l2 * expf(m2 - mx);
    m = mx;
}

// log-sum-exp of the row; +inf when the row sees no key (then every probability is 0).
FASTV_HD float softmax_lse(float m, float l)
{
    return (l > 0.0f && m != -INFINITY) ? m + logf(l) : INFINITY;
}

// Probability of a visible key with logit x in a row whose log-sum-exp is lse.
FASTV_HD float prob_from_lse(float x, float lse)
{
    return (lse == INFINITY || x == -INFINITY) ? 0.0f : expf(x - lse);
}

// ------------------------------------------------------------------------------------ visibility etc.
// Absolute position of query row r (0 <= r < nq) when the query holds the last nq of s tokens.
FASTV_HD int64_t row_position(int64_t s, int64_t nq, int64_t r)
{
    return s - nq + r;
}

// Key j is visible to the query at absolute position row_pos iff it is causal and not padding.
FASTV_HD bool key_visible(int64_t j, int64_t row_pos, bool key_is_real)
{
    return key_is_real && j <= row_pos;
}

// Grouped-query attention: head h of H reads kv head h / (H / Hkv).
FASTV_HD int64_t kv_head_of(int64_t h, int64_t num_heads, int64_t num_kv_heads)
{
    return h / (num_heads / num_kv_heads);
}

// `mean` divides by max(1, number of valid rows).
FASTV_HD float rows_divisor(int64_t valid_rows)
{
    return valid_rows > 0 ? static_cast<float>(valid_rows) : 1.0f;
}

// Candidate score from the per-head sums of received probability (sum_h received[h]) for H heads.
FASTV_HD float finalize_score(float sum_over_heads, int64_t num_heads, float divisor)
{
    return sum_over_heads / divisor / static_cast<float>(num_heads);
}

// Candidate i at position c is well-formed iff 0 <= c < n and positions strictly ascend.
FASTV_HD bool candidate_ok(int64_t c, int64_t prev_c, bool has_prev, int64_t n)
{
    return c >= 0 && c < n && (!has_prev || prev_c < c);
}

} // namespace ts
} // namespace fastv

#endif // FASTV_TOKEN_SELECT_MATH_H
