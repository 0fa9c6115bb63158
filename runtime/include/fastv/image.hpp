// Images for fastv-run: PNG / JPEG decoding (libpng, libjpeg-turbo) and the checkpoint's image processor
// (runtime/README.md: "Images").
//
// read_image() gives what PIL's Image.open(path).convert("RGB") gives (the Python front end's first step).
// ImageProcessor reproduces the transformers PIL image processors the served families use: the resize as
// Pillow computes it on uint8 (its separable fixed-point convolution, resize() below), the centre crop,
// rescale and normalize in the float arithmetic of numpy, and the Qwen2-VL smart resize and patch layout.
#pragma once

#include "fastv/runtime.hpp"

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fastv {

/// 8-bit RGB, row-major, 3 bytes a pixel.
struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
  /// A PNG's tRNS colour key as PIL keeps it after convert("RGB") (grey, RGB and single-entry palette
  /// transparency): the processors' convert_to_rgb composites the pixels of this colour onto white.
  std::optional<std::array<uint8_t, 3>> transparent;

  uint8_t at(int x, int y, int c) const { return rgb[(static_cast<size_t>(y) * width + x) * 3 + c]; }
};

/// Largest image decoded (width x height), as a decompression-bomb guard.
inline constexpr int64_t kMaxImagePixels = int64_t{1} << 26;

/// PNG or JPEG (by content, not by name) -> RGB as PIL's convert("RGB"): palette through the palette,
/// grey replicated, alpha dropped, 16-bit RGB / grey+alpha by the high byte, 16-bit grey clipped at 255,
/// CMYK JPEG (Adobe inverted) as PIL converts it. Corrupt, truncated, unsupported or huge files throw Error
/// with one line naming the file.
Image read_image(const std::filesystem::path& path);
/// The same from bytes in memory; ``name`` names the image in errors.
Image decode_image(const uint8_t* data, size_t size, const std::string& name);

// ---- resampling: Pillow's Image.resize (libImaging/Resample.c) -------------------------------------------
/// PIL.Image.Resampling values (the processors' "resample").
enum class Resample { Nearest = 0, Lanczos = 1, Bilinear = 2, Bicubic = 3, Box = 4, Hamming = 5 };
Resample resample_from_int(int value, const std::string& where);
const char* resample_name(Resample r);

/// The coefficients of one separable pass from ``in_size`` to ``out_size`` samples (not Nearest): output i
/// reads inputs [first[i], first[i] + count[i]) with weights weights[i * ksize + j] (normalized, double) and
/// their fixed-point form fixed[i * ksize + j] (22 fractional bits, rounded half away from zero).
struct ResampleCoeffs {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<double> weights;
  std::vector<int32_t> fixed;
};
inline constexpr int kResamplePrecisionBits = 32 - 8 - 2;
ResampleCoeffs resample_coeffs(int in_size, int out_size, Resample filter);

/// ``image`` resized to width x height as Pillow (13) does on an RGB image: a horizontal and a vertical pass, each
/// on uint8 with the fixed-point coefficients, the vertical one first when the height shrinks by more than twice
/// what the width shrinks (Pillow <= 12 always ran the horizontal one first); a pass is skipped when its size is
/// unchanged; Nearest as Pillow's affine nearest-neighbour scale.
Image resize(const Image& image, int width, int height, Resample filter);

// ---- the checkpoint's image processor --------------------------------------------------------------------
/// One image as the vision graph takes it.
struct Pixels {
  /// CLIP: float32 [1, 3, H, W]. Qwen2-VL: float32 [grid_t * grid_h * grid_w, 3 * temporal_patch * patch * patch]
  /// in the processor's order (merge blocks of patches; each patch channel-major, the frame repeated over the
  /// temporal patch).
  Tensor pixel_values;
  std::vector<int64_t> grid_thw;   // Qwen2-VL: {1, grid_h, grid_w} (patches); CLIP: empty
  /// Qwen2-VL: the image's placeholder tokens, grid_t * grid_h * grid_w / merge^2; CLIP: 0 (the bundle's
  /// image_tokens.per_image decides)
  int64_t tokens = 0;
  Image resized;                   // the image after the resize (before crop, rescale, normalize)
};

class ImageProcessor {
 public:
  enum class Kind { Clip, Qwen2VL };

  /// The image processor config of a bundle or checkpoint directory: preprocessor_config.json, else the
  /// "image_processor" section of processor_config.json (what transformers 5 saves). A processor this runtime
  /// does not implement (LLaVA-OneVision anyres tiles, InternVL tiles, ...) is refused with one line.
  static ImageProcessor load(const std::filesystem::path& dir);
  /// From the config object itself (``where`` names it in errors); missing keys take the class defaults.
  static ImageProcessor from_config(const nlohmann::json& config, const std::string& where);

  Pixels process(const Image& image) const;
  /// Qwen2-VL: the frames of a video as the Python front end lays them out (fastv_export/frontend/pixels.py
  /// qwen_video_patches): each frame resized to width x height with ``filter`` (Pillow, on uint8), rescaled and
  /// normalized by this processor (do_resize off), the frame count padded to a multiple of ``temporal_patch`` by
  /// repeating the last frame; pixel_values [t * grid_h * grid_w, 3 * temporal_patch * patch * patch], each row
  /// holding the patch of ``temporal_patch`` consecutive frames; grid_thw {t, grid_h, grid_w}.
  Pixels process_frames(const std::vector<Image>& frames, int width, int height, Resample filter,
                        int temporal_patch) const;

  Kind kind() const { return kind_; }
  std::string type_name() const { return type_; }
  int patch_size() const { return patch_; }
  int merge_size() const { return merge_; }
  int temporal_patch_size() const { return temporal_; }
  Resample resample() const { return resample_; }
  int64_t min_pixels() const { return min_pixels_; }
  int64_t max_pixels() const { return max_pixels_; }
  /// Qwen2-VL: the (height, width) the smart resize gives an image of height x width.
  std::pair<int, int> smart_resize(int height, int width) const;
  /// The Qwen smart resize with explicit bounds (a video's: its processor's min / max pixels).
  std::pair<int, int> smart_resize(int height, int width, int64_t min_pixels, int64_t max_pixels) const;

 private:
  Kind kind_ = Kind::Clip;
  std::string type_;
  bool do_convert_rgb_ = true, do_resize_ = true, do_center_crop_ = true, do_rescale_ = true, do_normalize_ = true;
  Resample resample_ = Resample::Bicubic;
  double rescale_factor_ = 1.0 / 255.0;
  std::array<float, 3> mean_{}, std_{};
  // CLIP size: shortest_edge (+ longest_edge), or height x width
  int64_t shortest_ = 0, longest_ = 0, height_ = 0, width_ = 0;
  int64_t crop_h_ = 0, crop_w_ = 0;
  // Qwen2-VL
  int64_t min_pixels_ = 0, max_pixels_ = 0;
  int patch_ = 14, merge_ = 2, temporal_ = 2;
};

}  // namespace fastv
