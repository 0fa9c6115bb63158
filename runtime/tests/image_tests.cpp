// Host unit tests of the image code: Pillow's resample coefficients on small cases worked out by hand from
// libImaging/Resample.c's definitions, the fixed-point passes, nearest, the Qwen smart resize, and decoding
// errors. The comparison with PIL itself over many sizes is tests/test_cpp_image.py.
//
// usage: fastv_image_tests
#include "fastv/image.hpp"

#include <cmath>
#include <functional>
#include <iostream>

#include "check.hpp"

namespace {

using fastv_test::check;
using fastv_test::failed;
using fastv_test::passed;

bool near(double a, double b) { return std::fabs(a - b) < 1e-12; }

int32_t fixed(double w) {   // round half away from zero at 22 fractional bits
  const double v = w * (1 << 22);
  return static_cast<int32_t>(w < 0 ? v - 0.5 : v + 0.5);
}

bool throws_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const fastv::Error& e) {
    const bool ok = std::string(e.what()).find(needle) != std::string::npos;
    if (!ok) std::cerr << "  (message was: " << e.what() << ")\n";
    return ok;
  }
  return false;
}

fastv::Image row(std::vector<uint8_t> grey) {
  fastv::Image im;
  im.width = static_cast<int>(grey.size());
  im.height = 1;
  for (uint8_t g : grey) im.rgb.insert(im.rgb.end(), {g, g, g});
  return im;
}

void coefficient_checks() {
  using fastv::Resample;
  // bilinear 4 -> 2: scale 2, support 2; output 0 centred at 1.0 reads inputs 0..2 with tent((x + 0.5 - 1) / 2)
  // = 0.75, 0.75, 0.25 -> 3/7, 3/7, 1/7; output 1 centred at 3.0 reads 1..3: 1/7, 3/7, 3/7
  auto k = fastv::resample_coeffs(4, 2, Resample::Bilinear);
  check(k.ksize == 5, "bilinear 4->2: ksize ceil(2)*2+1");
  check(k.first == std::vector<int>{0, 1} && k.count == std::vector<int>{3, 3}, "bilinear 4->2: bounds");
  check(near(k.weights[0], 3.0 / 7) && near(k.weights[1], 3.0 / 7) && near(k.weights[2], 1.0 / 7),
        "bilinear 4->2: weights of output 0");
  check(near(k.weights[5], 1.0 / 7) && near(k.weights[6], 3.0 / 7) && near(k.weights[7], 3.0 / 7),
        "bilinear 4->2: weights of output 1");
  check(k.fixed[0] == 1797559 && k.fixed[2] == 599186, "bilinear 4->2: fixed point 3/7 * 2^22, 1/7 * 2^22");
  check(k.weights[3] == 0 && k.weights[4] == 0 && k.fixed[3] == 0, "unused taps are zero");

  // bicubic (a = -0.5) 2 -> 4 (upscale: support 2, not scaled): output 0 centred at 0.25 reads inputs 0, 1
  // (xmin = int(-1.25) clipped to 0, xmax = int(2.75) = 2): cubic(0.25) = 0.8671875, cubic(1.25) = -0.0703125
  k = fastv::resample_coeffs(2, 4, Resample::Bicubic);
  const double s = 0.8671875 - 0.0703125;
  check(k.first[0] == 0 && k.count[0] == 2, "bicubic 2->4: bounds of output 0");
  check(near(k.weights[0], 0.8671875 / s) && near(k.weights[1], -0.0703125 / s), "bicubic 2->4: weights");
  check(k.fixed[1] == fixed(-0.0703125 / s) && k.fixed[1] < 0, "bicubic 2->4: negative weight rounds away from 0");
  // output 3 centred at 1.75 reads 0, 1 (xmax = int(4.25) clipped to 2): mirror image of output 0
  check(k.first[3] == 0 && k.count[3] == 2 && near(k.weights[3 * k.ksize], k.weights[1]) &&
            near(k.weights[3 * k.ksize + 1], k.weights[0]),
        "bicubic 2->4: output 3 mirrors output 0");

  // box 6 -> 2: each output averages 3 inputs
  k = fastv::resample_coeffs(6, 2, Resample::Box);
  check(k.first == std::vector<int>{0, 3} && k.count == std::vector<int>{3, 3}, "box 6->2: bounds");
  check(near(k.weights[0], 1.0 / 3) && near(k.weights[1], 1.0 / 3) && near(k.weights[2], 1.0 / 3), "box 6->2: weights");

  // lanczos 3 -> 3 is not resampled by resize(), but its coefficients at scale 1 are sinc(d)sinc(d/3) at integer
  // d: 1 at d = 0, 0 elsewhere
  k = fastv::resample_coeffs(3, 3, Resample::Lanczos);
  check(k.first[1] == 0 && k.count[1] == 3 && near(k.weights[1 * k.ksize + 1], 1.0) &&
            std::fabs(k.weights[1 * k.ksize]) < 1e-15,
        "lanczos at scale 1 interpolates");

  // every filter, down and up: the fixed weights of an output sum to 2^22 within rounding
  for (auto f : {Resample::Box, Resample::Bilinear, Resample::Hamming, Resample::Bicubic, Resample::Lanczos}) {
    for (auto [a, b] : std::vector<std::pair<int, int>>{{17, 5}, {5, 17}, {640, 224}, {3, 1}}) {
      k = fastv::resample_coeffs(a, b, f);
      bool ok = true;
      for (int i = 0; i < b; ++i) {
        int64_t sum = 0;
        for (int j = 0; j < k.ksize; ++j) sum += k.fixed[size_t(i) * k.ksize + j];
        ok = ok && std::llabs(sum - (int64_t{1} << 22)) <= k.ksize && k.first[i] >= 0 && k.first[i] + k.count[i] <= a;
      }
      check(ok, std::string("fixed weights sum to 2^22 and stay inside: ") + fastv::resample_name(f) + " " +
                    std::to_string(a) + "->" + std::to_string(b));
    }
  }
}

void resize_checks() {
  using fastv::Resample;
  // bilinear 4 -> 2 of grey 0, 70, 140, 210: (2^21 + 70*1797559 + 140*599186) >> 22 = 50 (3/7*70 + 1/7*140 = 50)
  auto out = fastv::resize(row({0, 70, 140, 210}), 2, 1, Resample::Bilinear);
  check(out.width == 2 && out.height == 1 && out.at(0, 0, 0) == 50 && out.at(1, 0, 1) == 160,
        "bilinear 4->2 pixels: 50, 160");
  // overshoot of the cubic is clipped to 0..255
  out = fastv::resize(row({0, 255}), 4, 1, Resample::Bicubic);
  check(out.at(0, 0, 0) == 0 && out.at(3, 0, 0) == 255, "bicubic overshoot clipped");
  // a constant image stays constant with every filter, down and up, both passes
  for (auto f : {Resample::Nearest, Resample::Box, Resample::Bilinear, Resample::Hamming, Resample::Bicubic,
                 Resample::Lanczos}) {
    fastv::Image c;
    c.width = 13, c.height = 7;
    c.rgb.assign(13 * 7 * 3, 77);
    bool ok = true;
    for (auto [w, h] : std::vector<std::pair<int, int>>{{5, 3}, {29, 11}, {13, 2}, {1, 1}}) {
      const auto r = fastv::resize(c, w, h, f);
      ok = ok && r.width == w && r.height == h;
      for (uint8_t v : r.rgb) ok = ok && v == 77;
    }
    check(ok, std::string("constant image stays constant: ") + fastv::resample_name(f));
  }
  // nearest 3 -> 2: source x = int(0.75) = 0, int(2.25) = 2
  out = fastv::resize(row({10, 20, 30}), 2, 1, Resample::Nearest);
  check(out.at(0, 0, 0) == 10 && out.at(1, 0, 0) == 30, "nearest 3->2 picks 0 and 2");
  // same size: a copy
  out = fastv::resize(row({1, 2, 3}), 3, 1, Resample::Lanczos);
  check(out.rgb == row({1, 2, 3}).rgb, "same size is a copy");
}

void processor_checks() {
  auto qwen = fastv::ImageProcessor::from_config(
      {{"image_processor_type", "Qwen2VLImageProcessor"}, {"min_pixels", 3136}, {"max_pixels", 50176}}, "test");
  // 100 x 60: round(100/28) = 4 -> 112, round(60/28) = 2 -> 56; 112 * 56 within [3136, 50176]
  check(qwen.smart_resize(100, 60) == std::pair<int, int>{112, 56}, "smart_resize 100x60");
  // 1000 x 1000: 1008^2 > 50176 -> beta = sqrt(1e6 / 50176), floor(1000 / beta / 28) * 28 = 224
  check(qwen.smart_resize(1000, 1000) == std::pair<int, int>{224, 224}, "smart_resize over max pixels");
  // 10 x 10: 0 < min -> beta = sqrt(3136 / 100), ceil(10 * 5.6 / 28) * 28 = 56
  check(qwen.smart_resize(10, 10) == std::pair<int, int>{56, 56}, "smart_resize under min pixels");
  // 42 x 70: round(1.5) = 2 (half to even) -> 56, round(2.5) = 2 -> 56
  check(qwen.smart_resize(42, 70) == std::pair<int, int>{56, 56}, "smart_resize rounds half to even");
  check(throws_with([&] { qwen.smart_resize(1, 300); }, "aspect ratio over 200"), "smart_resize refuses ratio > 200");
  // patch layout: a 56x56 image of value (y * 56 + x) % 256 in R: row 0 = merge block (0,0), patch (0,0)
  fastv::Image im;
  im.width = im.height = 56;
  for (int y = 0; y < 56; ++y)
    for (int x = 0; x < 56; ++x) im.rgb.insert(im.rgb.end(), {uint8_t((y * 56 + x) % 256), 0, 255});
  auto raw = fastv::ImageProcessor::from_config({{"image_processor_type", "Qwen2VLImageProcessorFast"},
                                                 {"min_pixels", 3136}, {"max_pixels", 3136}, {"do_rescale", false},
                                                 {"do_normalize", false}}, "test");
  const auto px = raw.process(im);
  const float* v = px.pixel_values.as<float>();
  check(px.pixel_values.shape == std::vector<int64_t>{16, 3 * 2 * 14 * 14} &&
            px.grid_thw == std::vector<int64_t>{1, 4, 4} && px.tokens == 4,
        "qwen 56x56: 16 patches of 1176, grid (1, 4, 4), 4 tokens");
  // row 1 is patch (0, 1) of merge block (0, 0): x0 = 14; element (c=0, t=1, ph=2, pw=3) = pixel (y=2, x=17)
  check(v[1 * 1176 + (0 * 2 + 1) * 196 + 2 * 14 + 3] == float((2 * 56 + 17) % 256), "qwen patch order (mw, then t)");
  // row 2 is patch (1, 0) of block (0, 0); row 4 is block (0, 1)'s first patch: x0 = 28
  check(v[2 * 1176] == float((14 * 56) % 256) && v[4 * 1176] == float(28), "qwen patch order (mh, then blocks)");
  check(v[5 * 1176 + 2 * 2 * 196] == 255.0f, "qwen channel-major");
  // refusals
  check(throws_with([] { fastv::ImageProcessor::from_config({{"image_processor_type", "LlavaOnevisionImageProcessor"}},
                                                            "cfg"); }, "not served"),
        "OneVision tiles refused");
  check(throws_with([] { fastv::ImageProcessor::from_config({{"image_processor_type", "SiglipImageProcessor"}},
                                                            "cfg"); }, "not served"),
        "unknown processor refused");
  check(throws_with([] { fastv::ImageProcessor::from_config({{"image_processor_type", "CLIPImageProcessor"},
                                                             {"resample", 9}}, "cfg"); }, "resample"),
        "resample out of range refused");
}

void decode_checks() {
  const std::string text = "hello, this is not an image";
  check(throws_with([&] { fastv::decode_image(reinterpret_cast<const uint8_t*>(text.data()), text.size(), "t.txt"); },
                    "not a PNG or JPEG"),
        "text is refused");
  const uint8_t png[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R', 0, 0};
  check(throws_with([&] { fastv::decode_image(png, sizeof png, "cut.png"); }, "not a readable PNG"),
        "truncated PNG header is refused");
  const uint8_t jpg[] = {0xff, 0xd8, 0xff, 0xe0, 0, 16, 'J', 'F', 'I', 'F', 0, 1};
  check(throws_with([&] { fastv::decode_image(jpg, sizeof jpg, "cut.jpg"); }, "not a readable JPEG"),
        "truncated JPEG header is refused");
  check(throws_with([] { fastv::read_image("/nonexistent/x.png"); }, "does not exist"), "missing file is refused");
}

}  // namespace

int main() {
  coefficient_checks();
  resize_checks();
  processor_checks();
  decode_checks();
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
