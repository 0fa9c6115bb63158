// Unit tests of the device-resident executor's buffer logic (fastv/device_executor.hpp) on the CPU: DeviceExecutor
// over host memory (make_host_memory) and fake compiled graphs that compute a small deterministic model with the
// graph spec's I/O names, read their inputs from the addresses they are given and write their outputs to theirs,
// as an engine does (at 256-byte aligned addresses only, as TensorRT takes them). Checked: generate() gives the
// tokens of the host path (Executor::call's default over run()); the vision calls (one per image, or of 1 to 4
// patches each as Qwen2.5-VL media of their own grids) copy nothing back: embed reads every call's rows, in prompt
// order, on the device (rows that cannot start aligned in place are moved there on the device); the prefill copies
// back kept_indices and the last position's logits only; per decode step, exactly the logits come back to the host
// and exactly the step's token ids, masks and position ids go to the device (no KV cache crosses); no allocation
// after load; each KV cache has two distinct buffers sized for prompt + new tokens; decode calls run on every
// engine's 'decode' profile; feed dtypes, unknown (-1) dimensions, shapes outside the profiles and stacked vision
// rows past their buffer are refused with one line. The fake model also has a DeepStack variant (levels linked
// vision -> embed -> pre_k -> post_k).
//
// usage: fastv_device_tests
#include "fastv/device_executor.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <optional>
#include <set>

#include "check.hpp"

namespace {

using fastv::DType;
using fastv::Tensor;
using fastv::TensorMap;
using nlohmann::json;

using fastv_test::check;
using fastv_test::failed;
using fastv_test::passed;

// ---- the fake model -------------------------------------------------------------------------------------------
// sizes: hidden H, kv heads, head dim, layers L, FastV layer K, vocab V, image tokens per image M, image token id;
// engine limits: batch, prompt n, kept n' (= n - M + ceil(M / 2), the fake pre_k's pruning), new tokens T
constexpr int64_t kHidden = 4, kHeads = 2, kHeadDim = 2, kLayers = 3, kK = 1, kVocab = 11, kPerImage = 4,
                  kImageToken = 10;
// A vision call of p patches (pixel values [p, 3, 2, 2], p in [1, kMaxPatches]) gives p x M image tokens, as a
// Qwen2.5-VL medium of its own grid does; the prompt holds at most kMaxImageTokens of them. Kept tokens: at most
// n' = n - M + ceil(M / 2) (fastv_export/engines/profiles.py: a prompt holds its M image tokens).
constexpr int64_t kBatch = 2, kPrompt = 32, kMaxImageTokens = 28, kMaxPatches = 4,
                  kKept = kPrompt - kMaxImageTokens + (kMaxImageTokens + 1) / 2, kNew = 8;

// DeepStack levels L of the fake model (0, or 2 > K: levels l < K are added in pre_k, l >= K pass to post_k)
int g_levels = 0;

using Dims = std::vector<std::string>;   // a tensor's dims: a number, or a dim name of the profiles

struct IoSpec {
  std::string name;
  DType dtype;
  Dims dims;
  bool input;
};

std::vector<IoSpec> io(const std::string& graph) {
  const std::string h = std::to_string(kHidden), heads = std::to_string(kHeads), hd = std::to_string(kHeadDim);
  std::vector<IoSpec> out;
  auto kv = [&](int first, int last) {
    for (int i = first; i < last; ++i)
      for (const char* kind : fastv::kKvKinds) {
        out.push_back({fastv::past_name(i, kind), DType::F32, {"batch", heads, "past_seq", hd}, true});
        out.push_back({fastv::present_name(i, kind), DType::F32, {"batch", heads, "total_seq", hd}, false});
      }
  };
  auto levels = [&](const char* prefix, int first, Dims dims, bool input) {
    for (int l = first; l < g_levels; ++l) out.push_back({fastv::level_name(prefix, l), DType::F32, dims, input});
  };
  if (graph == "vision") {
    out = {{fastv::kPixelValues, DType::F32, {"patches", "3", "2", "2"}, true},
           {fastv::kImageFeatures, DType::F32, {"vision_tokens", h}, false}};
    levels(fastv::kDeepstackFeatures, 0, {"vision_tokens", h}, false);
  } else if (graph == "embed") {
    out = {{fastv::kInputIds, DType::I64, {"batch", "seq"}, true},
           {fastv::kImageFeatures, DType::F32, {"image_tokens", h}, true},
           {fastv::kInputsEmbeds, DType::F32, {"batch", "seq", h}, false}};
    levels(fastv::kDeepstackFeatures, 0, {"image_tokens", h}, true);
    levels(fastv::kDeepstackEmbeds, 0, {"batch", "seq", h}, false);
  } else if (graph == "pre_k") {
    out = {{fastv::kInputsEmbeds, DType::F32, {"batch", "seq", h}, true},
           {fastv::kAttentionMask, DType::I64, {"batch", "total_seq"}, true},
           {fastv::kPositionIds, DType::I64, {"batch", "seq"}, true},
           {fastv::kCandidatePositions, DType::I64, {"batch", "num_candidates"}, true},
           {fastv::kHiddenStates, DType::F32, {"batch", "kept_seq", h}, false},
           {fastv::kSelectedPositionIds, DType::I64, {"batch", "kept_seq"}, false},
           {fastv::kKeptIndices, DType::I64, {"batch", "kept_seq"}, false}};
    kv(0, kK);
    levels(fastv::kDeepstackEmbeds, 0, {"batch", "seq", h}, true);
    levels(fastv::kKeptDeepstackEmbeds, kK, {"batch", "kept_seq", h}, false);
  } else {
    out = {{fastv::kHiddenStates, DType::F32, {"batch", "seq", h}, true},
           {fastv::kAttentionMask, DType::I64, {"batch", "total_seq"}, true},
           {fastv::kPositionIds, DType::I64, {"batch", "seq"}, true},
           {fastv::kLogits, DType::F32, {"batch", "seq", std::to_string(kVocab)}, false}};
    kv(kK, kLayers);
    levels(fastv::kKeptDeepstackEmbeds, kK, {"batch", "seq", h}, true);
  }
  return out;
}

bool is_number(const std::string& d) { return !d.empty() && std::isdigit(static_cast<unsigned char>(d[0])); }

// the manifest's engines section for the fake engines (profiles as fastv_export/engines/profiles.py makes them)
json engines_section() {
  json engines;
  for (const char* g : fastv::kGraphs) {
    json profiles = json::array();
    if (std::string(g) != "vision") {
      const int64_t seq_max = std::string(g) == "post_k" ? kKept : kPrompt;
      for (const std::string p : {"prefill", "decode"}) {
        const bool pre = p == "prefill";
        std::map<std::string, std::pair<int64_t, int64_t>> r{
            {"batch", {1, kBatch}},
            {"seq", {1, pre ? seq_max : 1}},
            {"past_seq", {pre ? 0 : 1, pre ? 0 : seq_max + kNew - 1}},
            {"total_seq", {pre ? 1 : 2, pre ? seq_max : seq_max + kNew}},
            {"num_candidates", {0, pre ? kMaxImageTokens : 0}},
            {"image_tokens", {0, pre ? kMaxImageTokens : 0}}};
        json shapes = json::object();
        for (const auto& t : io(g)) {
          if (!t.input) continue;
          std::vector<int64_t> lo, hi;
          for (const auto& d : t.dims) {
            lo.push_back(is_number(d) ? std::stoll(d) : r.at(d).first);
            hi.push_back(is_number(d) ? std::stoll(d) : r.at(d).second);
          }
          shapes[t.name] = {{"min", lo}, {"opt", hi}, {"max", hi}};
        }
        profiles.push_back({{"name", p}, {"shapes", shapes}});
      }
    }
    if (std::string(g) == "vision")   // a dynamic layout's one profile (fastv_export/engines/profiles.py)
      profiles.push_back({{"name", "media"},
                          {"shapes", {{fastv::kPixelValues, {{"min", {1, 3, 2, 2}}, {"opt", {1, 3, 2, 2}},
                                                             {"max", {kMaxPatches, 3, 2, 2}}}}}}});
    engines[g] = {{"file", std::string(g) + ".engine"}, {"profiles", profiles}};
  }
  return {{"engines", engines}};
}

fastv::Bundle fake_bundle() {
  fastv::Bundle b;
  b.manifest = {{"engines", engines_section()}};
  b.k = kK;
  b.num_layers = kLayers;
  b.hidden_size = kHidden;
  b.num_kv_heads = kHeads;
  b.head_dim = kHeadDim;
  b.float_dtype = DType::F32;
  b.image_token_ids = {kImageToken};
  b.tokens_per_image = kPerImage;
  b.vision_input_shape = {1, 3, 2, 2};
  b.pad_token_id = 0;
  b.deepstack_layers = g_levels;
  return b;
}

int64_t kept_length(int64_t seq, int64_t candidates) { return seq - candidates + (candidates + 1) / 2; }

// one layer's new key/value entries and the causal, masked "attention" over a layer range's keys
float new_entry(const float* x, int64_t j, int layer, bool value, int64_t pos) {
  return x[j % kHidden] * static_cast<float>(layer + 1) * (value ? -1.f : 1.f) + 0.01f * static_cast<float>(pos);
}

// The fake model: every graph's outputs from its inputs (both executors run exactly this).
TensorMap fake_run(const std::string& graph, const std::map<std::string, const Tensor*>& in) {
  TensorMap out;
  if (graph == "vision") {
    const Tensor& px = *in.at(fastv::kPixelValues);
    float sum = 0;
    for (size_t i = 0; i < px.numel(); ++i) sum += px.float_at(i);
    const int64_t tokens = px.shape[0] * kPerImage;
    Tensor f = Tensor::zeros(DType::F32, {tokens, kHidden});
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < kHidden; ++j) f.as<float>()[t * kHidden + j] = 0.01f * sum + 0.3f * t + 0.1f * j;
    for (int l = 0; l < g_levels; ++l) {
      Tensor d = f;
      for (size_t i = 0; i < d.numel(); ++i) d.as<float>()[i] *= static_cast<float>(l + 2);
      out[fastv::level_name(fastv::kDeepstackFeatures, l)] = std::move(d);
    }
    out[fastv::kImageFeatures] = std::move(f);
    return out;
  }
  if (graph == "embed") {
    const Tensor& ids = *in.at(fastv::kInputIds);
    const Tensor& feats = *in.at(fastv::kImageFeatures);
    const int64_t rows = ids.shape[0], seq = ids.shape[1];
    Tensor e = Tensor::zeros(DType::F32, {rows, seq, kHidden});
    std::vector<Tensor> ds(g_levels, Tensor::zeros(DType::F32, {rows, seq, kHidden}));   // zero at text tokens
    int64_t next = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t s = 0; s < seq; ++s) {
        const int64_t id = ids.as<int64_t>()[r * seq + s];
        const bool image = id == kImageToken && next < feats.shape[0];
        float* x = e.as<float>() + (r * seq + s) * kHidden;
        for (int64_t j = 0; j < kHidden; ++j) {
          x[j] = image ? feats.as<float>()[next * kHidden + j] : std::sin(0.7f * static_cast<float>(id) + j);
          for (int l = 0; l < g_levels && image; ++l)
            ds[l].as<float>()[(r * seq + s) * kHidden + j] =
                in.at(fastv::level_name(fastv::kDeepstackFeatures, l))->as<float>()[next * kHidden + j];
        }
        if (id == kImageToken) ++next;
      }
    out[fastv::kInputsEmbeds] = std::move(e);
    for (int l = 0; l < g_levels; ++l) out[fastv::level_name(fastv::kDeepstackEmbeds, l)] = std::move(ds[l]);
    return out;
  }
  const bool pre = graph == "pre_k";
  const Tensor& x = *in.at(pre ? fastv::kInputsEmbeds : fastv::kHiddenStates);
  const Tensor& mask = *in.at(fastv::kAttentionMask);
  const Tensor& pos = *in.at(fastv::kPositionIds);
  const int64_t rows = x.shape[0], seq = x.shape[1];
  const int first = pre ? 0 : kK, last = pre ? kK : kLayers;
  const int64_t past = in.at(fastv::past_name(first, "key"))->shape[2], total = past + seq;
  // presents: the past, then this call's entries
  for (int i = first; i < last; ++i)
    for (const char* kind : fastv::kKvKinds) {
      const Tensor& p = *in.at(fastv::past_name(i, kind));
      Tensor t = Tensor::zeros(DType::F32, {rows, kHeads, total, kHeadDim});
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t h = 0; h < kHeads; ++h)
          for (int64_t s = 0; s < total; ++s)
            for (int64_t d = 0; d < kHeadDim; ++d) {
              float v;
              if (s < past) {
                v = p.as<float>()[((r * kHeads + h) * past + s) * kHeadDim + d];
              } else {
                const int64_t q = s - past;
                v = new_entry(x.as<float>() + (r * seq + q) * kHidden, h * kHeadDim + d, i,
                              std::string(kind) == "value", pos.as<int64_t>()[r * seq + q]);
              }
              t.as<float>()[((r * kHeads + h) * total + s) * kHeadDim + d] = v;
            }
      out[fastv::present_name(i, kind)] = std::move(t);
    }
  // each position: its state plus a masked, causal sum over every layer's keys and values
  Tensor y = Tensor::zeros(DType::F32, {rows, seq, kHidden});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < seq; ++q) {
      float ctx = 0;
      for (int i = first; i < last; ++i)
        for (const char* kind : fastv::kKvKinds) {
          const Tensor& t = out.at(fastv::present_name(i, kind));
          for (int64_t s = 0; s <= past + q; ++s)
            if (mask.as<int64_t>()[r * total + s])
              for (int64_t h = 0; h < kHeads; ++h)
                ctx += t.as<float>()[((r * kHeads + h) * total + s) * kHeadDim] * (0.1f + 0.01f * s);
        }
      for (int64_t j = 0; j < kHidden; ++j) {
        float add = 0;   // DeepStack: pre_k adds the levels l < K, post_k the kept levels K <= l < L
        for (int l = pre ? 0 : kK; l < (pre ? std::min<int>(kK, g_levels) : g_levels); ++l)
          add += in.at(fastv::level_name(pre ? fastv::kDeepstackEmbeds : fastv::kKeptDeepstackEmbeds, l))
                     ->as<float>()[(r * seq + q) * kHidden + j];
        y.as<float>()[(r * seq + q) * kHidden + j] =
            x.as<float>()[(r * seq + q) * kHidden + j] + std::tanh(0.05f * ctx + static_cast<float>(j)) + 0.3f * add;
      }
    }
  if (!pre) {
    Tensor logits = Tensor::zeros(DType::F32, {rows, seq, kVocab});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < seq; ++q) {
        const float* h = y.as<float>() + (r * seq + q) * kHidden;
        for (int64_t v = 0; v < kVocab; ++v)
          logits.as<float>()[(r * seq + q) * kVocab + v] =
              std::cos(1.3f * static_cast<float>(v) + 3.f * h[0] + 2.f * h[1] * h[2] +
                       0.5f * static_cast<float>(pos.as<int64_t>()[r * seq + q]));
      }
    out[fastv::kLogits] = std::move(logits);
    return out;
  }
  // pre_k: keep every position that is not a candidate and the first half (rounded up) of the candidates
  const Tensor& cand = *in.at(fastv::kCandidatePositions);
  const int64_t c = cand.shape[1], kept = kept_length(seq, c);
  Tensor hidden = Tensor::zeros(DType::F32, {rows, kept, kHidden});
  Tensor sel = Tensor::zeros(DType::I64, {rows, kept});
  Tensor idx = Tensor::zeros(DType::I64, {rows, kept});
  std::vector<Tensor> kept_ds;
  for (int l = kK; l < g_levels; ++l) kept_ds.push_back(Tensor::zeros(DType::F32, {rows, kept, kHidden}));
  for (int64_t r = 0; r < rows; ++r) {
    std::set<int64_t> dropped;
    for (int64_t j = (c + 1) / 2; j < c; ++j) dropped.insert(cand.as<int64_t>()[r * c + j]);
    int64_t k = 0;
    for (int64_t s = 0; s < seq; ++s) {
      if (dropped.count(s)) continue;
      idx.as<int64_t>()[r * kept + k] = s;
      sel.as<int64_t>()[r * kept + k] = pos.as<int64_t>()[r * seq + s];
      std::memcpy(hidden.as<float>() + (r * kept + k) * kHidden, y.as<float>() + (r * seq + s) * kHidden,
                  kHidden * sizeof(float));
      for (int l = kK; l < g_levels; ++l)
        std::memcpy(kept_ds[l - kK].as<float>() + (r * kept + k) * kHidden,
                    in.at(fastv::level_name(fastv::kDeepstackEmbeds, l))->as<float>() + (r * seq + s) * kHidden,
                    kHidden * sizeof(float));
      ++k;
    }
  }
  out[fastv::kHiddenStates] = std::move(hidden);
  out[fastv::kSelectedPositionIds] = std::move(sel);
  out[fastv::kKeptIndices] = std::move(idx);
  for (int l = kK; l < g_levels; ++l)
    out[fastv::level_name(fastv::kKeptDeepstackEmbeds, l)] = std::move(kept_ds[l - kK]);
  return out;
}

// The host path: the same model through run(), Executor::call's default keeping the outputs on the host.
class HostExecutor final : public fastv::Executor {
 public:
  std::string name() const override { return "host"; }
  TensorMap run(const std::string& graph, const fastv::Feeds& feeds) override {
    if (graph == "embed" && !embed_features) embed_features = *feeds.at(fastv::kImageFeatures);
    return fake_run(graph, std::map<std::string, const Tensor*>(feeds.begin(), feeds.end()));
  }
  std::optional<Tensor> embed_features;   // image_features of the first embed call
};

// A compiled graph as an engine behaves: shapes from the set input shapes, inputs read from and outputs written to
// the addresses given; refuses an output bound over an input (the two buffers of a KV cache must differ).
class FakeGraph final : public fastv::DeviceGraph {
 public:
  explicit FakeGraph(std::string graph) : graph_(std::move(graph)), io_(io(graph_)) {}
  std::vector<int> profile_log;   // the profile of each enqueue
  int profiles = 2;
  bool unknown_output_dim = false;   // report -1 for the first output's first dim

  std::vector<fastv::DeviceTensorInfo> tensors() const override {
    std::vector<fastv::DeviceTensorInfo> t;
    for (const auto& s : io_) t.push_back({s.name, s.dtype, s.input});
    return t;
  }
  int num_profiles() const override { return graph_ == "vision" ? 1 : profiles; }
  void select_profile(int index) override { profile_ = index; }
  void set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override { shapes_[name] = shape; }
  void set_address(const std::string& name, void* ptr) override {   // TensorRT takes 256-byte aligned addresses
    if (reinterpret_cast<uintptr_t>(ptr) % 256)
      throw std::logic_error(graph_ + ": tensor '" + name + "' bound at an address not 256-byte aligned");
    addresses_[name] = ptr;
  }
  std::vector<TensorMap> inputs_log;   // the inputs of each enqueue
  std::function<void()> before_enqueue;   // called first in each enqueue

  std::vector<int64_t> shape(const std::string& name) const override {
    const IoSpec& s = spec(name);
    std::vector<int64_t> out;
    for (const auto& d : s.dims) out.push_back(is_number(d) ? std::stoll(d) : s.input ? -1 : dim(d));
    if (!s.input && unknown_output_dim && name == first_output()) out[0] = -1;
    return out;
  }

  void enqueue() override {
    if (before_enqueue) before_enqueue();
    profile_log.push_back(profile_);
    std::map<std::string, Tensor> ins;
    std::vector<std::pair<const char*, size_t>> spans;
    for (const auto& s : io_) {
      if (!s.input) continue;
      Tensor t = Tensor::zeros(s.dtype, shapes_.at(s.name));
      const char* p = static_cast<const char*>(addresses_.at(s.name));
      if (t.nbytes()) std::memcpy(t.data.data(), p, t.nbytes());
      spans.push_back({p, t.nbytes()});
      ins[s.name] = std::move(t);
    }
    std::map<std::string, const Tensor*> view;
    for (const auto& [n, t] : ins) view[n] = &t;
    inputs_log.push_back(ins);
    const TensorMap out = fake_run(graph_, view);
    for (const auto& s : io_) {
      if (s.input) continue;
      const Tensor& t = out.at(s.name);
      if (t.shape != shape(s.name)) throw std::logic_error(graph_ + ": output '" + s.name + "' shape differs");
      char* p = static_cast<char*>(addresses_.at(s.name));
      for (const auto& [q, n] : spans)
        if (t.nbytes() && n && p < q + n && q < p + t.nbytes())
          throw std::logic_error(graph_ + ": output '" + s.name + "' is bound over an input");
      if (t.nbytes()) std::memcpy(p, t.data.data(), t.nbytes());
    }
  }

 private:
  const IoSpec& spec(const std::string& name) const {
    for (const auto& s : io_)
      if (s.name == name) return s;
    throw std::logic_error(graph_ + ": no tensor '" + name + "'");
  }
  std::string first_output() const {
    for (const auto& s : io_)
      if (!s.input) return s.name;
    return "";
  }
  // an output dim from the input shapes
  int64_t dim(const std::string& d) const {
    for (const auto& s : io_)
      if (s.input && shapes_.count(s.name))
        for (size_t i = 0; i < s.dims.size(); ++i)
          if (s.dims[i] == d) return shapes_.at(s.name)[i];
    if (d == "kept_seq") return kept_length(dim("seq"), dim("num_candidates"));
    if (d == "vision_tokens") return dim("patches") * kPerImage;
    if (d == "total_seq") return dim("past_seq") + dim("seq");
    return -1;
  }

  std::string graph_;
  std::vector<IoSpec> io_;
  int profile_ = 0;
  std::map<std::string, std::vector<int64_t>> shapes_;
  std::map<std::string, void*> addresses_;
};

struct Fakes {
  std::map<std::string, FakeGraph*> graphs;   // owned by the executor
  std::unique_ptr<fastv::DeviceExecutor> ex;
};

Fakes device_executor(const fastv::Bundle& b, const std::function<void(FakeGraph&)>& tweak = {}) {
  Fakes f;
  std::map<std::string, std::unique_ptr<fastv::DeviceGraph>> graphs;
  for (const char* g : fastv::kGraphs) {
    auto fake = std::make_unique<FakeGraph>(g);
    if (tweak) tweak(*fake);
    f.graphs[g] = fake.get();
    graphs[g] = std::move(fake);
  }
  f.ex = std::make_unique<fastv::DeviceExecutor>(b, "device", fastv::make_host_memory(), std::move(graphs));
  return f;
}

// rows of prompt ids (left-padded with 0 to the longest) and their pixel values: one vision call of one patch per
// M image tokens, or (patches) one call of patches[i] patches each, in prompt order
fastv::Inputs prompt(const std::vector<std::vector<int64_t>>& rows_ids, std::vector<int64_t> patches = {}) {
  size_t n = 0;
  for (const auto& r : rows_ids) n = std::max(n, r.size());
  std::vector<int64_t> ids, mask;
  int images = 0;
  for (const auto& r : rows_ids) {
    for (size_t i = r.size(); i < n; ++i) {
      ids.push_back(0);
      mask.push_back(0);
    }
    for (auto id : r) {
      ids.push_back(id);
      mask.push_back(1);
    }
    for (auto id : r) images += id == kImageToken;
  }
  fastv::Inputs in;
  const auto rows = static_cast<int64_t>(rows_ids.size());
  in.input_ids = Tensor::from_i64({rows, static_cast<int64_t>(n)}, ids);
  in.attention_mask = Tensor::from_i64({rows, static_cast<int64_t>(n)}, mask);
  if (patches.empty()) patches.assign(images / kPerImage, 1);
  for (int i = 0; i < static_cast<int>(patches.size()); ++i) {
    Tensor px = Tensor::zeros(DType::F32, {patches[i], 3, 2, 2});
    for (size_t e = 0; e < px.numel(); ++e) px.as<float>()[e] = 0.1f * static_cast<float>(i + 1) * (e % 5);
    in.images.push_back(std::move(px));
  }
  return in;
}

std::vector<int64_t> image() { return std::vector<int64_t>(kPerImage, kImageToken); }
std::vector<int64_t> cat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// f throws one fastv::Error line holding needle
void expect_error(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  std::string e = "<no error>";
  try {
    f();
  } catch (const fastv::Error& x) {
    e = x.what();
  }
  check(e.find(needle) != std::string::npos && e.find('\n') == std::string::npos,
        what + ": expected one line with '" + needle + "', got '" + e + "'");
}

// ---- the checks ---------------------------------------------------------------------------------------------
void memory_counters() {
  auto m = fastv::make_host_memory();
  void* a = m->allocate(64);
  void* b = m->allocate(32);
  std::vector<uint8_t> host(64, 7), back(64, 0);
  m->to_device(a, host.data(), 64);
  m->on_device(b, a, 32);
  m->to_host(back.data(), b, 32);
  m->synchronize();
  const auto& c = m->counters();
  check(c.allocations == 2 && c.bytes_live == 96, "host memory: 2 allocations, 96 bytes live");
  check(c.host_to_device_bytes == 64 && c.device_to_device_bytes == 32 && c.device_to_host_bytes == 32 &&
            c.host_to_device_copies == 1 && c.device_to_device_copies == 1 && c.device_to_host_copies == 1,
        "host memory: bytes and copies counted per direction");
  check(back[0] == 7 && back[31] == 7 && back[32] == 0, "host memory: the copies move the bytes");
  m->free(a, 64);
  m->free(b, 32);
  check(m->counters().frees == 2 && m->counters().bytes_live == 0, "host memory: frees counted");
  check(fastv::checked_volume({2, 3, 0}, "t") == 0 && fastv::checked_volume({}, "t") == 1 &&
            fastv::checked_volume({2, 3, 4}, "t") == 24,
        "checked_volume of known shapes");
  expect_error([] { fastv::checked_volume({2, -1, 3}, "graph 'x' output 'y'"); },
               "graph 'x' output 'y' has the shape [2, -1, 3], whose dimension -1 is not known",
               "checked_volume: a -1 dimension is an error, not 0");
}

struct Traffic {
  size_t h2d = 0, d2h = 0, d2d = 0, allocations = 0;
};
Traffic operator-(const fastv::DeviceCounters& a, const fastv::DeviceCounters& b) {
  return {a.host_to_device_bytes - b.host_to_device_bytes, a.device_to_host_bytes - b.device_to_host_bytes,
          a.device_to_device_bytes - b.device_to_device_bytes, a.allocations - b.allocations};
}

void device_generation(const std::string& what, const std::vector<std::vector<int64_t>>& rows_ids, int max_new,
                       const std::vector<int64_t>& patches = {}) {
  const fastv::Bundle b = fake_bundle();
  const fastv::Inputs in = prompt(rows_ids, patches);
  const int64_t rows = in.input_ids.shape[0], n = in.input_ids.shape[1];
  const int64_t candidates = std::count(rows_ids[0].begin(), rows_ids[0].end(), kImageToken);
  const int64_t kept = kept_length(n, candidates);

  HostExecutor host;
  const fastv::Generation want = fastv::generate(b, host, in, max_new);

  Fakes f = device_executor(b);
  fastv::DeviceExecutor& ex = *f.ex;
  const fastv::DeviceCounters loaded = ex.counters();
  check(loaded.allocations > 0 && loaded.host_to_device_bytes == 0 && loaded.device_to_host_bytes == 0,
        what + ": buffers allocated at load, nothing copied");
  // each KV cache: two buffers of batch x heads x (prompt + new tokens) x head_dim (engines.lengths)
  const size_t f32 = sizeof(float);
  bool sizes = true;
  for (int i = 0; i < kLayers; ++i)
    for (const char* kind : fastv::kKvKinds) {
      const std::string graph = i < kK ? "pre_k" : "post_k";
      const int64_t tokens = (i < kK ? kPrompt : kKept) + kNew;
      const size_t one = static_cast<size_t>(kBatch * kHeads * tokens * kHeadDim) * f32;
      sizes = sizes && ex.buffer_bytes(graph, fastv::present_name(i, kind)) == 2 * one &&
              ex.buffer_bytes(graph, fastv::past_name(i, kind)) == 2 * one;
    }
  check(sizes, what + ": each KV cache has two buffers of batch x heads x (prompt + new tokens) x head_dim");

  std::vector<fastv::DeviceCounters> at_embed;   // at each embed call: the first after every vision call
  f.graphs.at("embed")->before_enqueue = [&] { at_embed.push_back(ex.counters()); };
  std::vector<fastv::DeviceCounters> at_token;   // after prefill (step 0), then after each decode step
  fastv::GenerateOptions opts;
  opts.on_token = [&](int, const std::vector<int64_t>&) {
    at_token.push_back(ex.counters());
    return false;
  };
  const fastv::Generation got = fastv::generate(b, ex, in, max_new, opts);
  check(got.tokens == want.tokens, what + ": tokens equal the host path's");
  check(got.kept.data == want.kept.data && got.kept.shape == want.kept.shape,
        what + ": kept positions equal the host path's");
  check(static_cast<int>(at_token.size()) == max_new, what + ": one callback per token");

  // embed's image features: every vision call's rows in prompt order (computed here from the fake model)
  Tensor stacked = Tensor::zeros(DType::F32, {0, kHidden});
  size_t misplaced = 0;   // bytes of the vision calls whose rows do not start 256-byte aligned in the stacked buffer
  for (const auto& px : in.images) {
    const Tensor part = fake_run("vision", {{fastv::kPixelValues, &px}}).at(fastv::kImageFeatures);
    if (stacked.nbytes() % 256) misplaced += part.nbytes();
    stacked.shape[0] += part.shape[0];
    stacked.data.insert(stacked.data.end(), part.data.begin(), part.data.end());
  }
  const auto& embed_log = f.graphs.at("embed")->inputs_log;
  check(!embed_log.empty() && embed_log.front().at(fastv::kImageFeatures).shape == stacked.shape &&
            embed_log.front().at(fastv::kImageFeatures).data == stacked.data,
        what + ": embed's image_features on the device = every vision call's rows, in prompt order");
  check(host.embed_features && host.embed_features->shape == stacked.shape && host.embed_features->data == stacked.data,
        what + ": the host path's embed image_features = every vision call's rows, in prompt order");

  // prefill: only kept_indices and the last position's logits come back; the vision features stay on the device
  // (a vision call whose rows cannot start 256-byte aligned is moved into place on the device: its bytes, per level)
  const Traffic vision = at_embed.front() - loaded, pre = at_token.front() - loaded;
  check(vision.d2h == 0, what + ": the vision calls copy nothing back to the host (" + std::to_string(vision.d2h) +
                             " bytes)");
  check(vision.d2d == misplaced * (1 + g_levels),
        what + ": the vision calls' device -> device bytes = their rows not aligned in place (" +
            std::to_string(vision.d2d) + " vs " + std::to_string(misplaced * (1 + g_levels)) + ")");
  const Traffic llm = at_token.front() - at_embed.front();   // embed, pre_k and post_k of the prefill
  const size_t llm_d2h = rows * kept * sizeof(int64_t) + rows * 1 * kVocab * f32;
  check(llm.d2h == llm_d2h, what + ": embed, pre_k, post_k prefill device -> host = kept_indices + the last " +
                                "position's logits (" + std::to_string(llm.d2h) + " vs " + std::to_string(llm_d2h) +
                                ")");
  check(pre.d2h == vision.d2h + llm.d2h, what + ": prefill device -> host = the two above");
  check(pre.d2d == vision.d2d, what + ": no device -> device copy after the vision calls");
  check(pre.allocations == 0, what + ": prefill allocates nothing");

  bool exact = true;
  std::string first_bad;
  for (size_t t = 0; t + 1 < at_token.size(); ++t) {
    const Traffic step = at_token[t + 1] - at_token[t];
    const size_t logits = rows * 1 * kVocab * f32;
    // up: the token ids, pre_k's mask over n + t + 1, its position ids, post_k's mask over n' + t + 1
    const size_t up = rows * sizeof(int64_t) * (1 + (n + t + 1) + 1 + (kept + t + 1));
    const bool ok = step.d2h == logits && step.h2d == up && step.d2d == 0 && step.allocations == 0;
    if (!ok && first_bad.empty())
      first_bad = "step " + std::to_string(t) + ": down " + std::to_string(step.d2h) + " (logits " +
                  std::to_string(logits) + "), up " + std::to_string(step.h2d) + " (inputs " + std::to_string(up) +
                  "), allocations " + std::to_string(step.allocations);
    exact = exact && ok;
  }
  check(exact, what + ": every decode step: device -> host = the logits, host -> device = the token ids, masks and "
                      "position ids, no KV cache bytes, no allocation " + first_bad);
  check(ex.counters().allocations == loaded.allocations && ex.counters().frees == 0,
        what + ": no allocation and no free after load");

  // every engine's decode calls on its 'decode' profile (embed's too), prefill calls on 'prefill'
  for (const char* g : {"embed", "pre_k", "post_k"}) {
    std::vector<int> want_log{0};
    for (int s = 1; s < max_new; ++s) want_log.push_back(1);
    check(f.graphs.at(g)->profile_log == want_log,
          what + ": graph '" + g + "' ran prefill on profile 0 ('prefill'), every decode step on 1 ('decode')");
  }
  if (max_new > 1) check(ex.profile_of_latest_call("embed") == "decode", what + ": embed's latest profile 'decode'");

  // the executor serves the next generation from the same buffers
  const fastv::DeviceCounters before = ex.counters();
  const fastv::Generation again = fastv::generate(b, ex, in, max_new);
  check(again.tokens == want.tokens, what + ": a second generation on the same executor: the same tokens");
  check(ex.counters().allocations == before.allocations, what + ": the second generation allocates nothing");
}

void refusals() {
  const fastv::Bundle b = fake_bundle();
  {
    Fakes f = device_executor(b);
    const Tensor ids_f32 = Tensor::zeros(DType::F32, {1, 3});
    const Tensor feats = Tensor::zeros(DType::F32, {0, kHidden});
    expect_error([&] { f.ex->run("embed", {{fastv::kInputIds, &ids_f32}, {fastv::kImageFeatures, &feats}}); },
                 "graph 'embed': input 'input_ids' is float32, its engine takes int64",
                 "a feed of another dtype than the engine's");
    const Tensor ids = Tensor::zeros(DType::I64, {1, 3});
    expect_error([&] { f.ex->run("embed", {{fastv::kInputIds, &ids}}); },
                 "graph 'embed': input 'image_features' was not given", "a missing feed");
    check(f.ex->counters().host_to_device_bytes == 0, "refused feeds copy nothing");
    const Tensor long_ids = Tensor::zeros(DType::I64, {1, kPrompt + 1});
    expect_error([&] { f.ex->run("embed", {{fastv::kInputIds, &long_ids}, {fastv::kImageFeatures, &feats}}); },
                 "graph 'embed': the input shapes lie outside every profile of its engine",
                 "a prompt longer than the engines'");
    const fastv::Links links{{fastv::kInputsEmbeds, {"embed", fastv::kInputsEmbeds}}};
    expect_error([&] { f.ex->call("pre_k", fastv::Phase::Decode, {}, links, {}); },
                 "input 'inputs_embeds' is linked to graph 'embed', which has not run",
                 "a link to a graph that has not run");
  }
  // past the engines' new tokens: the decode profile refuses, naming it
  {
    Fakes f = device_executor(b);
    const fastv::Inputs in =   // kPrompt tokens, kMaxImageTokens of them image tokens
        prompt({cat(cat({1, 2}, std::vector<int64_t>(kMaxImageTokens, kImageToken)), {4, 5})}, {4, 1, 2});
    expect_error([&] { fastv::generate(b, *f.ex, in, kNew + 2); },
                 "of its 'decode' profile (manifest field 'engines.engines.pre_k.profiles'); rebuild with "
                 "larger --max-prompt/--max-batch/--max-new-tokens",
                 "more new tokens than the engines were built for");
  }
  // an engine output whose shape has an unknown (-1) dimension: refused at load, not sized 0
  expect_error([&] { device_executor(b, [](FakeGraph& g) { g.unknown_output_dim = true; }); },
               "graph 'vision' output 'image_features' at the profile maxima has the shape [-1, 4]",
               "an output with a -1 dimension at load");
  // an engine with another number of profiles than the manifest lists
  expect_error([&] { device_executor(b, [](FakeGraph& g) { g.profiles = 1; }); },
               "graph 'embed': the engine has 1 optimization profiles, the manifest field "
               "'engines.engines.embed.profiles' lists 2",
               "a profile count differing from the manifest's");
}

// call_stacked: a run of vision calls with more rows than any engine input of that name takes; a call i > 0 first
void stacked_refusals() {
  const fastv::Bundle b = fake_bundle();
  Fakes f = device_executor(b);
  Tensor px = Tensor::zeros(DType::F32, {kMaxPatches, 3, 2, 2});
  const fastv::Feeds feeds{{fastv::kPixelValues, &px}};
  expect_error(
      [&] {
        for (size_t i = 0; i < 3; ++i) f.ex->call_stacked("vision", fastv::Phase::Prefill, feeds, i);
      },
      "graph 'vision': output 'image_features' [32, 4] exceeds its buffer", "stacked vision rows past the buffer");
  Fakes g = device_executor(b);
  bool refused = false;
  try {
    g.ex->call_stacked("vision", fastv::Phase::Prefill, feeds, 1);
  } catch (const std::logic_error&) {
    refused = true;
  }
  check(refused, "call_stacked: call 1 without call 0 is refused");
  check(g.ex->counters().device_to_host_bytes == 0, "call_stacked copies nothing back");
}

}  // namespace

int main() {
  try {
    memory_counters();
    device_generation("one row, one image", {cat(cat({1, 2, 3}, image()), {4, 5})}, 6);
    device_generation("two rows left-padded, one image each",
                      {cat(cat({1, 2}, image()), {4, 5, 6}), cat(cat({7}, image()), {8})}, kNew);
    device_generation("one token", {cat({3}, image())}, 1);
    g_levels = 2;   // DeepStack: level 0 added in pre_k, level 1 passed to post_k
    device_generation("DeepStack, two rows", {cat(cat({1, 2}, image()), {4, 5, 6}), cat(cat({7}, image()), {8})}, 5);
    g_levels = 0;
    // Qwen2.5-VL-like: vision calls of different sizes (4, 1 and 2 patches: 16, 4 and 8 image tokens), the first two
    // written in place, the third (not 256-byte aligned there) moved into place on the device
    device_generation("vision calls of 4, 1 and 2 patches",
                      {cat(cat({1, 2}, std::vector<int64_t>(kMaxImageTokens, kImageToken)), {4, 5})}, 6, {4, 1, 2});
    g_levels = 2;
    device_generation("DeepStack, two rows, vision calls of 2, 1 and 1 patches",
                      {cat(cat({1}, std::vector<int64_t>(8, kImageToken)), {4, 5}),
                       cat(cat(cat({7}, image()), {8}), image())},
                      4, {2, 1, 1});
    g_levels = 0;
    refusals();
    stacked_refusals();
  } catch (const std::exception& e) {
    check(false, std::string("uncaught: ") + e.what());
  }
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
