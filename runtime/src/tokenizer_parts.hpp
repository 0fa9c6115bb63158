// The parts of fastv::Tokenizer's encoding and decoding pipeline, internal to the runtime library: UTF-8 helpers,
// normalizers and pre-tokenizers (tokenizer_text.cpp); decoders, the BPE / WordLevel model and added tokens
// (tokenizer_vocab.cpp). Each part is made from its tokenizer.json section and refuses what it does not support
// with one fastv::Error line; tokenizer.cpp assembles them into fastv::Tokenizer.
#pragma once

#include <unicode/regex.h>
#include <unicode/umachine.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "fastv/tokenizer.hpp"

namespace fastv::tokenizer_parts {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& msg);

// ------------------------------------------------------------------------------------------------------ UTF-8
inline constexpr const char* kReplacementChar = "\xEF\xBF\xBD";   // U+FFFD
size_t utf8_seq(const std::string& s, size_t i);          // the length of the sequence at s[i], 0 if invalid
UChar32 next_cp(const std::string& s, size_t& i);        // the code point at s[i]; i moves past it
UChar32 last_cp(const std::string& s, size_t end);       // the code point ending at s[end) (end > 0)
void append_cp(std::string& out, UChar32 c);
std::string lossy_utf8(const std::string& s);            // invalid sequences replaced by U+FFFD
bool is_white_space(UChar32 c);
bool is_word_char(UChar32 c);
std::string escape_for_message(const std::string& s);    // JSON-quoted, cut to 80 characters
const std::string& byte_char(unsigned char b);           // GPT-2's bytes_to_unicode
const std::unordered_map<UChar32, unsigned char>& char_byte();   // its inverse

// -------------------------------------------------------------------------------------------- tokenizer.json
std::string type_of(const json& j, const std::string& where);   // the section's "type", else one Error

template <class T>
T get_or(const json& j, const char* key, T dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  return j[key].get<T>();
}

// ------------------------------------------------------------------------------------------------ the parts
// a tokenizers `pattern`: {"String": literal} or {"Regex": onig-style regex}, matched left to right without
// overlap; find_all gives byte ranges of the matches
class Pattern {
 public:
  Pattern() = default;
  Pattern(const json& spec, const std::string& where);
  void compile(const std::string& onig, const std::string& where);
  std::vector<std::pair<size_t, size_t>> find_all(const std::string& s) const;
  std::string replace_all(const std::string& s, const std::string& content) const;   // every match by `content`

 private:
  static std::string translate(const std::string& p, const std::string& where);
  std::string literal_;
  std::shared_ptr<icu::RegexPattern> regex_;
};

std::optional<unsigned char> byte_token(const std::string& t);   // the byte of a "<0xNN>" token

struct Normalizer {
  virtual ~Normalizer() = default;
  virtual void apply(std::string& s) const = 0;
};
using NormalizerPtr = std::unique_ptr<Normalizer>;
NormalizerPtr make_normalizer(const json& j, const std::string& where);   // nullptr for a null section

struct Piece {
  std::string text;
  bool at_start;   // begins at offset 0 of the original text (Metaspace's prepend_scheme "first")
};

struct PreTokenizer {
  virtual ~PreTokenizer() = default;
  virtual void apply(std::vector<Piece>& pieces) const = 0;
};
using PreTokenizerPtr = std::unique_ptr<PreTokenizer>;
PreTokenizerPtr make_pre_tokenizer(const json& j, const std::string& where);   // nullptr for a null section

struct Decoder {
  virtual ~Decoder() = default;
  virtual void chain(std::vector<std::string>& tokens) const = 0;
};
using DecoderPtr = std::unique_ptr<Decoder>;
DecoderPtr make_decoder(const json& j, const std::string& where);   // nullptr for a null section

struct Model {
  bool bpe = true;
  std::unordered_map<std::string, int64_t> vocab;
  std::unordered_map<int64_t, std::string> tokens;
  // BPE
  std::unordered_map<uint64_t, std::pair<uint32_t, int64_t>> merges;   // (left, right) -> (rank, merged id)
  std::optional<std::string> unk;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::string prefix, suffix;
  std::array<int64_t, 256> byte_ids{};   // "<0xNN>" ids, -1 where absent

  static uint64_t key(int64_t a, int64_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  void tokenize(const std::string& word, std::vector<int64_t>& out) const;
};
Model make_model(const json& j, const std::string& where);

struct AddedToken {
  std::string content;   // as written
  std::string pattern;   // matched in the text and decoded: the content, normalized for `normalized` tokens
  int64_t id;
  bool special, single_word, lstrip, rstrip, normalized;
};

struct Segment {
  std::string text;
  int64_t id;   // -1: not an added token
  bool at_start;
};

// leftmost-longest matches of the tokens (indices into `all`) in seg, with single_word / lstrip / rstrip applied
// as tokenizers' AddedVocabulary applies them
void split_added(const Segment& seg, const std::vector<AddedToken>& all, const std::vector<size_t>& which,
                 std::vector<Segment>& out);

}  // namespace fastv::tokenizer_parts
