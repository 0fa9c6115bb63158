// Tensors, the raw inputs format (--dump-inputs), position ids and candidate positions.
#include "fastv/runtime.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <numeric>
#include <set>

namespace fs = std::filesystem;
using nlohmann::json;

namespace fastv {

std::string dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::I64: return "int64";
  }
  return "?";
}

DType dtype_from_name(const std::string& name, const std::string& where) {
  if (name == "float32") return DType::F32;
  if (name == "float16") return DType::F16;
  if (name == "int64") return DType::I64;
  throw Error(where + ": dtype '" + name + "' is not one of float32, float16, int64");
}

size_t dtype_size(DType d) { return d == DType::F16 ? 2 : d == DType::F32 ? 4 : 8; }

size_t Tensor::numel() const {
  size_t n = 1;
  for (auto d : shape) n *= static_cast<size_t>(d);
  return n;
}

Tensor Tensor::zeros(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data.assign(t.nbytes(), 0);
  return t;
}

Tensor Tensor::from_i64(std::vector<int64_t> shape, const std::vector<int64_t>& values) {
  Tensor t = zeros(DType::I64, std::move(shape));
  if (values.size() != t.numel()) throw std::logic_error("from_i64: size mismatch");
  std::memcpy(t.data.data(), values.data(), t.nbytes());
  return t;
}

static float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {   // subnormal
      int e = -1;
      uint32_t m = mant;
      do { ++e; m <<= 1; } while ((m & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static uint16_t float_to_half(float f) {   // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float Tensor::float_at(size_t i) const {
  if (dtype == DType::F32) return as<float>()[i];
  if (dtype == DType::F16) return half_to_float(as<uint16_t>()[i]);
  return static_cast<float>(as<int64_t>()[i]);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ------------------------------------------------------------------------------------------- inputs
namespace {

Tensor read_tensor(const fs::path& dir, const json& spec, const std::string& name, const std::string& where) {
  if (!spec.is_object() || !spec.contains("file") || !spec.contains("dtype") || !spec.contains("shape"))
    throw Error(where + ": tensor '" + name + "' needs 'file', 'dtype' and 'shape'");
  Tensor t;
  t.dtype = dtype_from_name(spec["dtype"].get<std::string>(), where + ": tensor '" + name + "'");
  for (const auto& d : spec["shape"]) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0)
      throw Error(where + ": tensor '" + name + "' field 'shape' must hold non-negative integers");
    t.shape.push_back(d.get<int64_t>());
  }
  const fs::path f = dir / spec["file"].get<std::string>();
  if (!fs::is_regular_file(f)) throw Error(f.string() + " is missing (tensor '" + name + "' of " + where + ")");
  const auto size = fs::file_size(f);
  if (size != t.nbytes())
    throw Error(f.string() + " has " + std::to_string(size) + " bytes, but tensor '" + name + "' of " + where +
                " is " + dtype_name(t.dtype) + " " + shape_str(t.shape) + " (" + std::to_string(t.nbytes()) +
                " bytes)");
  t.data.resize(t.nbytes());
  std::ifstream in(f, std::ios::binary);
  in.read(reinterpret_cast<char*>(t.data.data()), static_cast<std::streamsize>(t.data.size()));
  return t;
}

}  // namespace

Inputs read_inputs(const fs::path& dir, const Bundle& b) {
  const fs::path ipath = dir / "inputs.json";
  const std::string where = ipath.string();
  if (!fs::is_regular_file(ipath))
    throw Error(where + " is missing: write the inputs with `fastv-export run BUNDLE ... --dump-inputs " +
                dir.string() + "`");
  json j;
  try {
    std::ifstream f(ipath);
    j = json::parse(f);
  } catch (const json::parse_error& e) {
    throw Error(where + " is not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!j.is_object() || j.value("format", "") != "fastv-inputs" || j.value("version", 0) != 1)
    throw Error(where + ": field 'format' must be \"fastv-inputs\" and 'version' 1");
  if (!j.contains("tensors") || !j["tensors"].is_object()) throw Error(where + ": field 'tensors' is missing");
  const json& ts = j["tensors"];
  auto get = [&](const std::string& name) {
    if (!ts.contains(name)) throw Error(where + ": tensor '" + name + "' is missing from field 'tensors'");
    return read_tensor(dir, ts[name], name, where);
  };
  Inputs in;
  in.input_ids = get(kInputIds);
  in.attention_mask = get(kAttentionMask);
  if (in.input_ids.dtype != DType::I64 || in.input_ids.shape.size() != 2 || in.input_ids.shape[0] < 1 ||
      in.input_ids.shape[1] < 1)
    throw Error(where + ": tensor '" + kInputIds + "' must be int64 [batch, seq], got " +
                dtype_name(in.input_ids.dtype) + " " + shape_str(in.input_ids.shape));
  if (in.attention_mask.dtype != DType::I64 || in.attention_mask.shape != in.input_ids.shape)
    throw Error(where + ": tensor '" + kAttentionMask + "' must be int64 " + shape_str(in.input_ids.shape) +
                " like '" + kInputIds + "', got " + dtype_name(in.attention_mask.dtype) + " " +
                shape_str(in.attention_mask.shape));
  const int64_t rows = in.input_ids.shape[0], n = in.input_ids.shape[1];
  const int64_t num_images = j.value("num_images", 0);
  // patch_grid bundles: each medium's (t, h, w) patch grid, rows in order; a medium makes t vision calls
  std::vector<std::vector<int64_t>> call_shapes;   // the pixel values shape of each vision call
  int64_t grid_tokens = 0;
  if (ts.contains(kMediaGridThw)) {
    const Tensor g = get(kMediaGridThw);
    if (b.vision_layout != "patch_grid")
      throw Error(where + ": tensor '" + std::string(kMediaGridThw) + "' is given, but this bundle's vision layout is \"" +
                  b.vision_layout + "\" (media grids belong to patch_grid bundles): dump the inputs again");
    if (g.dtype != DType::I64 || g.shape.size() != 2 || g.shape[1] != 3 || g.shape[0] % rows)
      throw Error(where + ": tensor '" + std::string(kMediaGridThw) + "' must be int64 [media, 3] with the same media " +
                  "count in every row, got " + dtype_name(g.dtype) + " " + shape_str(g.shape));
    const int64_t per = g.shape[0] / rows, merge = b.spatial_merge_size;
    in.row_grids.resize(static_cast<size_t>(rows));
    for (int64_t m = 0; m < g.shape[0]; ++m) {
      const int64_t* v = g.as<int64_t>() + 3 * m;
      if (v[0] < 1 || v[1] < merge || v[2] < merge || v[1] % merge || v[2] % merge || v[0] * v[1] * v[2] > (1 << 24))
        throw Error(where + ": tensor '" + std::string(kMediaGridThw) + "' row " + std::to_string(m) + " is [" +
                    std::to_string(v[0]) + ", " + std::to_string(v[1]) + ", " + std::to_string(v[2]) +
                    "], not a patch grid of whole " + std::to_string(merge) + " x " + std::to_string(merge) + " blocks");
      in.row_grids[static_cast<size_t>(m / per)].push_back({v[0], v[1], v[2]});
      for (int64_t t = 0; t < v[0]; ++t) call_shapes.push_back({v[1] * v[2], b.vision_input_shape[1]});
      grid_tokens += v[0] * (v[1] / merge) * (v[2] / merge);
    }
    if (static_cast<int64_t>(call_shapes.size()) != num_images)
      throw Error(where + ": tensor '" + std::string(kMediaGridThw) + "' makes " + std::to_string(call_shapes.size()) +
                  " vision calls (one per image and per temporal patch of a video), field 'num_images' says " +
                  std::to_string(num_images));
  }
  for (int64_t i = 0; i < num_images; ++i) {
    const std::string name = std::string(kPixelValues) + "." + std::to_string(i);   // dump.py: <pixel values>.<i>
    Tensor px = get(name);
    const std::vector<int64_t>& want = call_shapes.empty() ? b.vision_input_shape : call_shapes[i];
    if (px.shape != want)
      throw Error(where + ": tensor '" + name + "' has shape " + shape_str(px.shape) + ", the bundle's vision graph " +
                  "takes " + shape_str(want) + (call_shapes.empty() ? " (manifest field 'image_tokens.vision_input.shape')"
                                                                    : " for its patch grid (tensor '" +
                                                                      std::string(kMediaGridThw) + "')"));
    if (px.dtype == DType::I64) throw Error(where + ": tensor '" + name + "' must be float32 or float16");
    if (px.dtype != b.float_dtype) {   // convert to the bundle's precision
      Tensor c = Tensor::zeros(b.float_dtype, px.shape);
      for (size_t e = 0; e < px.numel(); ++e) {
        const float v = px.float_at(e);
        if (c.dtype == DType::F32) c.as<float>()[e] = v;
        else c.as<uint16_t>()[e] = float_to_half(v);
      }
      px = std::move(c);
    }
    in.images.push_back(std::move(px));
  }
  if (ts.contains(kCandidatePositions)) in.candidate_positions = get(kCandidatePositions);
  if (ts.contains(kVideoSeconds)) {
    const Tensor secs = get(kVideoSeconds);
    if (secs.dtype != DType::F32 || secs.shape.size() != 1)
      throw Error(where + ": tensor 'video_seconds' must be float32 [videos], got " + dtype_name(secs.dtype) + " " +
                  shape_str(secs.shape));
    in.video_seconds.assign(secs.as<float>(), secs.as<float>() + secs.numel());
  }
  // the images of the whole batch, in prompt order, give the image tokens of all rows
  const std::set<int64_t> image_ids(b.image_token_ids.begin(), b.image_token_ids.end());
  int64_t count = 0;
  for (int64_t i = 0; i < rows * n; ++i) count += image_ids.count(in.input_ids.as<int64_t>()[i]);
  if (!in.row_grids.empty() && count != grid_tokens)
    throw Error(where + ": tensor '" + kInputIds + "' holds " + std::to_string(count) + " image tokens, but the media " +
                "grids of tensor '" + kMediaGridThw + "' make " + std::to_string(grid_tokens));
  if (in.row_grids.empty() && count != num_images * b.tokens_per_image)
    throw Error(where + ": tensor '" + kInputIds + "' holds " + std::to_string(count) + " image tokens, but " +
                std::to_string(num_images) + " image(s) of " + std::to_string(b.tokens_per_image) +
                " tokens (manifest field 'image_tokens.per_image') were given");
  return in;
}

// ---------------------------------------------------------------------------------------- positions
Tensor find_candidates(const Bundle& b, const Tensor& input_ids) {
  const int64_t rows = input_ids.shape[0], n = input_ids.shape[1];
  const std::set<int64_t> image_ids(b.image_token_ids.begin(), b.image_token_ids.end());
  std::vector<int64_t> out;
  int64_t m = -1;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i)
      if (image_ids.count(input_ids.as<int64_t>()[r * n + i])) {
        out.push_back(i);
        ++count;
      }
    if (m >= 0 && count != m)
      throw Error("the prompts of this batch hold different numbers of image tokens (" + std::to_string(m) + " and " +
                  std::to_string(count) + ")");
    m = count;
  }
  return Tensor::from_i64({rows, m}, out);
}

Tensor prefill_positions(const Bundle& b, const Tensor& ids, const Tensor& mask,
                         const std::vector<float>& video_seconds, const RowGrids& row_grids) {
  const int64_t rows = ids.shape[0], n = ids.shape[1];
  const int64_t* mk = mask.as<int64_t>();
  if (b.position_rank == 2) {   // cumsum(mask) - 1, padding 1
    Tensor out = Tensor::zeros(DType::I64, {rows, n});
    for (int64_t r = 0; r < rows; ++r) {
      int64_t c = 0;
      for (int64_t i = 0; i < n; ++i) {
        c += mk[r * n + i];
        out.as<int64_t>()[r * n + i] = mk[r * n + i] == 0 ? 1 : c - 1;
      }
    }
    return out;
  }
  // M-RoPE: text tokens count up; an image block of grid (t, h/merge, w/merge) gets offset + (t_i, h_i, w_i),
  // offset = the position after the previous token, and the token after the block offset + max(h/merge, w/merge);
  // a run of video tokens is t = run / (h/merge * w/merge) temporal patches whose t_i is
  // floor(i * video_tokens_per_second * seconds per temporal patch) in float32 (i without the scale); padding 0.
  // The grid of a medium: its own (row_grids; an image then has t = 1), else the exported one.
  const int64_t merge = b.spatial_merge_size;
  const int64_t tg = b.grid_thw[0], hg = b.grid_thw[1] / merge, wg = b.grid_thw[2] / merge;
  if (!row_grids.empty() && static_cast<int64_t>(row_grids.size()) != rows)
    throw Error("media grids are given for " + std::to_string(row_grids.size()) + " rows, the batch has " +
                std::to_string(rows));
  const std::set<int64_t> image_ids(b.image_token_ids.begin(), b.image_token_ids.end());
  Tensor out = Tensor::zeros(DType::I64, {3, rows, n});
  int64_t* p = out.as<int64_t>();
  const int64_t plane = rows * n;
  size_t video = 0;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> real;
    for (int64_t i = 0; i < n; ++i)
      if (mk[r * n + i]) real.push_back(i);
    auto id_at = [&](size_t i) { return ids.as<int64_t>()[r * n + real[i]]; };
    size_t i = 0, medium = 0;
    int64_t nxt = 0;
    while (i < real.size()) {
      const int64_t tok = id_at(i);
      if (!image_ids.count(tok)) {
        const int64_t at = r * n + real[i];
        p[at] = p[plane + at] = p[2 * plane + at] = nxt++;
        ++i;
        continue;
      }
      int64_t hm = hg, wm = wg, per_medium = b.tokens_per_image, image_t = tg;
      if (!row_grids.empty()) {   // this medium's own grid
        if (medium >= row_grids[r].size())
          throw Error("row " + std::to_string(r) + " holds more images and videos than the media grids given for it (" +
                      std::to_string(row_grids[r].size()) + ")");
        const auto& g = row_grids[r][medium];
        hm = g[1] / merge;
        wm = g[2] / merge;
        image_t = 1;
        per_medium = hm * wm;
      }
      ++medium;
      std::vector<int64_t> temporal;
      if (b.video_token_id && tok == *b.video_token_id) {   // a video: its whole run of temporal patches
        size_t end = i;
        while (end < real.size() && id_at(end) == tok) ++end;
        const int64_t length = static_cast<int64_t>(end - i);
        if (hm * wm < 1 || length % (hm * wm))
          throw Error("a video block at position " + std::to_string(real[i]) + " of row " + std::to_string(r) +
                      " holds " + std::to_string(length) + " tokens, not a whole number of temporal patches of " +
                      std::to_string(hm * wm) + " tokens (its frames' patch grid)");
        float interval = 1.0f;
        if (b.video_tokens_per_second) {
          if (video >= video_seconds.size())
            throw Error("the prompt holds more videos than 'video_seconds' gives seconds per temporal patch for (" +
                        std::to_string(video_seconds.size()) + "): dump the inputs with video_seconds");
          interval = *b.video_tokens_per_second * video_seconds[video];
        }
        ++video;
        for (int64_t t = 0; t < length / (hm * wm); ++t)
          temporal.push_back(static_cast<int64_t>(static_cast<float>(t) * interval));
      } else {                                             // an image: of its own grid, or of the exported one
        if (i + static_cast<size_t>(per_medium) > real.size())
          throw Error("an image block at position " + std::to_string(real[i]) + " of row " + std::to_string(r) +
                      " is cut short: the prompt must hold all " + std::to_string(per_medium) +
                      " tokens of each image");
        for (int64_t t = 0; t < image_t; ++t) temporal.push_back(t);
      }
      size_t j = i;
      for (const int64_t t : temporal)
        for (int64_t h = 0; h < hm; ++h)
          for (int64_t w = 0; w < wm; ++w, ++j) {
            const int64_t at = r * n + real[j];
            p[at] = nxt + t;
            p[plane + at] = nxt + h;
            p[2 * plane + at] = nxt + w;
          }
      nxt += std::max(hm, wm);   // as the model: the next token follows the larger spatial side
      i = j;
    }
  }
  return out;
}

Tensor decode_positions(const Tensor& pos, int64_t step) {
  if (pos.shape.size() == 2) {
    const int64_t rows = pos.shape[0], n = pos.shape[1];
    Tensor out = Tensor::zeros(DType::I64, {rows, 1});
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* row = pos.as<int64_t>() + r * n;
      out.as<int64_t>()[r] = *std::max_element(row, row + n) + 1 + step;
    }
    return out;
  }
  const int64_t rows = pos.shape[1], n = pos.shape[2];
  Tensor out = Tensor::zeros(DType::I64, {3, rows, 1});
  for (int64_t r = 0; r < rows; ++r) {
    int64_t top = INT64_MIN;
    for (int64_t a = 0; a < 3; ++a) {
      const int64_t* row = pos.as<int64_t>() + (a * rows + r) * n;
      top = std::max(top, *std::max_element(row, row + n));
    }
    for (int64_t a = 0; a < 3; ++a) out.as<int64_t>()[a * rows + r] = top + 1 + step;
  }
  return out;
}

}  // namespace fastv
