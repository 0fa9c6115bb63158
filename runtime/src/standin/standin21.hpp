// TEMPORARY stand-ins for fastv/tokenizer.hpp and fastv/image.hpp (issue 21 pieces built beside this one);
// deleted when they are merged.
#pragma once

#include "fastv/runtime.hpp"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fastv {

#if !__has_include("fastv/tokenizer.hpp")
class Tokenizer {
 public:
  static Tokenizer load(const std::filesystem::path& tokenizer_json);
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens) const;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const;
  std::optional<int64_t> token_id(const std::string& token) const;
};

class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& t) : t_(&t) {}
  std::string push(int64_t id);
  std::string finish();

 private:
  const Tokenizer* t_;
};
#endif

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
