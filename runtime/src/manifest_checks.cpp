// What the manifest's JSON Schema cannot say, checked as fastv_export/bundle/verify.py checks it
// (_check_consistency, _check_engines): K and R, the image-token runs, the KV-cache layers, every graph's
// inputs and outputs against the graph spec (graphs/spec.py, here with the names of fastv/graph_names.hpp),
// the serving files, the engines section against its limits. Also the file names that would leave the
// bundle directory ('..', absolute paths, symbolic links pointing out), refused before anything is opened.
// Every check runs after check_manifest_schema(): the types and ranges are the schema's.
#include "fastv/runtime.hpp"

#include <algorithm>
#include <numeric>

namespace fs = std::filesystem;
using nlohmann::json;

namespace fastv {

namespace {

using Wide = __int128;   // Python's integers do not overflow: neither does this arithmetic

Wide num(const json& v) {
  return v.is_number_unsigned() ? static_cast<Wide>(v.get<uint64_t>()) : static_cast<Wide>(v.get<int64_t>());
}

std::string str(Wide v) {
  if (v == 0) return "0";
  const bool neg = v < 0;
  std::string s;
  for (; v != 0; v /= 10) s += static_cast<char>('0' + static_cast<int>(neg ? -(v % 10) : v % 10));
  if (neg) s += '-';
  return std::string(s.rbegin(), s.rend());
}

std::string short_json(const json& v, size_t limit = 60) {
  std::string text = v.dump(-1, ' ', true, json::error_handler_t::replace);
  return text.size() <= limit ? text : text.substr(0, limit - 3) + "...";
}

struct Failer {
  std::string where;
  [[noreturn]] void operator()(const std::string& path, const std::string& what) const {
    const std::string fix = path.rfind("engines", 0) == 0 ? "rebuild the engines with `fastv-export build`"
                                                          : "re-export the bundle";
    throw Error(where + " field '" + path + "': " + what + "; " + fix);
  }
};

// ---- the graph spec (graphs/spec.py bundle_graphs + io_table) ----------------------------------------------
json row(const std::string& name, const std::string& dtype, const json& dims, const json& sizes) {
  json shape = json::array();
  for (const auto& d : dims)
    shape.push_back(d.is_string() && sizes.contains(d.get<std::string>()) ? sizes[d.get<std::string>()] : d);
  return {{"name", name}, {"dtype", dtype}, {"shape", shape}};
}

struct SpecTables {
  std::map<std::string, json> inputs, outputs;
};

SpecTables graph_spec(const json& m) {
  const json& src = m["source_model"];
  const json& it = m["image_tokens"];
  const int64_t k = m["fastv"]["k"].get<int64_t>(), layers = src["num_layers"].get<int64_t>();
  const int64_t deepstack = src.value("deepstack_layers", 0);
  const int64_t rank = m["positions"]["rank"].get<int64_t>();
  const std::string f = m["precision"] == "fp16" ? "float16" : "float32";
  const std::string i64 = "int64";
  const json sizes = {{"hidden_size", src["hidden_size"]}, {"vocab_size", src["vocab_size"]},
                      {"num_kv_heads", m["kv_cache"]["num_kv_heads"]}, {"head_dim", m["kv_cache"]["head_dim"]},
                      {"tokens_per_image", it["per_image"]}};
  const std::string layout = it.contains("vision_layout") ? it["vision_layout"]["kind"].get<std::string>() : "fixed";
  const json& pixel = it["vision_input"]["shape"];
  auto tail = [&](size_t n) {
    json out = json::array();
    for (size_t i = pixel.size() > n ? pixel.size() - n : 0; i < pixel.size(); ++i) out.push_back(pixel[i]);
    return out;
  };
  auto levels = [&](json& list, const char* prefix, int64_t from, int64_t to, const json& dims) {
    for (int64_t l = from; l < to; ++l) list.push_back(row(level_name(prefix, static_cast<int>(l)), f, dims, sizes));
  };
  auto kv = [&](json& list, bool past, int64_t from, int64_t to, const char* seq) {
    for (int64_t l = from; l < to; ++l)
      for (const char* kind : kKvKinds)
        list.push_back(row(past ? past_name(static_cast<int>(l), kind) : present_name(static_cast<int>(l), kind), f,
                           {"batch", "num_kv_heads", seq, "head_dim"}, sizes));
  };
  auto positions = [&](const std::string& name, const char* seq) {
    return row(name, i64, rank == 2 ? json{"batch", seq} : json{3, "batch", seq}, sizes);
  };
  SpecTables t;
  // vision
  json vin = json::array(), vout = json::array();
  std::string tokens = "unit_tokens";
  if (layout == "fixed") {
    vin.push_back(row(kPixelValues, f, pixel, sizes));
    tokens = "tokens_per_image";
  } else if (layout == "patch_grid") {
    json dims = json::array({"patches"});
    for (const auto& d : tail(1)) dims.push_back(d);
    vin.push_back(row(kPixelValues, f, dims, sizes));
    vin.push_back(row(kVisionPositionIds, i64, {"patches", 2}, sizes));
    vin.push_back(row(kWindowIndex, i64, {"merged_patches"}, sizes));
    vin.push_back(row(kCuWindowSeqlens, i64, {"window_bounds"}, sizes));
  } else {
    json dims = json::array({"tiles"});
    for (const auto& d : tail(3)) dims.push_back(d);
    vin.push_back(row(kPixelValues, f, dims, sizes));
    vin.push_back(row(kPackIndex, i64, {"unit_tokens"}, sizes));
  }
  vout.push_back(row(kImageFeatures, f, {tokens, "hidden_size"}, sizes));
  levels(vout, kDeepstackFeatures, 0, deepstack, {tokens, "hidden_size"});
  t.inputs["vision"] = vin;
  t.outputs["vision"] = vout;
  // embed
  json ein = json::array({row(kInputIds, i64, {"batch", "seq"}, sizes),
                          row(kImageFeatures, f, {"image_tokens", "hidden_size"}, sizes)});
  levels(ein, kDeepstackFeatures, 0, deepstack, {"image_tokens", "hidden_size"});
  json eout = json::array({row(kInputsEmbeds, f, {"batch", "seq", "hidden_size"}, sizes)});
  levels(eout, kDeepstackEmbeds, 0, deepstack, {"batch", "seq", "hidden_size"});
  t.inputs["embed"] = ein;
  t.outputs["embed"] = eout;
  // pre_k
  auto decoder_inputs = [&](const char* first, int64_t from, int64_t to) {
    json list = json::array({row(first, f, {"batch", "seq", "hidden_size"}, sizes),
                             row(kAttentionMask, i64, {"batch", "total_seq"}, sizes), positions(kPositionIds, "seq")});
    kv(list, true, from, to, "past_seq");
    return list;
  };
  json pin = decoder_inputs(kInputsEmbeds, 0, k);
  levels(pin, kDeepstackEmbeds, 0, deepstack, {"batch", "seq", "hidden_size"});
  pin.push_back(row(kCandidatePositions, i64, {"batch", "num_candidates"}, sizes));
  json pout = json::array({row(kHiddenStates, f, {"batch", "kept_seq", "hidden_size"}, sizes),
                           positions(kSelectedPositionIds, "kept_seq"),
                           row(kKeptIndices, i64, {"batch", "kept_seq"}, sizes)});
  levels(pout, kKeptDeepstackEmbeds, k, std::max(k, deepstack), {"batch", "kept_seq", "hidden_size"});
  kv(pout, false, 0, k, "total_seq");
  t.inputs["pre_k"] = pin;
  t.outputs["pre_k"] = pout;
  // post_k
  json qin = decoder_inputs(kHiddenStates, k, layers);
  levels(qin, kKeptDeepstackEmbeds, k, std::max(k, deepstack), {"batch", "seq", "hidden_size"});
  json qout = json::array({row(kLogits, f, {"batch", 1, "vocab_size"}, sizes)});
  kv(qout, false, k, layers, "total_seq");
  t.inputs["post_k"] = qin;
  t.outputs["post_k"] = qout;
  return t;
}

// ---- engines (fastv_export/engines/profiles.py lengths, kv_cache_bytes) -------------------------------------
constexpr int64_t kDefaultTextTokens = 64;   // profiles.DEFAULT_TEXT_TOKENS

struct Lengths {
  Wide prompt = 0, image_tokens = 0, kept = 0, new_tokens = 0;
};

Lengths engine_lengths(const json& m, const json& limits, const Failer& fail) {
  const json& it = m["image_tokens"];
  const Wide images = num(limits["images"]);
  Wide runs = 0;
  for (const auto& r : it["prompt_tokens_per_image"]) runs += num(r[1]);
  const Wide prompt_tokens = images * runs;
  const Wide n = limits["max_prompt"].is_null() ? prompt_tokens + kDefaultTextTokens : num(limits["max_prompt"]);
  if (prompt_tokens >= n)
    fail("engines.limits", "--max-prompt " + str(n) + " leaves no room for text: " + str(images) + " image(s) take " +
                               str(prompt_tokens) + " prompt tokens; raise --max-prompt or lower --images");
  const Wide mm = images * num(it["per_image"]);
  const json& fv = m["fastv"];
  const Wide keep = fv["keep"].is_null() ? -1 : num(fv["keep"]);
  const Wide kept_m = keep >= 0 ? std::min(keep, mm) : mm - (mm * num(fv["ratio_num"])) / num(fv["ratio_den"]);
  return {n, mm, n - mm + kept_m, num(limits["max_new_tokens"])};
}

void check_engines(const json& m, const SpecTables& spec, const Failer& fail) {
  const json& sec = m["engines"];
  const json& files = m["files"];
  if (sec["precision"] != m["precision"])
    fail("engines.precision",
         short_json(sec["precision"]) + " is not the bundle's precision " + short_json(m["precision"]));
  const bool has_plugin = !sec["plugin"].is_null();
  if ((sec["token_select"] == "plugin") != has_plugin)
    fail("engines.token_select", short_json(sec["token_select"]) + " does not agree with engines.plugin (" +
                                     (has_plugin ? "set" : "null") + ")");
  if (has_plugin && !files.contains(kPluginLibrary))
    fail("engines.plugin", std::string("is set but 'files' does not list ") + kPluginLibrary);
  for (const char* key : {"timing_cache", "trtexec_script"})
    if (!files.contains(sec[key].get<std::string>()))
      fail(std::string("engines.") + key, "names " + short_json(sec[key]) + ", which 'files' does not list");
  const json& limits = sec["limits"];
  const Lengths n = engine_lengths(m, limits, fail);
  const std::pair<const char*, Wide> want[] = {
      {"prompt", n.prompt}, {"image_tokens", n.image_tokens}, {"kept", n.kept}, {"new_tokens", n.new_tokens}};
  for (const auto& [key, value] : want)
    if (num(sec["lengths"][key]) != value)
      fail(std::string("engines.lengths.") + key, short_json(sec["lengths"][key]) + " is not " + str(value) +
                                                      " (what engines.limits imply)");
  const Wide k = num(m["fastv"]["k"]), layers = num(m["source_model"]["num_layers"]);
  const Wide item = m["precision"] == "fp16" ? 2 : 4;
  for (const char* graph : kGraphs) {
    const json& e = sec["engines"][graph];
    const std::string at = std::string("engines.engines.") + graph;
    const std::string file = e["file"].get<std::string>();
    if (file != std::string(graph) + ".engine")
      fail(at + ".file", short_json(e["file"]) + " is not \"" + graph + ".engine\"");
    if (!files.contains(file)) fail(at + ".file", "names " + short_json(e["file"]) + ", which 'files' does not list");
    if (num(e["bytes"]) != num(files[file]["bytes"]))
      fail(at + ".bytes",
           short_json(e["bytes"]) + " is not files." + file + ".bytes (" + files[file]["bytes"].dump() + ")");
    const int want_plugin = std::string(graph) == "pre_k" && has_plugin ? 1 : 0;
    if (num(e["plugin_layers"]) != want_plugin)
      fail(at + ".plugin_layers", short_json(e["plugin_layers"]) + " is not " + std::to_string(want_plugin));
    const Wide count = std::string(graph) == "pre_k" ? k : std::string(graph) == "post_k" ? layers - k : 0;
    const Wide tokens = (std::string(graph) == "pre_k" ? n.prompt : n.kept) + n.new_tokens;
    const Wide kv = count * 2 * num(limits["max_batch"]) * num(m["kv_cache"]["num_kv_heads"]) * tokens *
                    num(m["kv_cache"]["head_dim"]) * item;
    if (num(e["kv_cache_bytes_at_max"]) != kv)
      fail(at + ".kv_cache_bytes_at_max", short_json(e["kv_cache_bytes_at_max"]) + " is not " + str(kv) +
                                             " (what engines.limits imply)");
    // the graph's dynamic inputs (a dim that is a name) and their shapes
    std::vector<std::pair<std::string, json>> dynamic;
    for (const auto& t : spec.inputs.at(graph)) {
      const json& shape = t["shape"];
      if (std::any_of(shape.begin(), shape.end(), [](const json& d) { return d.is_string(); }))
        dynamic.emplace_back(t["name"].get<std::string>(), shape);
    }
    json names = json::array(), want_names = json::array();
    for (const auto& p : e["profiles"]) names.push_back(p["name"]);
    if (!dynamic.empty()) want_names = std::string(graph) == "vision" ? json{"media"} : json{"prefill", "decode"};
    if (names != want_names)
      fail(at + ".profiles", "are " + short_json(names) + ", expected " + short_json(want_names));
    json dyn_names = json::array();
    for (const auto& d : dynamic) dyn_names.push_back(d.first);
    for (size_t i = 0; i < e["profiles"].size(); ++i) {
      const json& shapes = e["profiles"][i]["shapes"];
      const std::string pat = at + ".profiles[" + std::to_string(i) + "].shapes";
      // nlohmann::json keeps object keys sorted: the names are compared as a set (Python also checks their order,
      // which no reader of the engines section depends on)
      json got = json::array(), want_sorted = dyn_names;
      for (auto s = shapes.begin(); s != shapes.end(); ++s) got.push_back(s.key());
      std::sort(want_sorted.begin(), want_sorted.end());
      if (got != want_sorted)
        fail(pat, "name " + short_json(got) + ", the graph's dynamic inputs are " + short_json(dyn_names));
      for (const auto& [tensor, dims] : dynamic) {
        const json& r = shapes[tensor];
        for (const char* bound : {"min", "opt", "max"}) {
          const json& shape = r[bound];
          bool fits = shape.size() == dims.size();
          for (size_t d = 0; fits && d < dims.size(); ++d)
            if (dims[d].is_number_integer() && num(dims[d]) != num(shape[d])) fits = false;
          if (!fits)
            fail(pat + "." + tensor + "." + bound,
                 short_json(shape) + " does not fit the input's shape " + short_json(dims));
        }
        for (size_t d = 0; d < r["min"].size() && d < r["opt"].size() && d < r["max"].size(); ++d)
          if (!(num(r["min"][d]) <= num(r["opt"][d]) && num(r["opt"][d]) <= num(r["max"][d])))
            fail(pat + "." + tensor, "min <= opt <= max does not hold");
      }
    }
  }
}

bool leaves_directory(const std::string& name) {
  if (name.empty()) return false;
  if (name.front() == '/' || name.front() == '\\' || (name.size() > 1 && name[1] == ':')) return true;
  size_t start = 0;
  while (start <= name.size()) {
    const size_t end = name.find_first_of("/\\", start);
    if (name.substr(start, end == std::string::npos ? std::string::npos : end - start) == "..") return true;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return false;
}

}  // namespace

// serving roles that name a file of the bundle (fastv_export/bundle/verify.py SERVING_ROLES)
static const char* const kServingRoles[] = {"tokenizer", "tokenizer_config", "special_tokens_map", "chat_template",
                                            "image_processor", "video_processor", "processor", "generation_config"};

void check_manifest_paths(const json& m, const std::string& where) {
  const Failer fail{where};
  auto check = [&](const json& v, const std::string& path) {
    if (v.is_string() && leaves_directory(v.get<std::string>()))
      fail(path, short_json(v) + " names a file outside the bundle directory (an absolute path or one through "
                                 "'..'); every file of a bundle is a plain name inside it");
  };
  if (m.contains("files") && m["files"].is_object())
    for (auto it = m["files"].begin(); it != m["files"].end(); ++it)
      if (leaves_directory(it.key()))
        fail("files", "the entry " + short_json(it.key()) + " names a file outside the bundle directory (an "
                      "absolute path or one through '..'); every file of a bundle is a plain name inside it");
  const json* graphs = m.contains("graphs") && m["graphs"].is_object() ? &m["graphs"] : nullptr;
  if (graphs)
    for (auto it = graphs->begin(); it != graphs->end(); ++it)
      if (it.value().is_object() && it.value().contains("file"))
        check(it.value()["file"], "graphs." + it.key() + ".file");
  if (m.contains("engines") && m["engines"].is_object()) {
    const json& sec = m["engines"];
    for (const char* key : {"timing_cache", "trtexec_script"})
      if (sec.contains(key)) check(sec[key], std::string("engines.") + key);
    if (sec.contains("engines") && sec["engines"].is_object())
      for (auto it = sec["engines"].begin(); it != sec["engines"].end(); ++it)
        if (it.value().is_object() && it.value().contains("file"))
          check(it.value()["file"], "engines.engines." + it.key() + ".file");
  }
  if (m.contains("serving") && m["serving"].is_object())
    for (const char* role : kServingRoles)
      if (m["serving"].contains(role)) check(m["serving"][role], std::string("serving.") + role);
}

fs::path bundle_file(const fs::path& dir, const std::string& name, const std::string& field) {
  if (leaves_directory(name))
    throw Error((dir / kManifest).string() + " field '" + field + "' names " + short_json(name) +
                ", a file outside the bundle directory; re-export the bundle");
  const fs::path f = dir / name;
  std::error_code ec;
  if (!fs::is_symlink(fs::symlink_status(f, ec))) return f;
  const fs::path root = fs::weakly_canonical(dir, ec);
  const fs::path target = fs::weakly_canonical(f, ec);
  const auto rel = target.lexically_relative(root);
  if (ec || rel.empty() || *rel.begin() == "..")
    throw Error(f.string() + " is a symbolic link to " + target.string() + ", outside the bundle directory (" +
                kManifest + " field '" + field + "'): copy the file into the bundle or re-export it");
  return f;
}

void check_manifest_consistency(const json& m, const std::string& where) {
  const Failer fail{where};
  const json &src = m["source_model"], &fv = m["fastv"], &it = m["image_tokens"];
  const Wide layers = num(src["num_layers"]), k = num(fv["k"]);
  if (k >= layers) fail("fastv.k", str(k) + " is not below source_model.num_layers (" + str(layers) + ")");
  const Wide rn = num(fv["ratio_num"]), rd = num(fv["ratio_den"]);
  const std::string ratio = str(rn) + "/" + str(rd);
  if (rn >= rd)
    fail("fastv.ratio_num", str(rn) + " is not below fastv.ratio_den (" + str(rd) + "): R = ratio_num/ratio_den "
                            "must lie in [0, 1)");
  if (std::gcd(static_cast<int64_t>(rn), static_cast<int64_t>(rd)) != 1)
    fail("fastv.ratio_num", ratio + " is not in lowest terms");
  if (fv["ratio"] != ratio)
    fail("fastv.ratio", short_json(fv["ratio"]) + " is not ratio_num/ratio_den (" + ratio + ")");
  if (!fv["keep"].is_null() && !(rn == 0 && rd == 1))
    fail("fastv.keep", fv["keep"].dump() + " is given with a ratio of " + ratio + ": a bundle has one or the other");
  // image tokens: compact runs, their image-token count, the vision input
  const json& runs = it["prompt_tokens_per_image"];
  for (size_t i = 1; i < runs.size(); ++i)
    if (runs[i][0] == runs[i - 1][0])
      fail("image_tokens.prompt_tokens_per_image[" + std::to_string(i) + "]",
           "repeats the token id of run " + std::to_string(i - 1) + ": runs must be compact ([token_id, count])");
  Wide count = 0;
  for (const auto& r : runs)
    if (std::find(it["token_ids"].begin(), it["token_ids"].end(), r[0]) != it["token_ids"].end()) count += num(r[1]);
  if (count != num(it["per_image"]))
    fail("image_tokens.prompt_tokens_per_image", "holds " + str(count) + " image tokens (ids in token_ids), "
                                                 "image_tokens.per_image says " + it["per_image"].dump());
  if (it["vision_input"] != m["graphs"]["vision"]["inputs"][0])
    fail("image_tokens.vision_input", "differs from graphs.vision.inputs[0]");
  const json layout = it.contains("vision_layout") ? it["vision_layout"] : json{{"kind", "fixed"}};
  const std::string kind = layout["kind"].get<std::string>();
  std::vector<const char*> need;
  if (kind == "patch_grid") need = {"patch_size", "temporal_patch_size", "spatial_merge_size", "window_size"};
  if (kind == "tiles")
    need = {"tile", "patches_per_side", "pinpoints", "max_num_patches", "pooled_side", "default_size", "default_tiles"};
  std::string missing;
  for (const char* key : need)
    if (!layout.contains(key)) missing += (missing.empty() ? "" : ", ") + std::string(key);
  if (!missing.empty()) fail("image_tokens.vision_layout", "kind '" + kind + "' needs the fields " + missing);
  const json& pos = m["positions"];
  if (kind == "patch_grid" && pos.contains("spatial_merge_size") &&
      layout["spatial_merge_size"] != pos["spatial_merge_size"])   // one merge size for vision feeds and positions
    fail("image_tokens.vision_layout.spatial_merge_size", "is " + layout["spatial_merge_size"].dump() +
                                                          ", positions.spatial_merge_size says " +
                                                          pos["spatial_merge_size"].dump());
  if (pos["rank"] == 3) {
    if (!it.contains("grid_thw"))
      throw Error(where + ": required field 'image_tokens.grid_thw' is missing (rank-3 positions); "
                  "re-export the bundle");
    const json& g = it["grid_thw"];
    const Wide merge = num(pos["spatial_merge_size"]);
    const Wide merged = num(g[0]) * num(g[1]) * num(g[2]) / (merge * merge);
    if (merged != num(it["per_image"]))
      fail("image_tokens.grid_thw", short_json(g) + " merges to " + str(merged) +
                                        " tokens, image_tokens.per_image says " + it["per_image"].dump());
  }
  // the KV cache
  const std::string float_dtype = m["precision"] == "fp16" ? "float16" : "float32";
  const json& kv = m["kv_cache"];
  if (kv["dtype"] != float_dtype)
    fail("kv_cache.dtype", short_json(kv["dtype"]) + " is not \"" + float_dtype + "\" (precision " +
                               m["precision"].get<std::string>() + ")");
  if (static_cast<Wide>(kv["layers"].size()) != layers)
    fail("kv_cache.layers",
         "has " + std::to_string(kv["layers"].size()) + " entries, source_model.num_layers is " + str(layers));
  for (size_t i = 0; i < kv["layers"].size(); ++i) {
    const json& layer = kv["layers"][i];
    const std::string want = static_cast<Wide>(i) < k ? "pre_k" : "post_k";
    const std::string at = "kv_cache.layers[" + std::to_string(i) + "]";
    if (num(layer["layer"]) != static_cast<Wide>(i))
      fail(at + ".layer", layer["layer"].dump() + " is not " + std::to_string(i));
    if (layer["graph"] != want)
      fail(at + ".graph", short_json(layer["graph"]) + " is not \"" + want + "\" (K=" + str(k) + ")");
  }
  // every graph's inputs and outputs against the graph spec
  const SpecTables spec = graph_spec(m);
  const json& files = m["files"];
  for (const char* graph : kGraphs) {
    const json& entry = m["graphs"][graph];
    const std::string at = std::string("graphs.") + graph;
    if (entry["file"] != std::string(graph) + ".onnx")
      fail(at + ".file", short_json(entry["file"]) + " is not \"" + graph + ".onnx\"");
    if (!files.contains(entry["file"].get<std::string>()))
      throw Error(where + ": field '" + at + ".file' names " + short_json(entry["file"]) +
                  ", which 'files' does not list; re-export the bundle");
    for (const char* io : {"inputs", "outputs"}) {
      const json& want = std::string(io) == "inputs" ? spec.inputs.at(graph) : spec.outputs.at(graph);
      const json& got = entry[io];
      if (got.size() != want.size()) {
        json names = json::array();
        for (const auto& t : want) names.push_back(t["name"]);
        fail(at + "." + io, "has " + std::to_string(got.size()) + " tensors, the graph spec has " +
                                std::to_string(want.size()) + " (" + short_json(names) + ")");
      }
      for (size_t i = 0; i < got.size(); ++i)
        for (const char* key : {"name", "dtype", "shape"})
          if (got[i][key] != want[i][key])
            fail(at + "." + io + "[" + std::to_string(i) + "]." + key,
                 short_json(got[i][key]) + " is not " + short_json(want[i][key]) + " (graph spec)");
    }
  }
  const json& opsets = m["graphs"]["pre_k"]["opsets"];
  if (!opsets.contains("fastv") || opsets["fastv"] != 1)   // graphs/op.py OP_DOMAIN, OP_VERSION
    fail("graphs.pre_k.opsets.fastv", (opsets.contains("fastv") ? short_json(opsets["fastv"]) : std::string("null")) +
                                          " is not 1 (fastv::TokenSelect's version)");
  for (const char* role : kServingRoles) {
    const json& name = m["serving"][role];
    if (!name.is_null() && !files.contains(name.get<std::string>()))
      throw Error(where + ": field 'serving." + role + "' names " + short_json(name) +
                  ", which 'files' does not list; re-export the bundle");
  }
  if (!m["engines"].is_null()) check_engines(m, spec, fail);
}

}  // namespace fastv
