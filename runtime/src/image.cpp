// PNG (libpng) and JPEG (libjpeg-turbo) decoding to 8-bit RGB as PIL's Image.open(path).convert("RGB").
//
// Both libraries report errors through a callback that must not return: it records the message and
// longjmp()s back to a setjmp() in a function that holds no C++ object with a destructor (the decoder state
// lives in the caller's frame), which then throws fastv::Error with one line.
#include "fastv/image.hpp"

#include <png.h>
#include <jpeglib.h>
#include <jerror.h>

#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>

namespace fastv {
namespace {

constexpr size_t kMessage = 256;

std::string error_prefix(const std::string& name) { return "image " + name + ": "; }

void check_dimensions(uint64_t w, uint64_t h, const std::string& name) {
  if (w == 0 || h == 0) throw Error(error_prefix(name) + "has a zero width or height");
  if (w * h > static_cast<uint64_t>(kMaxImagePixels))
    throw Error(error_prefix(name) + std::to_string(w) + "x" + std::to_string(h) + " px is over the " +
                std::to_string(kMaxImagePixels) + "-pixel limit of fastv-run; give a smaller image");
}

// ------------------------------------------------------------------------------------------------- PNG
struct PngState {
  const uint8_t* data = nullptr;
  size_t size = 0, pos = 0;
  char message[kMessage] = {0};
  bool too_large = false;
  png_uint_32 width = 0, height = 0;
  int bit_depth = 0, color_type = 0, channels = 0;
  std::vector<uint8_t> pixels;             // rows after the transforms below
  std::vector<png_bytep> rows;
  std::array<uint8_t, 256 * 3> palette{};  // PIL's palette: PLTE entries, the rest a grey ramp
  bool has_trns = false;
  std::vector<uint8_t> trns_alpha;         // palette tRNS
  png_color_16 trns_color{};               // grey / RGB tRNS
};

void png_on_error(png_structp png, png_const_charp msg) {
  auto* st = static_cast<PngState*>(png_get_error_ptr(png));
  std::snprintf(st->message, kMessage, "%s", msg ? msg : "libpng error");
  png_longjmp(png, 1);
}

void png_on_warning(png_structp, png_const_charp) {}   // PIL decodes through what libpng only warns about

void png_on_read(png_structp png, png_bytep out, size_t n) {
  auto* st = static_cast<PngState*>(png_get_io_ptr(png));
  if (st->size - st->pos < n) png_error(png, "the file ends early (truncated)");
  std::memcpy(out, st->data + st->pos, n);
  st->pos += n;
}

// Holds only plain data in its own frame: a longjmp back here skips no destructor.
bool png_decode(png_structp png, png_infop info, PngState& st) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_read_fn(png, &st, png_on_read);
  png_set_user_limits(png, PNG_UINT_31_MAX, PNG_UINT_31_MAX);   // the pixel cap below decides
  png_set_crc_action(png, PNG_CRC_DEFAULT, PNG_CRC_WARN_DISCARD);
  png_read_info(png, info);
  int interlace = 0;
  png_get_IHDR(png, info, &st.width, &st.height, &st.bit_depth, &st.color_type, &interlace, nullptr, nullptr);
  if (st.width == 0 || st.height == 0 ||
      static_cast<uint64_t>(st.width) * st.height > static_cast<uint64_t>(kMaxImagePixels)) {
    st.too_large = true;
    return false;
  }
  if (st.color_type == PNG_COLOR_TYPE_PALETTE) {
    for (int i = 0; i < 256; ++i) st.palette[3 * i] = st.palette[3 * i + 1] = st.palette[3 * i + 2] = uint8_t(i);
    png_colorp plte = nullptr;
    int n = 0;
    if (png_get_PLTE(png, info, &plte, &n) & PNG_INFO_PLTE) {
      for (int i = 0; i < n && i < 256; ++i) {
        st.palette[3 * i] = plte[i].red;
        st.palette[3 * i + 1] = plte[i].green;
        st.palette[3 * i + 2] = plte[i].blue;
      }
    }
  }
  if (png_get_valid(png, info, PNG_INFO_tRNS)) {
    png_bytep alpha = nullptr;
    int n = 0;
    png_color_16p color = nullptr;
    png_get_tRNS(png, info, &alpha, &n, &color);
    st.has_trns = true;
    if (st.color_type == PNG_COLOR_TYPE_PALETTE && alpha) st.trns_alpha.assign(alpha, alpha + n);
    if (color) st.trns_color = *color;
  }
  if (st.bit_depth < 8) {
    if (st.color_type == PNG_COLOR_TYPE_GRAY) png_set_expand_gray_1_2_4_to_8(png);
    else png_set_packing(png);   // palette indices, one a byte
  }
  if (st.bit_depth == 16 && st.color_type != PNG_COLOR_TYPE_GRAY) png_set_strip_16(png);   // PIL: the high byte
  if (interlace != PNG_INTERLACE_NONE) png_set_interlace_handling(png);
  png_read_update_info(png, info);
  st.channels = png_get_channels(png, info);
  const size_t rowbytes = png_get_rowbytes(png, info);
  st.pixels.resize(rowbytes * st.height);
  st.rows.resize(st.height);
  for (png_uint_32 y = 0; y < st.height; ++y) st.rows[y] = st.pixels.data() + y * rowbytes;
  png_read_image(png, st.rows.data());
  return true;
}

struct PngGuard {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~PngGuard() { png_destroy_read_struct(&png, info ? &info : nullptr, nullptr); }
};

Image decode_png(const uint8_t* data, size_t size, const std::string& name) {
  PngState st;
  st.data = data;
  st.size = size;
  PngGuard g;
  g.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &st, png_on_error, png_on_warning);
  if (!g.png) throw Error(error_prefix(name) + "libpng could not start");
  g.info = png_create_info_struct(g.png);
  if (!g.info) throw Error(error_prefix(name) + "libpng could not start");
  if (!png_decode(g.png, g.info, st)) {
    if (st.too_large) check_dimensions(st.width, st.height, name);
    throw Error(error_prefix(name) + "not a readable PNG (" + st.message + ")");
  }
  Image im;
  im.width = static_cast<int>(st.width);
  im.height = static_cast<int>(st.height);
  im.rgb.resize(static_cast<size_t>(im.width) * im.height * 3);
  const bool grey = !(st.color_type & PNG_COLOR_MASK_COLOR);
  for (int y = 0; y < im.height; ++y) {
    const uint8_t* in = st.rows[y];
    uint8_t* out = im.rgb.data() + static_cast<size_t>(y) * im.width * 3;
    for (int x = 0; x < im.width; ++x, out += 3) {
      if (st.color_type == PNG_COLOR_TYPE_PALETTE) {
        std::memcpy(out, &st.palette[3 * in[x]], 3);
      } else if (grey && st.bit_depth == 16) {
        // PIL opens 16-bit grey as I;16; its conversion to RGB clips at 255
        const unsigned v = (unsigned(in[2 * x * st.channels]) << 8) | in[2 * x * st.channels + 1];
        out[0] = out[1] = out[2] = uint8_t(v > 255 ? 255 : v);
      } else if (grey) {
        out[0] = out[1] = out[2] = in[x * st.channels];   // L, or LA with the alpha dropped
      } else {
        std::memcpy(out, in + x * st.channels, 3);         // RGB, or RGBA with the alpha dropped
      }
    }
  }
  // the colour key PIL keeps in info["transparency"] after convert("RGB") (the processors composite it)
  if (st.has_trns) {
    if (st.color_type == PNG_COLOR_TYPE_PALETTE) {
      // PIL: a tRNS of one fully transparent entry and the rest opaque is that entry's index (its colour is
      // kept); any other palette alpha is dropped by convert("RGB")
      int zero = -1, zeros = 0;
      bool opaque_rest = true;
      for (size_t i = 0; i < st.trns_alpha.size(); ++i) {
        if (st.trns_alpha[i] == 0) zero = int(i), ++zeros;
        else if (st.trns_alpha[i] != 255) opaque_rest = false;
      }
      if (zeros == 1 && opaque_rest)
        im.transparent = std::array<uint8_t, 3>{st.palette[3 * zero], st.palette[3 * zero + 1], st.palette[3 * zero + 2]};
    } else if (grey && st.bit_depth <= 8) {
      const unsigned v = st.trns_color.gray;
      if (st.bit_depth == 1) throw Error(error_prefix(name) + "a 1-bit grey PNG with a transparent colour is not served; "
                                         "convert it to 8-bit RGB");
      if (v <= 255) im.transparent = std::array<uint8_t, 3>{uint8_t(v), uint8_t(v), uint8_t(v)};
    } else if (grey) {
      throw Error(error_prefix(name) + "a 16-bit grey PNG with a transparent colour is not served; convert it to "
                  "8-bit RGB");
    } else {
      const png_color_16& c = st.trns_color;
      if (c.red <= 255 && c.green <= 255 && c.blue <= 255)
        im.transparent = std::array<uint8_t, 3>{uint8_t(c.red), uint8_t(c.green), uint8_t(c.blue)};
    }
  }
  return im;
}

// ------------------------------------------------------------------------------------------------ JPEG
struct JpegError {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX + 8];
};

void jpeg_on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// PIL refuses a truncated JPEG ("image file is truncated"); libjpeg only warns and pads it: make that an error.
// Other warnings (corrupt data libjpeg decodes through) are ignored as PIL ignores them.
void jpeg_on_message(j_common_ptr cinfo, int level) {
  if (level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_on_error(cinfo);
}

struct JpegState {
  JpegError err;
  jpeg_decompress_struct cinfo;
  bool created = false, too_large = false;
  JDIMENSION width = 0, height = 0;
  int components = 0;
  J_COLOR_SPACE space = JCS_UNKNOWN;
  std::vector<uint8_t> pixels;
};

bool jpeg_decode(JpegState& st, const uint8_t* data, size_t size) {
  st.cinfo.err = jpeg_std_error(&st.err.pub);
  st.err.pub.error_exit = jpeg_on_error;
  st.err.pub.emit_message = jpeg_on_message;
  st.err.message[0] = 0;
  if (setjmp(st.err.jump)) return false;
  jpeg_create_decompress(&st.cinfo);
  st.created = true;
  jpeg_mem_src(&st.cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&st.cinfo, TRUE);
  st.width = st.cinfo.image_width;
  st.height = st.cinfo.image_height;
  if (st.width == 0 || st.height == 0 ||
      static_cast<uint64_t>(st.width) * st.height > static_cast<uint64_t>(kMaxImagePixels)) {
    st.too_large = true;
    return false;
  }
  st.space = st.cinfo.jpeg_color_space;
  if (st.space == JCS_GRAYSCALE) st.cinfo.out_color_space = JCS_GRAYSCALE;
  else if (st.space == JCS_CMYK || st.space == JCS_YCCK) st.cinfo.out_color_space = JCS_CMYK;
  else st.cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&st.cinfo);
  st.components = st.cinfo.output_components;
  const size_t stride = static_cast<size_t>(st.cinfo.output_width) * st.components;
  st.pixels.resize(stride * st.cinfo.output_height);
  while (st.cinfo.output_scanline < st.cinfo.output_height) {
    JSAMPROW row = st.pixels.data() + st.cinfo.output_scanline * stride;
    jpeg_read_scanlines(&st.cinfo, &row, 1);
  }
  jpeg_finish_decompress(&st.cinfo);
  return true;
}

Image decode_jpeg(const uint8_t* data, size_t size, const std::string& name) {
  JpegState st;
  std::memset(&st.cinfo, 0, sizeof st.cinfo);
  struct Guard {
    JpegState& st;
    ~Guard() {
      if (st.created) jpeg_destroy_decompress(&st.cinfo);
    }
  } guard{st};
  const bool ok = jpeg_decode(st, data, size);
  if (!ok) {
    if (st.too_large) check_dimensions(st.width, st.height, name);
    throw Error(error_prefix(name) + "not a readable JPEG (" + st.err.message + ")");
  }
  Image im;
  im.width = static_cast<int>(st.width);
  im.height = static_cast<int>(st.height);
  const size_t n = static_cast<size_t>(im.width) * im.height;
  im.rgb.resize(n * 3);
  for (size_t i = 0; i < n; ++i) {
    uint8_t* out = &im.rgb[3 * i];
    if (st.components == 1) {
      out[0] = out[1] = out[2] = st.pixels[i];
    } else if (st.components == 3) {
      std::memcpy(out, &st.pixels[3 * i], 3);
    } else {
      // PIL reads CMYK JPEGs as Adobe-inverted ("CMYK;I") and converts to RGB with
      // c' = nk - c * nk / 255 (rounded as its MULDIV255), nk = 255 - k
      const uint8_t* in = &st.pixels[4 * i];
      const int nk = 255 - (255 - in[3]);
      for (int c = 0; c < 3; ++c) {
        const int v = 255 - in[c];
        const int tmp = v * nk + 128;
        const int r = nk - (((tmp >> 8) + tmp) >> 8);
        out[c] = uint8_t(r < 0 ? 0 : r > 255 ? 255 : r);
      }
    }
  }
  return im;
}

}  // namespace

Image decode_image(const uint8_t* data, size_t size, const std::string& name) {
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (size >= 8 && std::memcmp(data, kPng, 8) == 0) return decode_png(data, size, name);
  if (size >= 3 && data[0] == 0xff && data[1] == 0xd8 && data[2] == 0xff) return decode_jpeg(data, size, name);
  throw Error(error_prefix(name) + "is not a PNG or JPEG file (fastv-run reads those two formats; convert it)");
}

Image read_image(const std::filesystem::path& path) {
  const std::string name = path.string();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw Error(error_prefix(name) + "does not exist or is not a file");
  const auto bytes = std::filesystem::file_size(path, ec);
  if (ec) throw Error(error_prefix(name) + "cannot be read (" + ec.message() + ")");
  if (bytes > (uint64_t{1} << 31)) throw Error(error_prefix(name) + "is over 2 GiB; give a smaller image");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(error_prefix(name) + "cannot be opened");
  std::vector<uint8_t> data(static_cast<size_t>(bytes));
  if (bytes && !f.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(bytes)))
    throw Error(error_prefix(name) + "cannot be read");
  return decode_image(data.data(), data.size(), name);
}

}  // namespace fastv
