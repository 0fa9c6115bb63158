// fastv-tokenize: the C++ tokenizer (fastv/tokenizer.hpp) over a file of JSON lines, for bulk comparisons with the
// HF `tokenizers` library (tests/test_cpp_tokenizer.py).
//
// usage: fastv-tokenize TOKENIZER_JSON [LINES_JSONL]      (LINES_JSONL defaults to stdin)
//   in:  {"text": "...", "add_special_tokens": true}  or  {"ids": [...]}
//   out: one line per input line, in order:
//        text: {"ids": [...], "decoded": ..., "decoded_skip": ..., "stream_hex": [...]}
//        ids:  {"decoded": ..., "decoded_skip": ..., "stream_hex": [...]}
//        or {"error": "..."} where the tokenizer refused the line (e.g. a word a WordLevel vocabulary lacks)
//   decoded / decoded_skip: decode(ids) without / with skip_special_tokens; stream_hex: the StreamDecoder's
//   chunks (push per id, then finish), hex-encoded bytes so that the caller checks each chunk's UTF-8 itself.
// A tokenizer.json that cannot be loaded: "fastv-tokenize: error: ..." on stderr, exit 1.
#include "fastv/tokenizer.hpp"

#include <fstream>
#include <iostream>

namespace {

std::string hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += d[c >> 4];
    out += d[c & 15];
  }
  return out;
}

nlohmann::json decoded(const fastv::Tokenizer& tok, const std::vector<int64_t>& ids) {
  nlohmann::json out;
  out["decoded"] = tok.decode(ids, false);
  out["decoded_skip"] = tok.decode(ids, true);
  fastv::StreamDecoder stream(tok);
  nlohmann::json chunks = nlohmann::json::array();
  for (int64_t id : ids) {
    const std::string c = stream.push(id);
    if (!c.empty()) chunks.push_back(hex(c));
  }
  const std::string c = stream.finish();
  if (!c.empty()) chunks.push_back(hex(c));
  out["stream_hex"] = chunks;
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cerr << "usage: fastv-tokenize TOKENIZER_JSON [LINES_JSONL]\n";
    return argc == 2 ? 0 : 2;
  }
  try {
    const fastv::Tokenizer tok = fastv::Tokenizer::load(argv[1]);
    std::ifstream file;
    if (argc == 3) {
      file.open(argv[2], std::ios::binary);
      if (!file) throw fastv::Error(std::string("cannot read ") + argv[2]);
    }
    std::istream& in = argc == 3 ? static_cast<std::istream&>(file) : std::cin;
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      const auto req = nlohmann::json::parse(line);
      nlohmann::json out;
      try {
        if (req.contains("ids")) {
          out = decoded(tok, req["ids"].get<std::vector<int64_t>>());
        } else {
          const auto ids = tok.encode(req.at("text").get<std::string>(), req.value("add_special_tokens", true));
          out = decoded(tok, ids);
          out["ids"] = ids;
        }
      } catch (const fastv::Error& e) {
        out = {{"error", e.what()}};
      }
      std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::strict) << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "fastv-tokenize: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
