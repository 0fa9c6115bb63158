// fastv::TokenSelect: attribute and shape validation, workspace layout (host code, CUDA-free).
#include "fastv/token_select_host.h"

#include <cmath>
#include <sstream>

#include "fastv/token_select_math.h"

namespace fastv
{
namespace ts
{
namespace
{

constexpr size_t kAlign = 256;

size_t align_up(size_t x)
{
    return (x + kAlign - 1) / kAlign * kAlign;
}

size_t dim(int64_t v)
{
    return v > 0 ? static_cast<size_t>(v) : 0;
}

bool known(int64_t v)
{
    return v >= 0;
}

// the arguments streamed into one string (error paths only)
template <typename... Args>
std::string message(Args const&... args)
{
    std::ostringstream os;
    (os << ... << args);
    return os.str();
}

// "" if a and b agree or either is unknown, else a message
std::string agree(int64_t a, char const* what_a, int64_t b, char const* what_b)
{
    if (known(a) && known(b) && a != b)
    {
        std::ostringstream os;
        os << what_a << " (" << a << ") differs from " << what_b << " (" << b << ")";
        return os.str();
    }
    return "";
}

} // namespace

int32_t ranking_from_name(std::string const& name)
{
    if (name == "last")
    {
        return kRankLast;
    }
    if (name == "mean")
    {
        return kRankMean;
    }
    if (name == "random")
    {
        return kRankRandom;
    }
    return -1;
}

char const* ranking_name(int32_t ranking)
{
    switch (ranking)
    {
    case kRankLast: return "last";
    case kRankMean: return "mean";
    case kRankRandom: return "random";
    default: return "?";
    }
}

// Messages are built only once a problem is found: the checks allocate nothing for valid input (the plugin
// may call them on a hot path).
std::string validate_attributes(Attributes const& a)
{
    if (a.ranking != kRankLast && a.ranking != kRankMean && a.ranking != kRankRandom)
    {
        return "attribute 'ranking' must be one of last, mean, random";
    }
    // int32: TensorRT's ONNX parser passes integer node attributes as int32, so 2^31 arrives as -2^31
    if (a.ratio_den <= 0 || a.ratio_den > 2147483647)
    {
        return message("attribute 'ratio_den' must be in [1, 2^31 - 1] (an int32; 2^31 and above arrive wrapped "
                       "to negative values), got ",
            a.ratio_den);
    }
    if (a.ratio_num < 0 || a.ratio_num >= a.ratio_den)
    {
        return message("attributes 'ratio_num'/'ratio_den' must satisfy 0 <= ratio_num < ratio_den, got ",
            a.ratio_num, "/", a.ratio_den);
    }
    if (a.keep < -1)
    {
        return message("attribute 'keep' must be -1 (use the ratio) or >= 0, got ", a.keep);
    }
    if (a.seed < 0 || a.seed >= kSeedLimit)
    {
        return message("attribute 'seed' must be in [0, 2^31), got ", a.seed);
    }
    if (!std::isfinite(a.scale))
    {
        return message("attribute 'scale' must be a finite float, got ", a.scale);
    }
    return std::string();
}

std::string collect_shapes(TensorDims const in[6], bool reads_attention, Shapes& out)
{
    static char const* const kNames[6]
        = {"hidden_states", "query", "key", "attention_mask", "position_ids", "candidate_positions"};
    static int32_t const kRanks[6] = {3, 4, 4, 2, 2, 2};
    for (int i = 0; i < 6; ++i)
    {
        bool const ok = in[i].rank == kRanks[i] || (i == 4 && in[i].rank == 3);
        if (!ok)
        {
            std::ostringstream os;
            os << "input " << i << " '" << kNames[i] << "' must have rank " << kRanks[i]
               << (i == 4 ? " ([B, N]) or 3 ([3, B, N])" : "") << ", got rank " << in[i].rank;
            return os.str();
        }
    }
    TensorDims const& x = in[0];
    TensorDims const& q = in[1];
    TensorDims const& k = in[2];
    TensorDims const& mask = in[3];
    TensorDims const& pos = in[4];
    TensorDims const& cand = in[5];
    bool const mrope = pos.rank == 3;
    int64_t const pos_b = mrope ? pos.d[1] : pos.d[0];
    int64_t const pos_n = mrope ? pos.d[2] : pos.d[1];
    if (mrope && known(pos.d[0]) && pos.d[0] != 3)
    {
        std::ostringstream os;
        os << "input 4 'position_ids' of rank 3 must be [3, B, N] (M-RoPE), got first dim " << pos.d[0];
        return os.str();
    }
    std::string e;
    if (!(e = agree(mask.d[0], "attention_mask batch", x.d[0], "hidden_states batch")).empty()
        || !(e = agree(pos_b, "position_ids batch", x.d[0], "hidden_states batch")).empty()
        || !(e = agree(cand.d[0], "candidate_positions batch", x.d[0], "hidden_states batch")).empty()
        || !(e = agree(pos_n, "position_ids length", x.d[1], "hidden_states length N")).empty())
    {
        return e;
    }
    // `random` reads neither query nor key (any rank-4 tensors are accepted there)
    if (reads_attention
        && (!(e = agree(q.d[0], "query batch", x.d[0], "hidden_states batch")).empty()
            || !(e = agree(k.d[0], "key batch", x.d[0], "hidden_states batch")).empty()
            || !(e = agree(mask.d[1], "attention_mask length", k.d[2], "key length S")).empty()
            || !(e = agree(q.d[3], "query head_dim", k.d[3], "key head_dim")).empty()))
    {
        return e;
    }
    out.batch = x.d[0];
    out.n = x.d[1];
    out.hidden = x.d[2];
    out.heads = q.d[1];
    out.nq = q.d[2];
    out.head_dim = q.d[3];
    out.kv_heads = k.d[1];
    out.s = reads_attention && known(k.d[2]) ? k.d[2] : mask.d[1];
    out.m = cand.d[1];
    out.planes = mrope ? 3 : 1;
    return "";
}

std::string validate_shapes(Attributes const& a, Shapes const& s)
{
    bool const attention = a.ranking == kRankLast || a.ranking == kRankMean;
    if (known(s.m) && known(s.n) && s.m > s.n)
    {
        return message("candidate_positions has M = ", s.m, " entries but there are only N = ", s.n, " tokens");
    }
    if (known(s.batch) && s.batch > 65535)
    {
        return message("batch ", s.batch, " exceeds 65535");
    }
    if (attention && known(s.s) && known(s.n) && s.s < s.n)
    {
        return message("key length S = ", s.s, " must be at least N = ", s.n, " (S = past + N)");
    }
    if (attention && known(s.kv_heads) && s.kv_heads < 1)
    {
        return "key must have at least one head (Hkv >= 1)";
    }
    if (attention && known(s.heads) && s.heads < 1)
    {
        return "query must have at least one head (H >= 1)";
    }
    if (attention && known(s.heads) && known(s.kv_heads) && s.kv_heads > 0 && s.heads % s.kv_heads != 0)
    {
        return message("query heads H = ", s.heads, " must be a multiple of key heads Hkv = ", s.kv_heads, " (GQA)");
    }
    if (attention && known(s.heads) && s.heads > 65535)
    {
        return message("query heads H = ", s.heads, " exceeds 65535");
    }
    if (attention && known(s.nq) && (s.nq < 1 || (known(s.n) && s.nq > s.n)))
    {
        return known(s.n) ? message("query rows Nq = ", s.nq, " must satisfy 1 <= Nq <= N = ", s.n)
                          : message("query rows Nq = ", s.nq, " must satisfy 1 <= Nq <= N");
    }
    if (attention && known(s.head_dim) && s.head_dim < 1)
    {
        return "query/key head_dim must be at least 1";
    }
    return std::string();
}

int64_t kept_length(Attributes const& a, Shapes const& s)
{
    return fastv::ts::kept_length(s.n, s.m, a.ratio_num, a.ratio_den, a.keep);
}

WorkspaceLayout workspace_layout(Attributes const& a, Shapes const& s)
{
    WorkspaceLayout w;
    bool const attention = a.ranking == kRankLast || a.ranking == kRankMean;
    size_t const b = dim(s.batch);
    size_t const rows = a.ranking == kRankMean ? dim(s.nq) : 1;
    size_t off = 0;
    w.lse = off;
    off += align_up(attention ? b * dim(s.heads) * rows * sizeof(float) : 0);
    bool const last = a.ranking == kRankLast;
    size_t const blocks = last ? (dim(s.s) + kLastKeysPerBlock - 1) / kLastKeysPerBlock : 0;
    w.logits = off;
    off += align_up(last ? b * dim(s.heads) * dim(s.s) * sizeof(float) : 0);
    w.partials = off;
    off += align_up(last ? b * dim(s.heads) * blocks * 2 * sizeof(float) : 0);
    w.colsum = off;
    off += align_up(attention ? b * dim(s.heads) * dim(s.m) * sizeof(float) : 0);
    w.scores = off;
    off += align_up(b * dim(s.m) * sizeof(float));
    w.order = off;
    off += align_up(b * dim(s.m) * sizeof(uint64_t));
    w.rank = off;
    off += align_up(b * dim(s.m) * sizeof(int32_t));
    w.valid_rows = off;
    off += align_up(b * sizeof(int32_t));
    w.status = off;
    off += align_up(b * sizeof(int32_t));
    w.mark = off;
    off += align_up(b * dim(s.n));
    w.total = off;
    return w;
}

size_t workspace_size(Attributes const& a, Shapes const& s)
{
    return workspace_layout(a, s).total;
}

} // namespace ts
} // namespace fastv
