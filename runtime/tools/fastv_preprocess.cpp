// fastv-preprocess: decode images and run a bundle's image processor in C++, writing what it computes, so that
// tests can compare it with the Python front end (tests/test_cpp_image.py).
//
//   fastv-preprocess --out DIR (--dir BUNDLE_DIR | --config preprocessor_config.json | --decode-only) IMAGE...
//
// DIR/index.json: {"images": [{"image": PATH, "decoded": [h, w], "resized": [h, w], "shape": [...],
//                              "grid_thw": [...], "tokens": n}, ...]}
// DIR/<i>.decoded.bin  uint8 [h, w, 3] (read_image)        DIR/<i>.resized.bin  uint8 [h, w, 3] (after the resize)
// DIR/<i>.pixels.bin   float32, "shape" (pixel values)      little-endian, row-major, nothing else
// Errors: one line "fastv-preprocess: error: ..." on stderr, exit 1 (2: bad arguments).
#include "fastv/image.hpp"

#include <fstream>
#include <iostream>

namespace {

const char* kUsage =
    "usage: fastv-preprocess --out DIR (--dir BUNDLE_DIR | --config FILE | --decode-only) IMAGE...\n"
    "  --dir DIR        the image processor of a bundle or checkpoint directory (preprocessor_config.json)\n"
    "  --config FILE    an image processor config file\n"
    "  --decode-only    only decode the images (PNG / JPEG -> RGB)\n"
    "  --out DIR        where index.json and the .bin files go\n";

void write_bytes(const std::filesystem::path& path, const void* data, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  if (!f) throw fastv::Error(path.string() + " cannot be written");
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir, config, out;
  bool decode_only = false;
  std::vector<std::string> images;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--dir" || a == "--config" || a == "--out") {
      if (i + 1 >= argc) {
        std::cerr << "fastv-preprocess: " << a << " needs a value (see --help)\n";
        return 2;
      }
      (a == "--dir" ? dir : a == "--config" ? config : out) = argv[++i];
    } else if (a == "--decode-only") {
      decode_only = true;
    } else if (!a.empty() && a[0] == '-') {
      std::cerr << "fastv-preprocess: unknown argument '" << a << "' (see --help)\n";
      return 2;
    } else {
      images.push_back(a);
    }
  }
  if (out.empty() || images.empty() || (int(!dir.empty()) + int(!config.empty()) + int(decode_only)) != 1) {
    std::cerr << "fastv-preprocess: give --out, one of --dir / --config / --decode-only, and images (see --help)\n";
    return 2;
  }
  try {
    std::optional<fastv::ImageProcessor> proc;
    if (!dir.empty()) {
      proc = fastv::ImageProcessor::load(dir);
    } else if (!config.empty()) {
      std::ifstream f(config);
      if (!f) throw fastv::Error(config + " cannot be opened");
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(f);
      } catch (const nlohmann::json::exception&) {
        throw fastv::Error(config + " is not valid JSON");
      }
      proc = fastv::ImageProcessor::from_config(j, config);
    }
    std::filesystem::create_directories(out);
    nlohmann::json index = nlohmann::json::array();
    for (size_t i = 0; i < images.size(); ++i) {
      const fastv::Image im = fastv::read_image(images[i]);
      const std::string stem = (std::filesystem::path(out) / std::to_string(i)).string();
      write_bytes(stem + ".decoded.bin", im.rgb.data(), im.rgb.size());
      nlohmann::json rec = {{"image", images[i]}, {"decoded", {im.height, im.width}}};
      if (proc) {
        const fastv::Pixels px = proc->process(im);
        write_bytes(stem + ".resized.bin", px.resized.rgb.data(), px.resized.rgb.size());
        write_bytes(stem + ".pixels.bin", px.pixel_values.data.data(), px.pixel_values.data.size());
        rec["resized"] = {px.resized.height, px.resized.width};
        rec["shape"] = px.pixel_values.shape;
        rec["grid_thw"] = px.grid_thw;
        rec["tokens"] = px.tokens;
      }
      index.push_back(rec);
    }
    std::ofstream f(std::filesystem::path(out) / "index.json");
    f << nlohmann::json{{"images", index}}.dump() << "\n";
    if (!f) throw fastv::Error(out + "/index.json cannot be written");
  } catch (const fastv::Error& e) {
    std::cerr << "fastv-preprocess: error: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "fastv-preprocess: error: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "fastv-preprocess: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
