// Pillow's resize on uint8 RGB (libImaging/Resample.c, Geometry.c) and the transformers PIL image processors
// of the served families (CLIPImageProcessor, Qwen2VLImageProcessor), in the arithmetic they use:
//   resize: separable, two passes (in the order Pillow 13 picks), each output = clip8((2^21 + sum in * k_fixed) >> 22)
//           with k_fixed = round-half-away(k * 2^22) of the normalized double filter weights;
//   rescale: float32(double(v) * rescale_factor)   (transformers' rescale: float64 product, cast to float32);
//   normalize: (x - float32(mean)) / float32(std) in float32.
#include "fastv/image.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <tuple>

namespace fastv {
namespace {

constexpr double kPi = 3.14159265358979323846;   // M_PI

// ---- Pillow's filters (support in input samples at scale 1) ------------------------------------------
double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }
double bilinear_filter(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}
double hamming_filter(double x) {
  x = std::fabs(x);
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * kPi;
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));   // Pillow's constants are float literals
}
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
double sinc_filter(double x) {
  if (x == 0.0) return 1.0;
  x = x * kPi;
  return std::sin(x) / x;
}
double lanczos_filter(double x) {
  if (-3.0 <= x && x < 3.0) return sinc_filter(x) * sinc_filter(x / 3);
  return 0.0;
}

struct Filter {
  double (*f)(double);
  double support;
};

Filter filter_of(Resample r) {
  switch (r) {
    case Resample::Box: return {box_filter, 0.5};
    case Resample::Bilinear: return {bilinear_filter, 1.0};
    case Resample::Hamming: return {hamming_filter, 1.0};
    case Resample::Bicubic: return {bicubic_filter, 2.0};
    case Resample::Lanczos: return {lanczos_filter, 3.0};
    case Resample::Nearest: break;
  }
  throw Error("resample_coeffs: nearest has no filter");
}

inline uint8_t clip8(int64_t v) {
  v >>= kResamplePrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

// one pass along x (horizontal) or y (vertical) of an RGB image
Image pass(const Image& in, const ResampleCoeffs& k, bool horizontal) {
  Image out;
  out.width = horizontal ? static_cast<int>(k.first.size()) : in.width;
  out.height = horizontal ? in.height : static_cast<int>(k.first.size());
  out.rgb.resize(static_cast<size_t>(out.width) * out.height * 3);
  const int64_t half = int64_t{1} << (kResamplePrecisionBits - 1);
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      const int i = horizontal ? x : y;
      const int32_t* w = &k.fixed[static_cast<size_t>(i) * k.ksize];
      int64_t s[3] = {half, half, half};
      for (int j = 0; j < k.count[i]; ++j) {
        const int sx = horizontal ? k.first[i] + j : x, sy = horizontal ? y : k.first[i] + j;
        const uint8_t* p = &in.rgb[(static_cast<size_t>(sy) * in.width + sx) * 3];
        s[0] += int64_t{p[0]} * w[j];
        s[1] += int64_t{p[1]} * w[j];
        s[2] += int64_t{p[2]} * w[j];
      }
      uint8_t* o = &out.rgb[(static_cast<size_t>(y) * out.width + x) * 3];
      o[0] = clip8(s[0]);
      o[1] = clip8(s[1]);
      o[2] = clip8(s[2]);
    }
  }
  return out;
}

// Pillow's nearest resize: an affine scale whose source coordinate accumulates in double from the first
// pixel centre (Geometry.c ImagingScaleAffine); COORD(v) = v < 0 ? -1 : int(v)
Image nearest(const Image& in, int width, int height) {
  Image out;
  out.width = width;
  out.height = height;
  out.rgb.assign(static_cast<size_t>(width) * height * 3, 0);
  const double ax = static_cast<double>(static_cast<float>(in.width)) / width;
  const double ay = static_cast<double>(static_cast<float>(in.height)) / height;
  std::vector<int> xin(width, -1);
  double xo = ax * 0.5;
  for (int x = 0; x < width; ++x, xo += ax) {
    const int v = xo < 0.0 ? -1 : static_cast<int>(xo);
    xin[x] = v < in.width ? v : -1;
  }
  double yo = ay * 0.5;
  for (int y = 0; y < height; ++y, yo += ay) {
    const int yi = yo < 0.0 ? -1 : static_cast<int>(yo);
    if (yi < 0 || yi >= in.height) continue;
    for (int x = 0; x < width; ++x) {
      if (xin[x] < 0) continue;
      std::memcpy(&out.rgb[(static_cast<size_t>(y) * width + x) * 3],
                  &in.rgb[(static_cast<size_t>(yi) * in.width + xin[x]) * 3], 3);
    }
  }
  return out;
}

// ---- config reading ---------------------------------------------------------------------------------
bool is_any(const std::string& type, std::initializer_list<const char*> bases) {
  for (const char* b : bases) {
    const std::string s = b;
    if (type == s || type == s + "Fast" || type == s + "Pil") return true;
  }
  return false;
}

int64_t get_int(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto& v = j.at(key);
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float() && v.get<double>() == std::floor(v.get<double>()))
    return static_cast<int64_t>(v.get<double>());
  throw Error(where + ": '" + key + "' must be an integer, got " + v.dump());
}

bool get_bool(const nlohmann::json& c, const char* key, bool dflt, const std::string& where) {
  if (!c.contains(key) || c[key].is_null()) return dflt;
  if (!c[key].is_boolean()) throw Error(where + ": '" + key + "' must be true or false, got " + c[key].dump());
  return c[key].get<bool>();
}

std::array<float, 3> get_triple(const nlohmann::json& c, const char* key, std::array<double, 3> dflt,
                                const std::string& where) {
  std::array<double, 3> v = dflt;
  if (c.contains(key) && !c[key].is_null()) {
    const auto& j = c[key];
    if (j.is_number()) {
      v = {j.get<double>(), j.get<double>(), j.get<double>()};
    } else if (j.is_array() && j.size() == 3 && j[0].is_number() && j[1].is_number() && j[2].is_number()) {
      v = {j[0].get<double>(), j[1].get<double>(), j[2].get<double>()};
    } else {
      throw Error(where + ": '" + key + "' must be a number or 3 numbers (RGB), got " + j.dump());
    }
  }
  return {static_cast<float>(v[0]), static_cast<float>(v[1]), static_cast<float>(v[2])};
}

constexpr std::array<double, 3> kClipMean = {0.48145466, 0.4578275, 0.40821073};
constexpr std::array<double, 3> kClipStd = {0.26862954, 0.26130258, 0.27577711};

int64_t floordiv(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

void composite_key(Image& im) {
  if (!im.transparent) return;
  const auto key = *im.transparent;
  for (size_t i = 0; i < im.rgb.size(); i += 3)
    if (im.rgb[i] == key[0] && im.rgb[i + 1] == key[1] && im.rgb[i + 2] == key[2])
      im.rgb[i] = im.rgb[i + 1] = im.rgb[i + 2] = 255;
  im.transparent.reset();
}

}  // namespace

// ---- resampling ----------------------------------------------------------------------------------------
Resample resample_from_int(int value, const std::string& where) {
  if (value < 0 || value > 5)
    throw Error(where + ": 'resample' " + std::to_string(value) + " is not a PIL resampling filter (0-5)");
  return static_cast<Resample>(value);
}

const char* resample_name(Resample r) {
  switch (r) {
    case Resample::Nearest: return "nearest";
    case Resample::Lanczos: return "lanczos";
    case Resample::Bilinear: return "bilinear";
    case Resample::Bicubic: return "bicubic";
    case Resample::Box: return "box";
    case Resample::Hamming: return "hamming";
  }
  return "?";
}

ResampleCoeffs resample_coeffs(int in_size, int out_size, Resample filter) {
  if (in_size < 1 || out_size < 1) throw Error("resample_coeffs: sizes must be positive");
  const Filter f = filter_of(filter);
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);   // Pillow's box is float
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = f.support * filterscale;
  ResampleCoeffs k;
  k.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  k.first.resize(out_size);
  k.count.resize(out_size);
  k.weights.assign(static_cast<size_t>(out_size) * k.ksize, 0.0);
  k.fixed.assign(k.weights.size(), 0);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double* w = &k.weights[static_cast<size_t>(xx) * k.ksize];
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = f.f((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x)
      if (ww != 0.0) w[x] /= ww;
    k.first[xx] = xmin;
    k.count[xx] = xmax < 0 ? 0 : xmax;
  }
  for (size_t i = 0; i < k.weights.size(); ++i) {
    const double v = k.weights[i] * (1 << kResamplePrecisionBits);
    k.fixed[i] = static_cast<int32_t>(k.weights[i] < 0 ? -0.5 + v : 0.5 + v);
  }
  return k;
}

Image resize(const Image& image, int width, int height, Resample filter) {
  if (width < 1 || height < 1) throw Error("resize: the target size must be positive");
  if (width == image.width && height == image.height) return image;   // PIL: a copy
  if (filter == Resample::Nearest) return nearest(image, width, height);
  const bool horizontal = width != image.width, vertical = height != image.height;
  // the order of the two passes (each rounds to uint8, so it shows in the result) is Pillow 13's: the vertical
  // pass first when the height shrinks by more than twice what the width shrinks, else the horizontal pass first
  // (found equal to Pillow 13.0 on every size pair tried, both orders being told apart on each)
  const bool vertical_first =
      horizontal && vertical && height < image.height &&
      2 * (int64_t{image.width} - width) < int64_t{image.height} - height;
  Image out;
  if (!horizontal) {
    out = pass(image, resample_coeffs(image.height, height, filter), false);
  } else if (!vertical) {
    out = pass(image, resample_coeffs(image.width, width, filter), true);
  } else if (vertical_first) {
    out = pass(pass(image, resample_coeffs(image.height, height, filter), false),
               resample_coeffs(image.width, width, filter), true);
  } else {
    out = pass(pass(image, resample_coeffs(image.width, width, filter), true),
               resample_coeffs(image.height, height, filter), false);
  }
  out.transparent = image.transparent;
  return out;
}

// ---- processors ------------------------------------------------------------------------------------------
ImageProcessor ImageProcessor::from_config(const nlohmann::json& c, const std::string& where) {
  if (!c.is_object()) throw Error(where + ": the image processor config must be a JSON object");
  ImageProcessor p;
  if (!c.contains("image_processor_type") || !c["image_processor_type"].is_string())
    throw Error(where + " names no image_processor_type; restore the checkpoint's image processor config");
  p.type_ = c["image_processor_type"].get<std::string>();
  if (is_any(p.type_, {"CLIPImageProcessor"})) {
    p.kind_ = Kind::Clip;
  } else if (is_any(p.type_, {"Qwen2VLImageProcessor"})) {
    p.kind_ = Kind::Qwen2VL;
  } else if (is_any(p.type_, {"LlavaOnevisionImageProcessor", "GotOcr2ImageProcessor", "InternVLImageProcessor"})) {
    throw Error(where + ": " + p.type_ + " (tiled images: LLaVA-OneVision anyres / InternVL tiles) is not served by "
                "fastv-run's C++ preprocessing yet; run this bundle with `fastv-export run`, or feed pixels with "
                "fastv-run --inputs");
  } else {
    throw Error(where + ": image processor " + p.type_ + " is not served by fastv-run's C++ preprocessing (served: "
                "CLIPImageProcessor, Qwen2VLImageProcessor); use `fastv-export run` or fastv-run --inputs");
  }
  const bool qwen = p.kind_ == Kind::Qwen2VL;
  p.do_convert_rgb_ = get_bool(c, "do_convert_rgb", true, where);
  p.do_resize_ = get_bool(c, "do_resize", true, where);
  p.do_center_crop_ = qwen ? false : get_bool(c, "do_center_crop", true, where);
  p.do_rescale_ = get_bool(c, "do_rescale", true, where);
  p.do_normalize_ = get_bool(c, "do_normalize", true, where);
  if (c.contains("do_pad") && c["do_pad"].is_boolean() && c["do_pad"].get<bool>())
    throw Error(where + ": do_pad is not served by fastv-run's C++ preprocessing");
  p.resample_ = Resample::Bicubic;
  if (c.contains("resample") && !c["resample"].is_null())
    p.resample_ = resample_from_int(static_cast<int>(get_int(c, "resample", where)), where);
  if (c.contains("rescale_factor") && !c["rescale_factor"].is_null()) {
    if (!c["rescale_factor"].is_number()) throw Error(where + ": 'rescale_factor' must be a number");
    p.rescale_factor_ = c["rescale_factor"].get<double>();
  }
  p.mean_ = get_triple(c, "image_mean", kClipMean, where);
  p.std_ = get_triple(c, "image_std", kClipStd, where);
  const nlohmann::json size = c.contains("size") ? c["size"] : nlohmann::json();
  if (qwen) {
    p.min_pixels_ = 56 * 56;
    p.max_pixels_ = 28 * 28 * 1280;
    if (!size.is_null()) {
      if (!size.is_object()) throw Error(where + ": 'size' must be an object {shortest_edge, longest_edge}");
      for (const char* k : {"shortest_edge", "min_pixels"})
        if (size.contains(k)) p.min_pixels_ = get_int(size, k, where + " size");
      for (const char* k : {"longest_edge", "max_pixels"})
        if (size.contains(k)) p.max_pixels_ = get_int(size, k, where + " size");
      if (!size.contains("shortest_edge") && !size.contains("min_pixels") && !c.contains("min_pixels"))
        throw Error(where + ": 'size' has no shortest_edge (min pixels)");
      if (!size.contains("longest_edge") && !size.contains("max_pixels") && !c.contains("max_pixels"))
        throw Error(where + ": 'size' has no longest_edge (max pixels)");
    }
    if (c.contains("min_pixels") && !c["min_pixels"].is_null()) p.min_pixels_ = get_int(c, "min_pixels", where);
    if (c.contains("max_pixels") && !c["max_pixels"].is_null()) p.max_pixels_ = get_int(c, "max_pixels", where);
    if (c.contains("patch_size") && !c["patch_size"].is_null())
      p.patch_ = static_cast<int>(get_int(c, "patch_size", where));
    if (c.contains("merge_size") && !c["merge_size"].is_null())
      p.merge_ = static_cast<int>(get_int(c, "merge_size", where));
    if (c.contains("temporal_patch_size") && !c["temporal_patch_size"].is_null())
      p.temporal_ = static_cast<int>(get_int(c, "temporal_patch_size", where));
    if (p.patch_ < 1 || p.patch_ > 1024 || p.merge_ < 1 || p.merge_ > 64 || p.temporal_ < 1 || p.temporal_ > 64)
      throw Error(where + ": patch_size, merge_size and temporal_patch_size must be small positive integers");
    if (p.min_pixels_ < 1 || p.max_pixels_ < p.min_pixels_)
      throw Error(where + ": the min / max pixels must be positive with min <= max");
  } else {
    p.shortest_ = 224;
    if (size.is_number_integer()) {
      p.shortest_ = size.get<int64_t>();   // an old config's int: the shortest edge (default_to_square False)
    } else if (size.is_object()) {
      p.shortest_ = size.contains("shortest_edge") ? get_int(size, "shortest_edge", where + " size") : 0;
      p.longest_ = size.contains("longest_edge") ? get_int(size, "longest_edge", where + " size") : 0;
      p.height_ = size.contains("height") ? get_int(size, "height", where + " size") : 0;
      p.width_ = size.contains("width") ? get_int(size, "width", where + " size") : 0;
      if (!p.shortest_ && !(p.height_ && p.width_))
        throw Error(where + ": 'size' needs shortest_edge or height and width (" + size.dump() + " is not served)");
    } else if (!size.is_null()) {
      throw Error(where + ": 'size' must be an integer or an object, got " + size.dump());
    }
    p.crop_h_ = p.crop_w_ = 224;
    if (c.contains("crop_size") && !c["crop_size"].is_null()) {
      const auto& cs = c["crop_size"];
      if (cs.is_number_integer()) {
        p.crop_h_ = p.crop_w_ = cs.get<int64_t>();
      } else if (cs.is_object() && cs.contains("height") && cs.contains("width")) {
        p.crop_h_ = get_int(cs, "height", where + " crop_size");
        p.crop_w_ = get_int(cs, "width", where + " crop_size");
      } else {
        throw Error(where + ": 'crop_size' must be an integer or {height, width}, got " + cs.dump());
      }
    }
    for (int64_t v : {p.shortest_, p.longest_, p.height_, p.width_, p.crop_h_, p.crop_w_})
      if (v < 0 || v > 65536) throw Error(where + ": sizes must be between 0 and 65536");
    if (p.do_center_crop_ && (p.crop_h_ < 1 || p.crop_w_ < 1)) throw Error(where + ": crop_size must be positive");
  }
  return p;
}

ImageProcessor ImageProcessor::load(const std::filesystem::path& dir) {
  const auto own = dir / "preprocessor_config.json";
  const auto processor = dir / "processor_config.json";
  auto read = [](const std::filesystem::path& path) {
    std::ifstream f(path);
    if (!f) throw Error(path.string() + " cannot be opened");
    try {
      return nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception&) {
      throw Error(path.string() + " is not valid JSON; restore the file");
    }
  };
  if (std::filesystem::is_regular_file(own)) return from_config(read(own), own.string());
  if (std::filesystem::is_regular_file(processor)) {
    const auto j = read(processor);
    if (j.is_object() && j.contains("image_processor") && j["image_processor"].is_object())
      return from_config(j["image_processor"], processor.string() + " image_processor");
  }
  throw Error(dir.string() + " has no preprocessor_config.json (nor an image_processor in processor_config.json); "
              "add the checkpoint's image processor config");
}

std::pair<int, int> ImageProcessor::smart_resize(int height, int width) const {
  return smart_resize(height, width, min_pixels_, max_pixels_);
}

std::pair<int, int> ImageProcessor::smart_resize(int height, int width, int64_t min_pixels, int64_t max_pixels) const {
  const double factor = static_cast<double>(patch_) * merge_;
  const double h = height, w = width;
  if (std::max(h, w) / std::min(h, w) > 200)
    throw Error("a " + std::to_string(width) + "x" + std::to_string(height) +
                " px image is too elongated for " + type_ + " (aspect ratio over 200)");
  double h_bar = std::nearbyint(h / factor) * factor;   // Python round(): half to even
  double w_bar = std::nearbyint(w / factor) * factor;
  if (h_bar * w_bar > static_cast<double>(max_pixels)) {
    const double beta = std::sqrt((h * w) / static_cast<double>(max_pixels));
    h_bar = std::max(factor, std::floor(h / beta / factor) * factor);
    w_bar = std::max(factor, std::floor(w / beta / factor) * factor);
  } else if (h_bar * w_bar < static_cast<double>(min_pixels)) {
    const double beta = std::sqrt(static_cast<double>(min_pixels) / (h * w));
    h_bar = std::ceil(h * beta / factor) * factor;
    w_bar = std::ceil(w * beta / factor) * factor;
  }
  if (h_bar > 65536 || w_bar > 65536) throw Error(type_ + ": the smart resize target is too large");
  return {static_cast<int>(h_bar), static_cast<int>(w_bar)};
}

Pixels ImageProcessor::process(const Image& source) const {
  if (source.width < 1 || source.height < 1 || source.rgb.size() != size_t(source.width) * source.height * 3)
    throw Error("process: an empty or malformed image");
  Image im = source;
  if (do_convert_rgb_) composite_key(im);   // convert_to_rgb: the colour key onto white
  Pixels out;
  // ---- resize (on uint8, as Pillow)
  if (do_resize_) {
    int64_t nh = im.height, nw = im.width;
    if (kind_ == Kind::Qwen2VL) {
      std::tie(nh, nw) = smart_resize(im.height, im.width);
    } else if (shortest_ && longest_) {
      // get_size_with_aspect_ratio((h, w), shortest_edge, longest_edge)
      const double h = im.height, w = im.width;
      int64_t size = shortest_;
      double raw = 0;
      bool has_raw = false;
      const double lo = std::min(h, w), hi = std::max(h, w);
      if (hi / lo * size > static_cast<double>(longest_)) {
        raw = longest_ * lo / hi;
        size = static_cast<int64_t>(std::nearbyint(raw));
        has_raw = true;
      }
      if ((h <= w && h == size) || (w <= h && w == size)) {
        nh = im.height, nw = im.width;
      } else if (w < h) {
        nw = size;
        nh = static_cast<int64_t>(has_raw ? raw * h / w : size * h / w);
      } else {
        nh = size;
        nw = static_cast<int64_t>(has_raw ? raw * w / h : size * w / h);
      }
    } else if (shortest_) {
      // get_resize_output_image_size(default_to_square=False): the other side int(size * long / short)
      const bool portrait = im.width <= im.height;
      const int64_t s = portrait ? im.width : im.height, l = portrait ? im.height : im.width;
      const int64_t new_long = static_cast<int64_t>(static_cast<double>(shortest_) * l / s);
      nh = portrait ? new_long : shortest_;
      nw = portrait ? shortest_ : new_long;
    } else {
      nh = height_, nw = width_;
    }
    if (nh < 1 || nw < 1 || nh > 65536 || nw > 65536 || nh * nw > kMaxImagePixels)
      throw Error(type_ + ": a " + std::to_string(im.width) + "x" + std::to_string(im.height) +
                  " px image resizes to " +
                  std::to_string(nw) + "x" + std::to_string(nh) + " px, which fastv-run does not serve");
    im = resize(im, static_cast<int>(nw), static_cast<int>(nh), resample_);
  }
  out.resized = im;
  // ---- centre crop (CLIP; zero padding where the crop is larger), on uint8
  int H = im.height, W = im.width, oy = 0, ox = 0;
  if (do_center_crop_) {
    oy = static_cast<int>(floordiv(int64_t{im.height} - crop_h_, 2));
    ox = static_cast<int>(floordiv(int64_t{im.width} - crop_w_, 2));
    H = static_cast<int>(crop_h_);
    W = static_cast<int>(crop_w_);
  }
  // ---- rescale, normalize: planar float32 [3, H, W]
  std::vector<float> planar(static_cast<size_t>(3) * H * W);
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < H; ++y) {
      for (int x = 0; x < W; ++x) {
        const int sy = y + oy, sx = x + ox;
        const bool inside = sy >= 0 && sy < im.height && sx >= 0 && sx < im.width;
        const uint8_t v = inside ? im.at(sx, sy, c) : 0;
        float f = do_rescale_ ? static_cast<float>(static_cast<double>(v) * rescale_factor_) : static_cast<float>(v);
        if (do_normalize_) f = (f - mean_[c]) / std_[c];
        planar[(static_cast<size_t>(c) * H + y) * W + x] = f;
      }
    }
  }
  if (kind_ == Kind::Clip) {
    out.pixel_values = Tensor::zeros(DType::F32, {1, 3, H, W});
    std::memcpy(out.pixel_values.data.data(), planar.data(), planar.size() * sizeof(float));
    return out;
  }
  // ---- Qwen2-VL patches: rows (bh, bw, mh, mw), each (c, t, ph, pw) with the frame repeated over t
  const int p = patch_, m = merge_, tp = temporal_;
  if (H % (p * m) || W % (p * m))
    throw Error(type_ + ": a " + std::to_string(W) + "x" + std::to_string(H) + " px image is not a multiple of patch x "
                "merge (" + std::to_string(p * m) + " px); enable do_resize");
  const int gh = H / p, gw = W / p;
  const int64_t dim = int64_t{3} * tp * p * p;
  out.pixel_values = Tensor::zeros(DType::F32, {int64_t{gh} * gw, dim});
  float* dst = out.pixel_values.as<float>();
  for (int bh = 0; bh < gh / m; ++bh)
    for (int bw = 0; bw < gw / m; ++bw)
      for (int mh = 0; mh < m; ++mh)
        for (int mw = 0; mw < m; ++mw)
          for (int c = 0; c < 3; ++c)
            for (int t = 0; t < tp; ++t)
              for (int ph = 0; ph < p; ++ph) {
                const int y = (bh * m + mh) * p + ph, x0 = (bw * m + mw) * p;
                std::memcpy(dst, &planar[(static_cast<size_t>(c) * H + y) * W + x0], sizeof(float) * p);
                dst += p;
              }
  out.grid_thw = {1, gh, gw};
  out.tokens = int64_t{gh} * gw / (int64_t{m} * m);
  return out;
}

Pixels ImageProcessor::process_frames(const std::vector<Image>& frames, int width, int height, Resample filter,
                                      int temporal_patch) const {
  if (kind_ != Kind::Qwen2VL) throw Error(type_ + ": videos are served for Qwen2-VL image processors only");
  if (frames.empty()) throw Error("process_frames: no frames");
  const int p = patch_, m = merge_, tp = temporal_patch;
  if (tp < 1 || tp > 64) throw Error("the video's temporal_patch_size must be between 1 and 64");
  if (height < 1 || width < 1 || height % (p * m) || width % (p * m) || int64_t{height} * width > kMaxImagePixels)
    throw Error(type_ + ": video frames of " + std::to_string(width) + "x" + std::to_string(height) +
                " px are not served (sides must be positive multiples of patch x merge, " + std::to_string(p * m) +
                " px)");
  const int H = height, W = width, gh = H / p, gw = W / p;
  const size_t frame_floats = static_cast<size_t>(3) * H * W;
  const size_t count = frames.size() + (tp - frames.size() % tp) % tp;   // the last frame repeated
  // rescaled, normalized planar frames [3, H, W], one after another
  std::vector<float> planar(frame_floats * frames.size());
  for (size_t f = 0; f < frames.size(); ++f) {
    if (frames[f].width < 1 || frames[f].height < 1 ||
        frames[f].rgb.size() != size_t(frames[f].width) * frames[f].height * 3)
      throw Error("process_frames: an empty or malformed frame");
    Image im = resize(frames[f], W, H, filter);
    if (do_convert_rgb_) composite_key(im);   // convert_to_rgb of the resized frame: the colour key onto white
    float* dst = planar.data() + f * frame_floats;
    for (int c = 0; c < 3; ++c)
      for (int y = 0; y < H; ++y)
        for (int x = 0; x < W; ++x) {
          const uint8_t v = im.at(x, y, c);
          float val = do_rescale_ ? static_cast<float>(static_cast<double>(v) * rescale_factor_) : static_cast<float>(v);
          if (do_normalize_) val = (val - mean_[c]) / std_[c];
          dst[(static_cast<size_t>(c) * H + y) * W + x] = val;
        }
  }
  const int64_t t_count = static_cast<int64_t>(count) / tp, rows = int64_t{gh} * gw;
  const int64_t dim = int64_t{3} * tp * p * p;
  Pixels out;
  out.pixel_values = Tensor::zeros(DType::F32, {t_count * rows, dim});
  float* dst = out.pixel_values.as<float>();
  // rows (t, bh, bw, mh, mw), each (c, frame in the temporal patch, ph, pw)
  for (int64_t ti = 0; ti < t_count; ++ti)
    for (int bh = 0; bh < gh / m; ++bh)
      for (int bw = 0; bw < gw / m; ++bw)
        for (int mh = 0; mh < m; ++mh)
          for (int mw = 0; mw < m; ++mw)
            for (int c = 0; c < 3; ++c)
              for (int t = 0; t < tp; ++t) {
                const size_t f = std::min(static_cast<size_t>(ti * tp + t), frames.size() - 1);
                const float* src = planar.data() + f * frame_floats;
                for (int ph = 0; ph < p; ++ph) {
                  const int y = (bh * m + mh) * p + ph, x0 = (bw * m + mw) * p;
                  std::memcpy(dst, &src[(static_cast<size_t>(c) * H + y) * W + x0], sizeof(float) * p);
                  dst += p;
                }
              }
  out.grid_thw = {t_count, gh, gw};
  out.tokens = t_count * rows / (int64_t{m} * m);
  return out;
}

}  // namespace fastv
