// manifest.json: parse (nlohmann-json), verify (the JSON Schema and its cross-checks: manifest_schema.cpp,
// manifest_checks.cpp; files inside the bundle, sizes, sha256 via OpenSSL; the ONNX graphs: onnx_graph_check.cpp),
// read.
#include "fastv/runtime.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;
using nlohmann::json;

namespace fastv {

namespace {

std::string hex(const unsigned char* d, unsigned n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < n; ++i) {
    s += digits[d[i] >> 4];
    s += digits[d[i] & 15];
  }
  return s;
}

// The value at a dotted path ("source_model.num_layers"), or Error naming the field.
const json& field(const json& m, const std::string& path, const std::string& where) {
  const json* cur = &m;
  std::stringstream ss(path);
  std::string part;
  while (std::getline(ss, part, '.')) {
    if (!cur->is_object() || !cur->contains(part))
      throw Error(where + ": required field '" + path + "' is missing; re-export the bundle");
    cur = &(*cur)[part];
  }
  return *cur;
}

int64_t int_field(const json& m, const std::string& path, const std::string& where) {
  const json& v = field(m, path, where);
  if (!v.is_number_integer()) throw Error(where + ": field '" + path + "' must be an integer, got " + v.dump());
  return v.get<int64_t>();
}

std::vector<int64_t> int_list(const json& m, const std::string& path, const std::string& where) {
  const json& v = field(m, path, where);
  if (!v.is_array()) throw Error(where + ": field '" + path + "' must be a list of integers");
  std::vector<int64_t> out;
  for (const auto& x : v) {
    if (!x.is_number_integer()) throw Error(where + ": field '" + path + "' must be a list of integers");
    out.push_back(x.get<int64_t>());
  }
  return out;
}

}  // namespace

void check_manifest(const json& m, const std::string& where) {
  check_manifest_paths(m, where);          // before the schema: a name leaving the bundle says so
  check_manifest_schema(m, where);
  check_manifest_consistency(m, where);
}

TensorMap patch_grid_feeds(int64_t h, int64_t w, int64_t merge, int64_t window) {
  // each patch's (row, column), merge x merge blocks row-major, patches row-major inside a block
  std::vector<int64_t> pos;
  for (int64_t br = 0; br < h / merge; ++br)
    for (int64_t bc = 0; bc < w / merge; ++bc)
      for (int64_t r = 0; r < merge; ++r)
        for (int64_t c = 0; c < merge; ++c) {
          pos.push_back(br * merge + r);
          pos.push_back(bc * merge + c);
        }
  // merged patches in window order (windows row-major, cut at the grid's edge), window ends in patches
  const int64_t mh = h / merge, mw = w / merge;
  std::vector<int64_t> index, bounds{0};
  for (int64_t r0 = 0; r0 < mh; r0 += window)
    for (int64_t c0 = 0; c0 < mw; c0 += window) {
      int64_t count = 0;
      for (int64_t r = r0; r < std::min(r0 + window, mh); ++r)
        for (int64_t c = c0; c < std::min(c0 + window, mw); ++c, ++count) index.push_back(r * mw + c);
      bounds.push_back(bounds.back() + count * merge * merge);
    }
  TensorMap feeds;
  feeds[kVisionPositionIds] = Tensor::from_i64({h * w, 2}, pos);
  feeds[kWindowIndex] = Tensor::from_i64({mh * mw}, index);
  feeds[kCuWindowSeqlens] = Tensor::from_i64({static_cast<int64_t>(bounds.size())}, bounds);
  return feeds;
}

namespace {
// merged patches per side of a window attention block (image_tokens.vision_layout), checked against a grid
int64_t window_of(const json& m, int64_t h, int64_t w, const std::string& where) {
  const int64_t merge = int_field(m, "image_tokens.vision_layout.spatial_merge_size", where);
  const int64_t patch = int_field(m, "image_tokens.vision_layout.patch_size", where);
  const int64_t size = int_field(m, "image_tokens.vision_layout.window_size", where);
  if (merge < 1 || patch < 1 || size / merge / patch < 1 || h % merge || w % merge)
    throw Error(where + ": field 'image_tokens.vision_layout' (spatial_merge_size " + std::to_string(merge) +
                ", patch_size " + std::to_string(patch) + ", window_size " + std::to_string(size) +
                ") does not fit a " + std::to_string(h) + " x " + std::to_string(w) + " patch grid");
  return size / merge / patch;
}
}  // namespace

TensorMap patch_grid_feeds(const json& m, int64_t h, int64_t w, const std::string& where) {
  const int64_t window = window_of(m, h, w, where);
  return patch_grid_feeds(h, w, int_field(m, "image_tokens.vision_layout.spatial_merge_size", where), window);
}

void read_position_rules(const json& m, Bundle& b, const std::string& where) {
  b.image_token_ids = int_list(m, "image_tokens.token_ids", where);
  b.tokens_per_image = int_field(m, "image_tokens.per_image", where);
  b.position_rank = static_cast<int>(int_field(m, "positions.rank", where));
  if (b.position_rank == 3) {
    b.spatial_merge_size = int_field(m, "positions.spatial_merge_size", where);
    b.grid_thw = int_list(m, "image_tokens.grid_thw", where);
    if (m["positions"].contains("video_token_id")) b.video_token_id = int_field(m, "positions.video_token_id", where);
    if (m["positions"].contains("video_tokens_per_second")) {
      const json& tps = field(m, "positions.video_tokens_per_second", where);
      if (!tps.is_number()) throw Error(where + ": field 'positions.video_tokens_per_second' must be a number");
      b.video_tokens_per_second = tps.get<float>();
    }
    if (b.grid_thw.size() != 3 || b.spatial_merge_size < 1 ||
        b.grid_thw[0] * (b.grid_thw[1] / b.spatial_merge_size) * (b.grid_thw[2] / b.spatial_merge_size) !=
            b.tokens_per_image)
      throw Error(where + ": field 'image_tokens.grid_thw' " + field(m, "image_tokens.grid_thw", where).dump() +
                  " does not give 'image_tokens.per_image' tokens with spatial_merge_size " +
                  std::to_string(b.spatial_merge_size));
  } else if (b.position_rank != 2) {
    throw Error(where + ": field 'positions.rank' is " + std::to_string(b.position_rank) + ", expected 2 or 3");
  }
}

std::string sha256_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path.string() + " cannot be read");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) throw Error("OpenSSL: SHA-256 is unavailable");
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (f.gcount() > 0) EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(f.gcount()));
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  EVP_DigestFinal_ex(ctx, md, &n);
  EVP_MD_CTX_free(ctx);
  return hex(md, n);
}

fs::path Bundle::graph_file(const std::string& graph) const {
  return dir / manifest["graphs"][graph]["file"].get<std::string>();
}

Bundle load_bundle(const fs::path& dir) {
  const fs::path mpath = dir / kManifest;
  const std::string where = mpath.string();
  if (!fs::is_directory(dir))
    throw Error(dir.string() + " is not a bundle directory (run `fastv-export export --out " + dir.string() +
                "` first)");
  if (!fs::is_regular_file(mpath)) throw Error(where + " is missing: not a fastv-export bundle");
  const json m = read_manifest(mpath);
  if (!m.contains("schema_version") || m["schema_version"] != kSchemaVersion)
    throw Error(where + ": field 'schema_version' is " + (m.contains("schema_version") ? m["schema_version"].dump()
                                                                                       : std::string("missing")) +
                ", this runtime reads " + std::to_string(kSchemaVersion) + "; re-export the bundle");
  check_manifest(m, where);
  const json& files = m["files"];
  for (auto it = files.begin(); it != files.end(); ++it) {
    const fs::path f = bundle_file(dir, it.key(), "files");
    const json& meta = it.value();
    if (!fs::is_regular_file(f))
      throw Error(f.string() + " is missing (listed in " + kManifest + " field 'files'); " +
                  (it.key() == kPluginLibrary || f.extension() == ".engine" ? "rebuild the engines with fastv-export build"
                                                                            : "re-export the bundle"));
    const auto size = static_cast<int64_t>(fs::file_size(f));
    if (!meta.contains("bytes") || !meta["bytes"].is_number_integer() || meta["bytes"].get<int64_t>() != size)
      throw Error(f.string() + " has " + std::to_string(size) + " bytes, " + kManifest + " field 'files." + it.key() +
                  ".bytes' says " + (meta.contains("bytes") ? meta["bytes"].dump() : "nothing") +
                  ": the file is truncated or was replaced");
    if (!meta.contains("sha256") || !meta["sha256"].is_string() || sha256_file(f) != meta["sha256"].get<std::string>())
      throw Error(f.string() + ": sha256 does not match " + kManifest + " field 'files." + it.key() +
                  ".sha256': the file was modified after export");
  }
  check_graph_files(dir, m);
  // the engines section (when engines were built) must name files whose checksums are those of 'files'
  const json& section = m["engines"];
  if (!section.is_null()) {
    if (!section.is_object() || !section.contains("engines") || !section["engines"].is_object())
      throw Error(where + ": field 'engines' must be null or an object with 'engines'; re-run fastv-export build");
    for (auto it = section["engines"].begin(); it != section["engines"].end(); ++it) {
      const json& e = it.value();
      const std::string file = e.value("file", "");
      if (!files.contains(file) || files[file].value("sha256", "") != e.value("sha256", "?"))
        throw Error(where + ": field 'engines.engines." + it.key() + ".sha256' does not match the file '" + file +
                    "': the engine is not the one built; rebuild with fastv-export build");
    }
    const json& plugin = section.contains("plugin") ? section["plugin"] : json();
    if (!plugin.is_null() && files.contains(kPluginLibrary) &&
        files[kPluginLibrary].value("sha256", "") != plugin.value("sha256", "?"))
      throw Error(where + ": field 'engines.plugin.sha256' does not match " + kPluginLibrary +
                  ": the plugin library is not the one the engines were built with; rebuild with fastv-export build");
  }

  Bundle b;
  b.dir = dir;
  b.manifest = m;
  b.k = static_cast<int>(int_field(m, "fastv.k", where));
  b.num_layers = static_cast<int>(int_field(m, "source_model.num_layers", where));
  b.hidden_size = static_cast<int>(int_field(m, "source_model.hidden_size", where));
  if (m["source_model"].contains("deepstack_layers"))
    b.deepstack_layers = static_cast<int>(int_field(m, "source_model.deepstack_layers", where));
  b.num_kv_heads = static_cast<int>(int_field(m, "kv_cache.num_kv_heads", where));
  b.head_dim = static_cast<int>(int_field(m, "kv_cache.head_dim", where));
  const json& precision = field(m, "precision", where);
  if (precision == "fp32") b.float_dtype = DType::F32;
  else if (precision == "fp16") b.float_dtype = DType::F16;
  else throw Error(where + ": field 'precision' is " + precision.dump() + ", expected \"fp32\" or \"fp16\"");
  read_position_rules(m, b, where);
  const json& layout = m["image_tokens"].contains("vision_layout") ? m["image_tokens"]["vision_layout"] : json();
  if (layout.is_object()) b.vision_layout = field(m, "image_tokens.vision_layout.kind", where).get<std::string>();
  if (b.vision_layout == "fixed") {
    b.vision_input_shape = int_list(m, "image_tokens.vision_input.shape", where);
  } else if (b.vision_layout != "patch_grid") {
    throw Error(where + ": field 'image_tokens.vision_layout.kind' is \"" + b.vision_layout + "\": fastv-run "
                "computes the feeds of the fixed and patch_grid layouts only; run this bundle with the Python "
                "runtime (fastv-export run)");
  }
  const json& eos = field(m, "source_model.eos_token_id", where);
  if (eos.is_number_integer()) b.eos_token_id = eos.get<int64_t>();
  else if (eos.is_array() && !eos.empty() && eos[0].is_number_integer()) b.eos_token_id = eos[0].get<int64_t>();
  const json& pad = m["source_model"].contains("pad_token_id") ? m["source_model"]["pad_token_id"] : json();
  b.pad_token_id = pad.is_number_integer() ? pad.get<int64_t>() : 0;
  if (b.vision_layout == "patch_grid") {
    if (b.position_rank != 3)
      throw Error(where + ": field 'image_tokens.vision_layout.kind' is \"patch_grid\" without rank-3 positions");
    const json& shape = field(m, "image_tokens.vision_input.shape", where);
    if (!shape.is_array() || shape.size() != 2 || !shape[1].is_number_integer())
      throw Error(where + ": field 'image_tokens.vision_input.shape' must be [patches, patch_dim] (patch_grid)");
    b.vision_grid_feeds = patch_grid_feeds(m, b.grid_thw[1], b.grid_thw[2], where);
    b.vision_window = window_of(m, b.grid_thw[1], b.grid_thw[2], where);
    b.vision_input_shape = {b.grid_thw[1] * b.grid_thw[2], shape[1].get<int64_t>()};
  }
  return b;
}

}  // namespace fastv
