// fastv::Tokenizer: a bundle's tokenizer.json (the HF `tokenizers` format) in C++, for the styles the served
// families use: byte-level BPE behind a regex pre-tokenizer (Qwen2 family, GPT-2 ByteLevel) and Llama /
// SentencePiece-style BPE (Metaspace, or Prepend/Replace normalizers, with byte fallback), WordLevel (the demo
// preset), added and special tokens, the post-processor's special tokens, and the decoders those styles use.
// Regexes and Unicode normalization through ICU. A construct outside this set is refused when loading, with one
// fastv::Error line naming it (never a tokenizer that silently encodes differently).
//
// StreamDecoder: incremental decoding for streaming; push() returns only text that a later token cannot change
// and that ends on a complete UTF-8 character (the difference of the decoded window, as HF's DecodeStream does).
#pragma once

#include "fastv/runtime.hpp"

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace fastv {

class Tokenizer {
 public:
  struct Impl;

  // parse and check tokenizer.json; throws fastv::Error naming an unsupported or malformed part
  static Tokenizer load(const std::filesystem::path& tokenizer_json);
  static Tokenizer from_json_text(const std::string& text, const std::string& where = "tokenizer.json");

  // text must be valid UTF-8 (else one Error); add_special_tokens: the post-processor's tokens (e.g. BOS)
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens) const;
  // ids the vocabulary lacks are dropped, as HF does; invalid byte sequences decode to U+FFFD
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const;

  std::optional<int64_t> token_id(const std::string& token) const;       // added tokens first, then the model
  std::optional<std::string> id_token(int64_t id) const;
  bool is_special(int64_t id) const;                                     // an added token marked special
  int64_t vocab_size() const;                                            // largest id + 1
  bool is_fallback_byte(int64_t id) const;   // a "<0xNN>" token that the decoder's ByteFallback step merges

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
  std::string push(int64_t id);   // new complete text ("" while a character or a decoder rule is pending)
  std::string finish();           // whatever is still held (the end of the stream)

 private:
  const Tokenizer* tok_;
  bool skip_;
  std::vector<int64_t> ids_;      // the window: context tokens, then the ones not yet emitted
  std::string prefix_;            // decode of the context tokens
  size_t prefix_index_ = 0;       // ids_[0:prefix_index_] decode to prefix_
};

// true when s is well-formed UTF-8 (no overlong forms, surrogates or code points above U+10FFFF)
bool valid_utf8(const std::string& s);

}  // namespace fastv
