// Unit tests of fastv::Tokenizer / StreamDecoder on small hand-written tokenizer.json files whose results are worked
// out by hand (the bulk comparison with HF tokenizers is tests/test_cpp_tokenizer.py): BPE merge order, the
// post-processor's BOS, empty text, text of special tokens only, skip_special_tokens, invalid UTF-8 (one error),
// characters the vocabulary lacks, byte fallback, streaming across a split character, refused constructs.
//
// usage: fastv_tokenizer_tests
#include "fastv/tokenizer.hpp"

#include <functional>
#include <iostream>

#include "check.hpp"

namespace {

using fastv_test::check;
using fastv_test::failed;
using fastv_test::passed;

bool throws_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const fastv::Error& e) {
    if (std::string(e.what()).find(needle) != std::string::npos) return true;
    std::cerr << "  (error was: " << e.what() << ")\n";
  }
  return false;
}

using Ids = std::vector<int64_t>;

std::string stream(const fastv::Tokenizer& tok, const Ids& ids, std::vector<std::string>* chunks = nullptr) {
  fastv::StreamDecoder s(tok);
  std::string all;
  for (int64_t id : ids) {
    const std::string c = s.push(id);
    if (chunks && !c.empty()) chunks->push_back(c);
    all += c;
  }
  const std::string c = s.finish();
  if (chunks && !c.empty()) chunks->push_back(c);
  return all + c;
}

const char* kBos = R"({"SpecialToken": {"id": "<s>", "type_id": 0}})";
std::string bos_template(int id) {
  return std::string(R"({"type": "TemplateProcessing", "single": [)") + kBos +
         R"(, {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [)" +
         std::to_string(id) + R"(], "tokens": ["<s>"]}}})";
}

// byte-level BPE: "Ã" "©" are the byte-level characters of the bytes C3 A9 (é)
fastv::Tokenizer byte_level() {
  const std::string j = R"({"model": {"type": "BPE", "vocab": {"h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "he": 5,
      "ll": 6, "llo": 7, "Ġh": 8, "<s>": 9, "Ã": 10, "©": 11},
      "merges": ["h e", "l l", "ll o", "Ġ h"]},
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "decoder": {"type": "ByteLevel"},
    "added_tokens": [{"id": 9, "content": "<s>", "special": true, "normalized": false, "single_word": false,
                      "lstrip": false, "rstrip": false}],
    "post_processor": )" + bos_template(9) + "}";
  return fastv::Tokenizer::from_json_text(j);
}

// Llama style: Metaspace (prepend first), byte fallback, Replace / ByteFallback / Fuse / Strip decoder
fastv::Tokenizer llama() {
  const std::string j = R"({"model": {"type": "BPE", "vocab": {"<unk>": 0, "<s>": 1, "▁": 2, "a": 3, "b": 4, "▁a": 5,
      "<0xC3>": 6, "<0xA9>": 7}, "merges": [["▁", "a"]], "unk_token": "<unk>", "byte_fallback": true,
      "fuse_unk": true},
    "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
    "decoder": {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "added_tokens": [{"id": 1, "content": "<s>", "special": true, "normalized": false}],
    "post_processor": )" + bos_template(1) + "}";
  return fastv::Tokenizer::from_json_text(j);
}

void byte_level_checks() {
  const auto tok = byte_level();
  check(tok.encode("hello", false) == Ids{5, 7}, "BPE merges by rank: he + llo");
  check(tok.encode("hello hello", true) == Ids{9, 5, 7, 4, 5, 7}, "BOS, then ' hello' = Ġ he llo (h e before Ġ h)");
  check(tok.encode("", false).empty(), "empty text: no ids");
  check(tok.encode("", true) == Ids{9}, "empty text with special tokens: BOS only");
  check(tok.encode("<s><s>", false) == Ids{9, 9}, "only special tokens");
  check(tok.encode("<s>", true) == Ids{9, 9}, "special token text with BOS added");
  check(tok.decode({9, 9}, true).empty(), "only special tokens, skipped: empty");
  check(tok.decode({9, 5, 7}, false) == "<s>hello", "decode keeps specials");
  check(tok.decode({9, 5, 7}, true) == "hello", "decode skips specials");
  check(tok.decode({5, 1234, 7}, false) == "hello", "ids outside the vocabulary are dropped (as HF does)");
  check(tok.encode("hé", false) == Ids{0, 10, 11}, "é as its two byte-level characters");
  check(tok.decode({10}, false) == "\xEF\xBF\xBD", "a lone lead byte decodes to U+FFFD");
  check(tok.token_id("<s>") == 9 && tok.token_id("llo") == 7 && !tok.token_id("zz"), "token_id");
  check(tok.is_special(9) && !tok.is_special(5), "is_special");
  for (const std::string bad : {"\xff", "h\xc3", "\xed\xa0\x80", "\xc0\xaf", "\xf4\x90\x80\x80"})
    check(throws_with([&] { tok.encode(bad, true); }, "not valid UTF-8"), "invalid UTF-8 is refused");
  check(throws_with([&] { tok.encode("x", false); }, "no token for"), "a byte the vocabulary lacks: one error");

  std::vector<std::string> chunks;
  check(stream(tok, {5, 10, 11, 7}, &chunks) == "he\xC3\xA9llo", "stream == decode across a split character");
  check(chunks == std::vector<std::string>{"he", "\xC3\xA9", "llo"}, "stream: é waits for its second byte");
  check(fastv::StreamDecoder(tok).push(10).empty(), "stream: a lead byte alone emits nothing");
  fastv::StreamDecoder s(tok);
  s.push(10);
  check(s.finish() == "\xEF\xBF\xBD", "stream: finish emits what is held");
}

void llama_checks() {
  const auto tok = llama();
  check(tok.encode("a b", false) == Ids{5, 2, 4}, "Metaspace: ▁a ▁ b");
  check(tok.encode("a b", true) == Ids{1, 5, 2, 4}, "Metaspace with BOS");
  check(tok.encode("<s>a", false) == Ids{1, 3}, "prepend_scheme first: no ▁ after a leading special token");
  check(tok.encode("é", false) == Ids{2, 6, 7}, "byte fallback <0xC3> <0xA9>");
  check(tok.decode({2, 6, 7}, false) == "\xC3\xA9", "ByteFallback + Strip decode");
  check(tok.decode({5, 2, 4}, false) == "a b", "Replace / Fuse / Strip decode");
  check(tok.decode({6, 3}, false) == "\xEF\xBF\xBD" "a", "an invalid byte run decodes to U+FFFD per byte");
  std::vector<std::string> chunks;
  check(stream(tok, {2, 6, 7}, &chunks) == "\xC3\xA9", "stream of a byte-fallback character");
  check(chunks.size() == 1, "stream: the byte run is emitted once complete");
  check(stream(tok, {5, 2, 5, 6, 7, 2, 4}) == tok.decode({5, 2, 5, 6, 7, 2, 4}, false), "stream == decode");
  check(stream(tok, {3, 6, 6, 3}) == tok.decode({3, 6, 6, 3}, false), "stream of an invalid byte run == decode");
}

void refusal_checks() {
  const auto load = [](const std::string& j) { return fastv::Tokenizer::from_json_text(j); };
  check(throws_with([&] { load("{"); }, "not valid JSON"), "malformed JSON");
  check(throws_with([&] { load(R"({"model": {"type": "Unigram", "vocab": {}}})"); }, "'Unigram' is not supported"),
        "Unigram refused");
  check(throws_with([&] { load(R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": {"type": "Lowercase"}})"); },
                    "'Lowercase' is not supported"), "Lowercase refused");
  check(throws_with([&] { load(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})"); },
                    "lacks"), "a merge of unknown tokens refused");
  check(throws_with([&] { load(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "dropout": 0.1}})"); }, "dropout"),
        "BPE dropout refused");
  const auto words = load(R"({"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "<unk>"},
                              "pre_tokenizer": {"type": "WhitespaceSplit"}})");
  check(words.encode("a  b\ta\n", false) == Ids{0, 1, 0}, "WordLevel over WhitespaceSplit");
  check(throws_with([&] { words.encode("a c", false); }, "not in the WordLevel vocabulary"), "unknown word: error");
  check(words.decode({0, 1}, false) == "a b", "no decoder: tokens joined by spaces");
}

}  // namespace

int main() {
  auto guarded = [](const char* what, void (*f)()) {
    try {
      f();
    } catch (const std::exception& e) {
      check(false, std::string(what) + ": " + e.what());
    }
  };
  guarded("byte-level", byte_level_checks);
  guarded("llama", llama_checks);
  guarded("refusals", refusal_checks);
  std::cout << "tokenizer: " << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
