// TEMPORARY stand-ins for fastv/image.hpp (the issue 21 piece built beside this one);
// deleted when they are merged.
#pragma once

#include "fastv/runtime.hpp"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fastv {

#if !__has_include("fastv/image.hpp")
struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
};
Image read_image(const std::filesystem::path& path);

struct Pixels {
  Tensor pixel_values;
  std::vector<int64_t> grid_thw;
  int64_t tokens = 0;
};

class ImageProcessor {
 public:
  static ImageProcessor load(const std::filesystem::path& preprocessor_config);
  Pixels process(const Image& image) const;
};
#endif

}  // namespace fastv
