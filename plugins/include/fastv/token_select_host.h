// fastv::TokenSelect: attributes, shapes, validation and workspace layout (host code, no CUDA and no
// TensorRT types), shared by the TensorRT plugin, the CUDA launcher and the CPU unit tests.
#ifndef FASTV_TOKEN_SELECT_HOST_H
#define FASTV_TOKEN_SELECT_HOST_H

#include <cstddef>
#include <cstdint>
#include <string>

namespace fastv
{
namespace ts
{

enum ElementType : int32_t
{
    kF32 = 0,
    kF16 = 1,
    kBF16 = 2,
};

// The op's attributes (validated by validate_attributes).
struct Attributes
{
    int32_t ranking{-1}; // Ranking (token_select_math.h)
    int64_t ratio_num{0};
    int64_t ratio_den{1};
    int64_t keep{-1};
    float scale{1.0f};
    int64_t seed{0};
};

// The shapes of one call: hidden [B, N, D], query [B, H, Nq, d], key [B, Hkv, S, d], mask [B, S],
// position ids [L, B, N] (L = 1 for rank 2, 3 for M-RoPE), candidates [B, M].
struct Shapes
{
    int64_t batch{0};
    int64_t n{0};
    int64_t hidden{0};
    int64_t heads{1};
    int64_t nq{1};
    int64_t head_dim{1};
    int64_t kv_heads{1};
    int64_t s{0};
    int64_t m{0};
    int64_t planes{1};
};

struct Buffers
{
    void const* hidden_states{nullptr};
    void const* query{nullptr};
    void const* key{nullptr};
    int64_t const* attention_mask{nullptr};
    int64_t const* position_ids{nullptr};
    int64_t const* candidate_positions{nullptr};
    void* selected_hidden_states{nullptr};
    int64_t* selected_position_ids{nullptr};
    int64_t* kept_indices{nullptr};
};

// Ranking names of the `ranking` attribute; -1 for an unknown name.
int32_t ranking_from_name(std::string const& name);
char const* ranking_name(int32_t ranking);

// Dimensions of one tensor as the plugin sees them (-1: not known yet, at build time).
struct TensorDims
{
    int32_t rank{0};
    int64_t d[8]{};
};

// Checks the ranks of the six inputs and that shared dims agree (B everywhere, N in hidden / position
// ids, S in key / mask, d in query / key; query and key only when `reads_attention`, i.e. not for
// `random`); fills `out` (unknown dims stay -1). "" when consistent.
std::string collect_shapes(TensorDims const inputs[6], bool reads_attention, Shapes& out);

// Where each scratch array lives in the workspace (byte offsets, 256-byte aligned), and the total.
// `last` splits the keys of its one query row over blocks of this many keys (split-K); each block leaves
// its logits and its softmax state (max, sum) in the workspace, merged by log-sum-exp afterwards.
constexpr int64_t kLastKeysPerBlock = 256;
// The ranks are counted over slices of this many candidates in parallel (summed with integer atomics).
constexpr int64_t kRankSlice = 1024;

struct WorkspaceLayout
{
    size_t lse{0};        // float [B, H, R]: log-sum-exp per query row used (R = Nq for mean, 1 for last)
    size_t logits{0};     // float [B, H, S]: last only, the scaled logits of the last query row
    size_t partials{0};   // float [B, H, P, 2]: last only, (max, sum) of each block of kLastKeysPerBlock keys
    size_t colsum{0};     // float [B, H, M]: probability received by each candidate, per head
    size_t scores{0};     // float [B, M]: candidate scores
    size_t order{0};      // uint64 [B, M]: order_key64 of each candidate
    size_t rank{0};       // int32 [B, M]: candidates ranked before each candidate
    size_t valid_rows{0}; // int32 [B]: valid query rows (mean)
    size_t status{0};     // int32 [B]: 1 = malformed candidate positions in this row
    size_t mark{0};       // uint8 [B, N]: 1 = position kept
    size_t total{0};
};
WorkspaceLayout workspace_layout(Attributes const& a, Shapes const& s);

// "" when valid, else a message naming the problem.
std::string validate_attributes(Attributes const& a);
// "" when the shapes are consistent with each other and with the attributes, else a message.
std::string validate_shapes(Attributes const& a, Shapes const& s);

// N' of these shapes.
int64_t kept_length(Attributes const& a, Shapes const& s);

// Bytes of device workspace that enqueue needs for these shapes (a monotone function of every dim,
// so the size for the profile's maximum shapes covers every smaller call).
size_t workspace_size(Attributes const& a, Shapes const& s);

} // namespace ts
} // namespace fastv

#endif // FASTV_TOKEN_SELECT_HOST_H
