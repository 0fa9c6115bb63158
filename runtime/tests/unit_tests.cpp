// Host unit tests of fastv_runtime (no bundle, no GPU): position rules, candidates, sha256, errors, and the
// golden vectors that the Python implementation wrote (runtime/tests/data/golden.json, scripts/write_cpp_golden.py):
// position ids of every family and media mix, candidate positions, patch_grid feeds, the manifest's required fields
// and the graph I/O names (fastv/graph_names.hpp against graphs/spec.py, and the names generate() feeds each graph).
//
// usage: fastv_runtime_tests [unit | golden [FILE]]   (default: both; FILE defaults to the source tree's golden.json)
#include "fastv/runtime.hpp"

#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <set>

#ifndef FASTV_GOLDEN_FILE
#define FASTV_GOLDEN_FILE "runtime/tests/data/golden.json"
#endif

#include "check.hpp"

namespace {

using fastv::Tensor;
using nlohmann::json;

using fastv_test::check;
using fastv_test::failed;
using fastv_test::passed;

std::vector<int64_t> values(const fastv::Tensor& t) {
  return std::vector<int64_t>(t.as<int64_t>(), t.as<int64_t>() + t.numel());
}

bool throws_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const fastv::Error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

// ------------------------------------------------------------------------------- hand-written unit checks
void unit_checks() {
  // the manifest's JSON Schema (compiled in) loads: every keyword it uses is one the C++ validator reads
  try {
    fastv::check_manifest_schema_loads();
    check(true, "manifest schema loads");
  } catch (const fastv::Error& e) {
    check(false, std::string("manifest schema loads: ") + e.what());
  }
  check(throws_with([] { fastv::check_manifest_schema(json::object(), "m.json"); }, "m.json: required field '"),
        "schema: an empty manifest misses a required field");
  check(throws_with([] { fastv::check_manifest_paths({{"graphs", {{"embed", {{"file", "../x.onnx"}}}}}}, "m.json"); },
                    "m.json field 'graphs.embed.file': \"../x.onnx\" names a file outside the bundle directory"),
        "paths: '..' in graphs.embed.file");
  check(throws_with([] { fastv::check_manifest_paths({{"files", {{"/etc/passwd", json::object()}}}}, "m.json"); },
                    "the entry \"/etc/passwd\" names a file outside"),
        "paths: an absolute 'files' entry");
  check(throws_with([] { fastv::bundle_file("/tmp", "a/../../x", "files"); }, "a file outside the bundle directory"),
        "bundle_file: '..' inside a name");
  check(fastv::bundle_file("/tmp", "x.onnx", "files") == std::filesystem::path("/tmp/x.onnx"),
        "bundle_file: a plain name");
  fastv::Bundle rope;
  rope.position_rank = 2;
  rope.image_token_ids = {500};
  rope.tokens_per_image = 2;
  // left-padded batch of 2: [pad, 1, 500, 500, 7] and [1, 9, 500, 500, 7]
  const Tensor ids = Tensor::from_i64({2, 5}, {0, 1, 500, 500, 7, 1, 9, 500, 500, 7});
  const Tensor mask = Tensor::from_i64({2, 5}, {0, 1, 1, 1, 1, 1, 1, 1, 1, 1});
  const Tensor pos = fastv::prefill_positions(rope, ids, mask);
  check(values(pos) == std::vector<int64_t>{1, 0, 1, 2, 3, 0, 1, 2, 3, 4}, "rank-2 positions: cumsum(mask)-1, padding 1");
  check(values(fastv::decode_positions(pos, 2)) == std::vector<int64_t>{6, 7}, "rank-2 decode: max + 1 + t");
  check(values(fastv::find_candidates(rope, ids)) == std::vector<int64_t>{2, 3, 2, 3}, "candidates per row");
  const Tensor uneven = Tensor::from_i64({2, 3}, {500, 1, 2, 500, 500, 3});
  check(throws_with([&] { fastv::find_candidates(rope, uneven); }, "different numbers of image tokens"),
        "rows with different image-token counts are refused");

  fastv::Bundle mrope = rope;
  mrope.position_rank = 3;
  mrope.spatial_merge_size = 2;
  mrope.grid_thw = {1, 4, 6};   // (1, 2, 3) after merging: 6 tokens
  mrope.tokens_per_image = 6;
  const Tensor mids = Tensor::from_i64({1, 9}, {0, 1, 500, 500, 500, 500, 500, 500, 7});
  const Tensor mmask = Tensor::from_i64({1, 9}, {0, 1, 1, 1, 1, 1, 1, 1, 1});
  const Tensor mpos = fastv::prefill_positions(mrope, mids, mmask);
  check(mpos.shape == std::vector<int64_t>{3, 1, 9}, "M-RoPE shape [3, B, n]");
  // text 1 -> 0; image offset 1: t = 1, h = 1 + (0,0,0,1,1,1), w = 1 + (0,1,2,0,1,2); text 7 -> 1 + 2 + 1 = 4
  check(values(mpos) == std::vector<int64_t>{0, 0, 1, 1, 1, 1, 1, 1, 4,
                                             0, 0, 1, 1, 1, 2, 2, 2, 4,
                                             0, 0, 1, 2, 3, 1, 2, 3, 4},
        "M-RoPE prefill triples (padding 0)");
  check(values(fastv::decode_positions(mpos, 0)) == std::vector<int64_t>{5, 5, 5}, "M-RoPE decode: max + 1 + t");

  const std::string tmp = "fastv_runtime_tests.tmp";
  { std::ofstream(tmp) << "abc"; }
  check(fastv::sha256_file(tmp) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256 of 'abc'");
  std::remove(tmp.c_str());
  check(throws_with([] { fastv::load_bundle("no-such-bundle-dir"); }, "is not a bundle directory"),
        "a missing bundle directory is one clear error");
}

// ------------------------------------------------------------------------------------------- golden vectors
// A nested JSON list of integers as (shape, row-major values).
struct Flat {
  std::vector<int64_t> shape, values;
};

void flatten(const json& j, size_t depth, Flat& f) {
  if (!j.is_array()) {
    f.values.push_back(j.get<int64_t>());
    return;
  }
  if (depth == f.shape.size()) f.shape.push_back(static_cast<int64_t>(j.size()));
  else if (f.shape[depth] != static_cast<int64_t>(j.size())) throw std::runtime_error("ragged golden array");
  for (const auto& x : j) flatten(x, depth + 1, f);
}

Flat flat(const json& j) {
  Flat f;
  flatten(j, 0, f);
  return f;
}

Tensor i64_tensor(const json& j) {
  const Flat f = flat(j);
  return Tensor::from_i64(f.shape, f.values);
}

std::string index_str(size_t i, const std::vector<int64_t>& shape) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    idx[d] = static_cast<int64_t>(i % static_cast<size_t>(shape[d]));
    i /= static_cast<size_t>(shape[d]);
  }
  return fastv::shape_str(idx);
}

// the C++ result against the Python one: shape, then the first element that differs
void expect_equal(const Tensor& got, const json& want, const std::string& what) {
  const Flat w = flat(want);
  if (got.dtype != fastv::DType::I64 || got.shape != w.shape) {
    check(false, what + ": C++ gives " + fastv::dtype_name(got.dtype) + " " + fastv::shape_str(got.shape) +
                     ", Python int64 " + fastv::shape_str(w.shape));
    return;
  }
  const std::vector<int64_t> g = values(got);
  for (size_t i = 0; i < g.size(); ++i)
    if (g[i] != w.values[i]) {
      check(false, what + ": differs at " + index_str(i, w.shape) + ": C++ " + std::to_string(g[i]) + ", Python " +
                       std::to_string(w.values[i]));
      return;
    }
  check(true, what);
}

template <class F>
void guarded(const std::string& what, F&& f) {   // a C++ exception in one case fails that case only
  try {
    f();
  } catch (const std::exception& e) {
    check(false, what + ": C++ threw: " + e.what());
  }
}

std::string joined(const std::set<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return "{" + s + "}";
}

// a vs b as sets: passes when equal, else names what each side lacks
void expect_same_names(const std::set<std::string>& cpp, const std::set<std::string>& python, const std::string& what) {
  std::set<std::string> only_cpp, only_py;
  for (const auto& n : cpp)
    if (!python.count(n)) only_cpp.insert(n);
  for (const auto& n : python)
    if (!cpp.count(n)) only_py.insert(n);
  check(only_cpp.empty() && only_py.empty(),
        what + ": only in C++ " + joined(only_cpp) + ", only in Python " + joined(only_py));
}

template <class Range>
std::set<std::string> name_set(const Range& r) {
  std::set<std::string> s;
  for (const auto& x : r) s.insert(std::string(x));
  return s;
}

void golden_positions(const json& cases) {
  for (const auto& c : cases) {
    const std::string where = "golden positions '" + c.at("case").get<std::string>() + "'";
    guarded(where, [&] {
      fastv::Bundle b;
      fastv::read_position_rules(c.at("manifest"), b, where);
      const Tensor ids = i64_tensor(c.at("input_ids")), mask = i64_tensor(c.at("attention_mask"));
      const auto seconds = c.at("video_seconds").get<std::vector<float>>();
      const auto grids = c.at("media_grids").get<fastv::RowGrids>();
      expect_equal(fastv::prefill_positions(b, ids, mask, seconds, grids), c.at("prefill"), where + " prefill");
      const Tensor prompt = i64_tensor(c.at("prefill"));   // decode continues from Python's prompt positions
      for (const auto& d : c.at("decode")) {
        const int64_t step = d.at("step").get<int64_t>();
        expect_equal(fastv::decode_positions(prompt, step), d.at("positions"),
                     where + " decode step " + std::to_string(step));
      }
      expect_equal(fastv::find_candidates(b, ids), c.at("candidates"), where + " candidates");
    });
  }
}

void golden_refused_candidates(const json& cases) {
  for (const auto& c : cases) {
    const std::string where = "golden candidates '" + c.at("case").get<std::string>() + "'";
    fastv::Bundle b;
    b.image_token_ids = c.at("token_ids").get<std::vector<int64_t>>();
    const Tensor ids = i64_tensor(c.at("input_ids"));
    const std::string error = c.at("error").get<std::string>();
    check(throws_with([&] { fastv::find_candidates(b, ids); }, error),
          where + ": C++ must refuse with '" + error + "'");
  }
}

void golden_patch_grid(const json& cases) {
  for (const auto& c : cases) {
    const int64_t h = c.at("h").get<int64_t>(), w = c.at("w").get<int64_t>();
    const std::string where = "golden patch_grid feeds " + std::to_string(h) + " x " + std::to_string(w);
    guarded(where, [&] {
      const fastv::TensorMap feeds = fastv::patch_grid_feeds(c.at("manifest"), h, w, where);
      std::set<std::string> cpp, py;
      for (const auto& [name, t] : feeds) cpp.insert(name);
      for (auto it = c.at("feeds").begin(); it != c.at("feeds").end(); ++it) py.insert(it.key());
      expect_same_names(cpp, py, where + " names");
      for (auto it = c.at("feeds").begin(); it != c.at("feeds").end(); ++it)
        if (feeds.count(it.key())) expect_equal(feeds.at(it.key()), it.value(), where + " '" + it.key() + "'");
    });
  }
}

// An executor that checks every call's feed names against the spec's inputs of that graph (golden graph_io)
// and returns the spec's outputs (zeros of fitting shapes), so that generate() runs its whole loop.
class SpecExecutor : public fastv::Executor {
 public:
  SpecExecutor(const json& graphs, const fastv::Bundle& b, std::string where)
      : graphs_(graphs), b_(b), where_(std::move(where)) {}
  std::string name() const override { return "spec"; }
  std::map<std::string, int> calls;

  fastv::TensorMap run(const std::string& graph, const fastv::Feeds& feeds) override {
    ++calls[graph];
    fastv::TensorMap out;
    if (!graphs_.contains(graph)) {
      check(false, where_ + ": generate() ran graph '" + graph + "', which the spec does not have");
      return out;
    }
    std::set<std::string> fed;
    for (const auto& [n, t] : feeds) fed.insert(n);
    const std::string what = where_ + ": graph '" + graph + "' call " + std::to_string(calls[graph]) + " inputs";
    expect_same_names(fed, name_set(graphs_[graph]["inputs"].get<std::vector<std::string>>()), what);
    for (const auto& n : graphs_[graph]["outputs"]) out[n.get<std::string>()] = output(graph, n, feeds);
    return out;
  }

 private:
  Tensor output(const std::string& graph, const std::string& name, const fastv::Feeds& feeds) {
    using fastv::DType;
    if (name == fastv::kImageFeatures || fastv::is_level(name, fastv::kDeepstackFeatures))
      return Tensor::zeros(b_.float_dtype, {b_.tokens_per_image, b_.hidden_size});
    const Tensor* first = nullptr;   // [B, seq] ids or [B, seq, D] states of this call
    for (const char* n : {fastv::kInputIds, fastv::kInputsEmbeds, fastv::kHiddenStates})
      if (!first && feeds.count(n)) first = feeds.at(n);
    if (!first) {
      check(false, where_ + ": graph '" + graph + "' was called without token ids or hidden states");
      return Tensor::zeros(DType::I64, {0});
    }
    const int64_t rows = first->shape[0], seq = first->shape[1];
    if (name == fastv::kInputsEmbeds || name == fastv::kHiddenStates ||
        fastv::is_level(name, fastv::kDeepstackEmbeds) || fastv::is_level(name, fastv::kKeptDeepstackEmbeds))
      return Tensor::zeros(b_.float_dtype, {rows, seq, b_.hidden_size});
    if (name == fastv::kSelectedPositionIds && feeds.count(fastv::kPositionIds)) return *feeds.at(fastv::kPositionIds);
    if (name == fastv::kKeptIndices) {
      std::vector<int64_t> kept;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < seq; ++i) kept.push_back(i);
      return Tensor::from_i64({rows, seq}, kept);
    }
    if (name == fastv::kLogits) return Tensor::zeros(b_.float_dtype, {rows, 1, 8});
    if (fastv::is_present(name)) {
      const auto past = feeds.find(fastv::present_to_past(name));
      const int64_t before = past == feeds.end() ? 0 : past->second->shape[2];
      return Tensor::zeros(b_.float_dtype, {rows, b_.num_kv_heads, before + seq, b_.head_dim});
    }
    check(false, where_ + ": graph '" + graph + "' output '" + name + "' of the spec is not one this runtime knows");
    return Tensor::zeros(DType::I64, {0});
  }

  const json& graphs_;
  const fastv::Bundle& b_;
  std::string where_;
};

void golden_graph_io(const json& cases) {
  for (const auto& c : cases) {
    const std::string where = "golden graph I/O '" + c.at("case").get<std::string>() + "'";
    guarded(where, [&] {
      fastv::Bundle b;   // a 4-token image (M-RoPE: a 4 x 4 patch grid, merge 2) in a 6-token prompt
      b.k = c.at("k").get<int>();
      b.num_layers = c.at("num_layers").get<int>();
      b.deepstack_layers = c.at("deepstack").get<int>();
      b.position_rank = c.at("position_rank").get<int>();
      b.vision_layout = c.at("vision_layout").get<std::string>();
      b.hidden_size = 4;
      b.num_kv_heads = 1;
      b.head_dim = 2;
      b.image_token_ids = {500};
      b.tokens_per_image = 4;
      b.spatial_merge_size = 2;
      b.grid_thw = {1, 4, 4};
      fastv::Inputs in;
      in.input_ids = Tensor::from_i64({1, 6}, {1, 500, 500, 500, 500, 7});
      in.attention_mask = Tensor::from_i64({1, 6}, {1, 1, 1, 1, 1, 1});
      in.images.push_back(Tensor::zeros(fastv::DType::F32, {1, 3, 2, 2}));
      if (b.vision_layout == "patch_grid") {
        b.vision_grid_feeds = fastv::patch_grid_feeds(4, 4, 2, 1);
        in.images[0] = Tensor::zeros(fastv::DType::F32, {16, 12});
      }
      SpecExecutor ex(c.at("graphs"), b, where);
      const fastv::Generation g = fastv::generate(b, ex, in, 3);
      check(g.steps == 3, where + ": generate() ran 3 steps");
      for (const char* graph : fastv::kGraphs)
        check(ex.calls[graph] >= 1, where + ": generate() ran graph '" + std::string(graph) + "'");
    });
  }
}

void golden_names(const json& names) {
  const std::map<std::string, std::string> constants = {
      {"PIXEL_VALUES", fastv::kPixelValues}, {"VISION_POSITION_IDS", fastv::kVisionPositionIds},
      {"WINDOW_INDEX", fastv::kWindowIndex}, {"CU_WINDOW_SEQLENS", fastv::kCuWindowSeqlens},
      {"PACK_INDEX", fastv::kPackIndex}, {"IMAGE_FEATURES", fastv::kImageFeatures},
      {"INPUT_IDS", fastv::kInputIds}, {"INPUTS_EMBEDS", fastv::kInputsEmbeds},
      {"ATTENTION_MASK", fastv::kAttentionMask}, {"POSITION_IDS", fastv::kPositionIds},
      {"CANDIDATE_POSITIONS", fastv::kCandidatePositions}, {"HIDDEN_STATES", fastv::kHiddenStates},
      {"SELECTED_POSITION_IDS", fastv::kSelectedPositionIds}, {"KEPT_INDICES", fastv::kKeptIndices},
      {"LOGITS", fastv::kLogits}, {"PAST_PREFIX", fastv::kPastPrefix}, {"PRESENT_PREFIX", fastv::kPresentPrefix},
      {"DEEPSTACK_FEATURES", fastv::kDeepstackFeatures}, {"DEEPSTACK_EMBEDS", fastv::kDeepstackEmbeds},
      {"KEPT_DEEPSTACK_EMBEDS", fastv::kKeptDeepstackEmbeds}};
  std::set<std::string> cpp, py;
  for (const auto& [attr, value] : constants) cpp.insert(attr);
  for (auto it = names.at("constants").begin(); it != names.at("constants").end(); ++it) {
    py.insert(it.key());
    if (constants.count(it.key()))
      check(constants.at(it.key()) == it.value().get<std::string>(),
            "golden name spec." + it.key() + ": C++ \"" + constants.at(it.key()) + "\", Python " + it.value().dump());
  }
  expect_same_names(cpp, py, "golden graph I/O name constants (fastv/graph_names.hpp vs graphs/spec.py)");
  const auto& lists = names.at("lists");
  check(lists.at("GRAPHS").get<std::vector<std::string>>() ==
            std::vector<std::string>(std::begin(fastv::kGraphs), std::end(fastv::kGraphs)),
        "golden spec.GRAPHS == kGraphs");
  check(lists.at("KV_KINDS").get<std::vector<std::string>>() ==
            std::vector<std::string>(std::begin(fastv::kKvKinds), std::end(fastv::kKvKinds)),
        "golden spec.KV_KINDS == kKvKinds");
  check(lists.at("VISION_LAYOUTS").get<std::vector<std::string>>() ==
            std::vector<std::string>(std::begin(fastv::kVisionLayouts), std::end(fastv::kVisionLayouts)),
        "golden spec.VISION_LAYOUTS == kVisionLayouts");
  for (const auto& e : names.at("past_name"))
    check(fastv::past_name(e[0].get<int>(), e[1].get<std::string>()) == e[2].get<std::string>(),
          "golden past_name " + e.dump());
  for (const auto& e : names.at("present_name")) {
    const std::string n = fastv::present_name(e[0].get<int>(), e[1].get<std::string>());
    check(n == e[2].get<std::string>() && fastv::is_present(n), "golden present_name " + e.dump());
  }
  for (const auto& e : names.at("level_name")) {
    const std::string n = fastv::level_name(e[0].get<std::string>(), e[1].get<int>());
    check(n == e[2].get<std::string>() && fastv::is_level(n, e[0].get<std::string>()), "golden level_name " + e.dump());
  }
  for (const auto& e : names.at("present_to_past"))
    check(fastv::present_to_past(e[0].get<std::string>()) == e[1].get<std::string>(),
          "golden present_to_past " + e.dump());
}

void golden_checks(const std::string& path) {
  std::ifstream f(path);
  if (!f) {
    check(false, "golden vectors: cannot read " + path + " (write it with python scripts/write_cpp_golden.py)");
    return;
  }
  json g;
  try {
    g = json::parse(f);
  } catch (const json::parse_error& e) {
    check(false, "golden vectors: " + path + " is not valid JSON (" + e.what() + ")");
    return;
  }
  if (g.value("format", "") != "fastv-golden" || g.value("version", 0) != 1) {
    check(false, "golden vectors: " + path + " is not a version 1 fastv-golden file");
    return;
  }
  const int before = passed + failed;
  check(g.at("schema_version").get<int>() == fastv::kSchemaVersion,
        "golden schema_version: C++ kSchemaVersion " + std::to_string(fastv::kSchemaVersion) + ", Python " +
            g.at("schema_version").dump());
  expect_same_names(name_set(fastv::kRequiredFields),
                    name_set(g.at("manifest_required").get<std::vector<std::string>>()),
                    "golden manifest required fields (kRequiredFields vs manifest.schema.json)");
  golden_names(g.at("graph_names"));
  golden_graph_io(g.at("graph_names").at("graph_io"));
  golden_positions(g.at("positions"));
  golden_refused_candidates(g.at("candidates_refused"));
  golden_patch_grid(g.at("patch_grid_feeds"));
  std::cout << "golden vectors: " << (passed + failed - before) << " checks from " << path << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  if (!only.empty() && only != "unit" && only != "golden") {
    std::cerr << "usage: fastv_runtime_tests [unit | golden [FILE]]\n";
    return 2;
  }
  if (only != "golden") unit_checks();
  if (only != "unit") golden_checks(argc > 2 ? argv[2] : FASTV_GOLDEN_FILE);
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
