// The generation loop (fastv_export/runtime/generate.py, in C++): prefill vision -> embed -> pre_k
// (TokenSelect inside the graph) -> post_k, then greedy decode steps over the two KV caches
// (layers < K hold the n prompt tokens, layers >= K the n' kept ones).
#include "fastv/runtime.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace fastv {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

// past_key_values.{i}.{kind} <- present.{i}.{kind} of the same graph's latest call, layers [first, last)
void link_caches(Links& links, const std::string& graph, int first, int last) {
  for (int i = first; i < last; ++i)
    for (const char* kind : kKvKinds) links[past_name(i, kind)] = {graph, present_name(i, kind)};
}

const Tensor& output(const TensorMap& m, const std::string& graph, const std::string& name) {
  auto it = m.find(name);
  if (it == m.end()) throw Error("graph '" + graph + "' returned no output '" + name + "'");
  return it->second;
}

// DeepStack (graphs/spec.py): levels [first, last) of prefix, linked to the outputs of the same name of graph
void link_levels(Links& links, const std::string& graph, const std::string& prefix, int first, int last) {
  for (int l = first; l < last; ++l) links[level_name(prefix, l)] = {graph, level_name(prefix, l)};
}

// [rows, n] int64 with one column appended (ones)
Tensor append_ones(const Tensor& mask) {
  const int64_t rows = mask.shape[0], n = mask.shape[1];
  Tensor out = Tensor::zeros(DType::I64, {rows, n + 1});
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out.as<int64_t>() + r * (n + 1), mask.as<int64_t>() + r * n, n * sizeof(int64_t));
    out.as<int64_t>()[r * (n + 1) + n] = 1;
  }
  return out;
}

// argmax over the last position's logits [rows, seq, vocab] -> rows ids (ties: lowest id, as numpy)
std::vector<int64_t> argmax_last(const Tensor& logits) {
  const int64_t rows = logits.shape[0], seq = logits.shape[1], vocab = logits.shape[2];
  std::vector<int64_t> out(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const size_t base = static_cast<size_t>((r * seq + seq - 1) * vocab);
    int64_t best = 0;
    float bv = logits.float_at(base);
    for (int64_t v = 1; v < vocab; ++v) {
      const float x = logits.float_at(base + v);
      if (x > bv) { bv = x; best = v; }
    }
    out[r] = best;
  }
  return out;
}

// the last position's logits [rows, seq, vocab] as float32 [rows, vocab]
std::vector<float> last_logits(const Tensor& logits) {
  const int64_t rows = logits.shape[0], seq = logits.shape[1], vocab = logits.shape[2];
  std::vector<float> out(static_cast<size_t>(rows * vocab));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < vocab; ++v) out[r * vocab + v] = logits.float_at(static_cast<size_t>((r * seq + seq - 1) * vocab + v));
  return out;
}

}  // namespace

Generation generate(const Bundle& b, Executor& ex, const Inputs& in, int max_new_tokens) {
  return generate(b, ex, in, max_new_tokens, GenerateOptions{});
}

Generation generate(const Bundle& b, Executor& ex, const Inputs& in, int max_new_tokens,
                    const GenerateOptions& options) {
  const std::optional<int64_t> eos = options.eos_token_id ? options.eos_token_id : b.eos_token_id;
  auto choose = [&](const Tensor& logits) {
    if (!options.choose) return argmax_last(logits);
    const std::vector<float> last = last_logits(logits);
    std::vector<int64_t> ids = options.choose(last.data(), logits.shape[0], logits.shape[2]);
    if (static_cast<int64_t>(ids.size()) != logits.shape[0]) throw std::logic_error("choose: one id per row");
    return ids;
  };
  if (max_new_tokens < 1) throw Error("--max-new-tokens must be >= 1");
  Generation g;
  const auto t0 = Clock::now();
  const int64_t rows = in.input_ids.shape[0];

  // vision: one call per image (or temporal patch), features (and DeepStack levels) stacked in prompt order where
  // the executor keeps them (TensorRT: in place on the GPU); embed's inputs are linked to them
  std::vector<std::string> vision_outputs{kImageFeatures};
  for (int l = 0; l < b.deepstack_layers; ++l) vision_outputs.push_back(level_name(kDeepstackFeatures, l));
  std::vector<std::array<int64_t, 2>> call_grids;   // patch_grid with media grids: the (h, w) of each vision call
  for (const auto& row : in.row_grids)
    for (const auto& g : row)
      for (int64_t t = 0; t < g[0]; ++t) call_grids.push_back({g[1], g[2]});
  if (!call_grids.empty() && call_grids.size() != in.images.size())
    throw Error("the media grids make " + std::to_string(call_grids.size()) + " vision calls (one per image and per "
                "temporal patch of a video), " + std::to_string(in.images.size()) + " pixel inputs were given");
  for (size_t i = 0; i < in.images.size(); ++i) {
    Feeds feeds{{kPixelValues, &in.images[i]}};
    TensorMap grid;
    if (!call_grids.empty()) grid = patch_grid_feeds(call_grids[i][0], call_grids[i][1], b.spatial_merge_size,
                                                     b.vision_window);
    for (const auto& [name, t] : call_grids.empty() ? b.vision_grid_feeds : grid) feeds[name] = &t;
    ex.call_stacked("vision", Phase::Prefill, feeds, i);
  }
  g.timings_ms["vision"] = ms_since(t0);
  const Tensor positions = prefill_positions(b, in.input_ids, in.attention_mask, in.video_seconds, in.row_grids);
  const Tensor candidates = find_candidates(b, in.input_ids);
  if (in.candidate_positions && (in.candidate_positions->shape != candidates.shape ||
                                 in.candidate_positions->data != candidates.data))
    throw Error(std::string("inputs: tensor '") + kCandidatePositions + "' " +
                shape_str(in.candidate_positions->shape) + " is not the positions of the image tokens (manifest field " +
                "'image_tokens.token_ids') in '" + kInputIds + "' " + shape_str(candidates.shape));

  // embed -> pre_k (TokenSelect) over the n prompt tokens. Executor::call keeps the tensors passed from graph to
  // graph and the KV caches where the graphs ran (TensorRT: on the GPU); only kept_indices and the logits come back
  // (of the prefill: the last position's).
  // pre_links / post_links: the inputs of pre_k / post_k that earlier graphs of the same step produce
  Links pre_links{{kInputsEmbeds, {"embed", kInputsEmbeds}}};
  link_levels(pre_links, "embed", kDeepstackEmbeds, 0, b.deepstack_layers);
  Links post_links{{kHiddenStates, {"pre_k", kHiddenStates}}, {kPositionIds, {"pre_k", kSelectedPositionIds}}};
  link_levels(post_links, "pre_k", kKeptDeepstackEmbeds, b.k, std::max(b.k, b.deepstack_layers));
  auto t1 = Clock::now();
  Feeds embed_feeds{{kInputIds, &in.input_ids}};
  Links embed_links;   // image_features and the DeepStack levels, [image tokens, hidden], from the vision calls
  const Tensor no_features = Tensor::zeros(b.float_dtype, {0, b.hidden_size});
  for (const auto& name : vision_outputs)
    if (in.images.empty())
      embed_feeds[name] = &no_features;
    else
      embed_links[name] = {"vision", name};
  ex.call("embed", Phase::Prefill, embed_feeds, embed_links, {});
  g.timings_ms["embed"] = ms_since(t1);
  t1 = Clock::now();
  const Tensor empty_kv = Tensor::zeros(b.float_dtype, {rows, b.num_kv_heads, 0, b.head_dim});
  Feeds feeds{{kAttentionMask, &in.attention_mask},
              {kPositionIds, &positions},
              {kCandidatePositions, &candidates}};
  for (int i = 0; i < b.k; ++i)
    for (const char* kind : kKvKinds) feeds[past_name(i, kind)] = &empty_kv;
  TensorMap pre = ex.call("pre_k", Phase::Prefill, feeds, pre_links, {kKeptIndices});
  g.kept = output(pre, "pre_k", kKeptIndices);
  // post-K attention mask: the prompt mask gathered at the kept positions
  const int64_t n = in.attention_mask.shape[1], kept_n = g.kept.shape[1];
  Tensor post_mask = Tensor::zeros(DType::I64, {rows, kept_n});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < kept_n; ++j) {
      const int64_t pos = g.kept.as<int64_t>()[r * kept_n + j];
      if (pos < 0 || pos >= n) throw Error("pre_k returned kept index " + std::to_string(pos) + " outside the prompt");
      post_mask.as<int64_t>()[r * kept_n + j] = in.attention_mask.as<int64_t>()[r * n + pos];
    }
  g.timings_ms["pre_k"] = ms_since(t1);

  // post_k over the n' kept tokens, with their original position ids
  const auto t2 = Clock::now();
  feeds = {{kAttentionMask, &post_mask}};
  for (int i = b.k; i < b.num_layers; ++i)
    for (const char* kind : kKvKinds) feeds[past_name(i, kind)] = &empty_kv;
  // only the last position's logits come back: [rows, 1, vocab]
  TensorMap post = ex.call("post_k", Phase::Prefill, feeds, post_links, {Fetch(kLogits, true)});
  std::vector<int64_t> next = choose(output(post, "post_k", kLogits));
  g.timings_ms["post_k"] = ms_since(t2);
  g.timings_ms["prefill"] = ms_since(t0);

  // greedy decode: each step's present of a cache becomes the next step's past (linked, never copied to the host)
  Links pre_decode = pre_links, post_decode = post_links;
  link_caches(pre_decode, "pre_k", 0, b.k);
  link_caches(post_decode, "post_k", b.k, b.num_layers);
  g.tokens.assign(rows, {});
  std::vector<bool> finished(rows, false);
  Tensor mask = in.attention_mask;
  const Tensor no_candidates = Tensor::zeros(DType::I64, {rows, 0});
  const auto t3 = Clock::now();
  for (int step = 0; step < max_new_tokens; ++step) {
    bool all = true;
    for (int64_t r = 0; r < rows; ++r) {
      int64_t tok = next[r];
      if (eos) {
        if (finished[r]) tok = b.pad_token_id;
        if (tok == *eos) finished[r] = true;
      }
      next[r] = tok;
      g.tokens[r].push_back(tok);
      all = all && finished[r];
    }
    g.steps = step + 1;
    const bool stop = options.on_token && options.on_token(step, next);
    if (stop || step == max_new_tokens - 1 || (eos && all)) break;
    const Tensor ids = Tensor::from_i64({rows, 1}, next);
    Feeds ef{{kInputIds, &ids}};
    for (const auto& name : vision_outputs) ef[name] = &no_features;
    ex.call("embed", Phase::Decode, ef, {}, {});
    mask = append_ones(mask);
    post_mask = append_ones(post_mask);
    const Tensor pos = decode_positions(positions, step);
    const Feeds f{{kAttentionMask, &mask}, {kPositionIds, &pos}, {kCandidatePositions, &no_candidates}};
    ex.call("pre_k", Phase::Decode, f, pre_decode, {});
    const Feeds p{{kAttentionMask, &post_mask}};
    TensorMap res = ex.call("post_k", Phase::Decode, p, post_decode, {kLogits});
    next = choose(output(res, "post_k", kLogits));
  }
  g.timings_ms["decode_per_token"] = ms_since(t3) / std::max(1, g.steps - 1);
  g.timings_ms["total"] = ms_since(t0);
  return g;
}

}  // namespace fastv
