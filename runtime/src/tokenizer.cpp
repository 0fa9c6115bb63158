// fastv::Tokenizer over tokenizer.json (see fastv/tokenizer.hpp). The encoding pipeline is the one the HF
// `tokenizers` library documents: added tokens split out of the raw text (those not `normalized`), the normalizer
// on each remaining piece, the `normalized` added tokens split out of the normalized pieces, the pre-tokenizer,
// the model on each pre-token, the post-processor. Regexes are ICU's (icu::RegexMatcher over UTF-8 UText, so
// match offsets are byte offsets); the onig-style classes \s \S \w \W are rewritten to the Unicode properties
// tokenizers' regex engine gives them (White_Space; Letter | Mark | Number | Connector_Punctuation).
#include "fastv/tokenizer.hpp"

#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utext.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <queue>
#include <sstream>
#include <unordered_map>

namespace fastv {

namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& msg) { throw Error(msg); }

// ------------------------------------------------------------------------------------------------------ UTF-8
// length of the well-formed sequence at s[i] (0 when it is not one)
size_t utf8_seq(const std::string& s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const size_t n = s.size();
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  auto cont = [&](size_t k, unsigned char lo = 0x80, unsigned char hi = 0xBF) {
    return k < n && b(k) >= lo && b(k) <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    const unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    return cont(i + 1, lo, hi) && cont(i + 2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    const unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    return cont(i + 1, lo, hi) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  }
  return 0;
}

// the code point at s[i] (s valid UTF-8); advances i
UChar32 next_cp(const std::string& s, size_t& i) {
  const size_t len = utf8_seq(s, i);
  const auto b = [&](size_t k) { return static_cast<UChar32>(static_cast<unsigned char>(s[k])); };
  UChar32 c;
  if (len == 1) c = b(i);
  else if (len == 2) c = ((b(i) & 0x1F) << 6) | (b(i + 1) & 0x3F);
  else if (len == 3) c = ((b(i) & 0x0F) << 12) | ((b(i + 1) & 0x3F) << 6) | (b(i + 2) & 0x3F);
  else c = ((b(i) & 0x07) << 18) | ((b(i + 1) & 0x3F) << 12) | ((b(i + 2) & 0x3F) << 6) | (b(i + 3) & 0x3F);
  i += len;
  return c;
}

UChar32 last_cp(const std::string& s, size_t end) {   // the code point ending at s[end) (end > 0)
  size_t start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  return next_cp(s, start);
}

void append_cp(std::string& out, UChar32 c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

const char* const kReplacementChar = "\xEF\xBF\xBD";   // U+FFFD

// bytes -> valid UTF-8, each maximal ill-formed subpart replaced by one U+FFFD (the Unicode "maximal subpart"
// practice, which Rust's String::from_utf8_lossy follows)
std::string lossy_utf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const size_t len = utf8_seq(s, i);
    if (len) {
      out.append(s, i, len);
      i += len;
      continue;
    }
    // the longest prefix of s[i:] that could start a well-formed sequence
    const auto c = static_cast<unsigned char>(s[i]);
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) { need = 3; lo = c == 0xE0 ? 0xA0 : 0x80; hi = c == 0xED ? 0x9F : 0xBF; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 4; lo = c == 0xF0 ? 0x90 : 0x80; hi = c == 0xF4 ? 0x8F : 0xBF; }
    size_t k = 1;
    if (need) {
      auto in = [&](size_t j, unsigned char l, unsigned char h) {
        return j < n && static_cast<unsigned char>(s[j]) >= l && static_cast<unsigned char>(s[j]) <= h;
      };
      if (in(i + 1, lo, hi)) {
        k = 2;
        while (k < need && in(i + k, 0x80, 0xBF)) ++k;
      }
    }
    out += kReplacementChar;
    i += k;
  }
  return out;
}

bool is_white_space(UChar32 c) { return u_hasBinaryProperty(c, UCHAR_WHITE_SPACE); }

// a word character for added tokens' single_word: \w as Unicode regexes define it (UTS #18: Alphabetic, Mark,
// Decimal_Number, Connector_Punctuation, Join_Control), the rule tokenizers applies
bool is_word_char(UChar32 c) {
  if (u_hasBinaryProperty(c, UCHAR_ALPHABETIC) || u_hasBinaryProperty(c, UCHAR_JOIN_CONTROL)) return true;
  const int8_t t = u_charType(c);
  return t == U_NON_SPACING_MARK || t == U_COMBINING_SPACING_MARK || t == U_ENCLOSING_MARK ||
         t == U_DECIMAL_DIGIT_NUMBER || t == U_CONNECTOR_PUNCTUATION;
}

std::string escape_for_message(const std::string& s) {
  std::string out = json(s).dump(-1, ' ', false, json::error_handler_t::replace);
  return out.size() > 80 ? out.substr(0, 77) + "..." : out;
}

// -------------------------------------------------------------------------------------------------- regexes
// a tokenizers `pattern`: {"String": literal} or {"Regex": onig-style regex}, matched left to right without
// overlap; find_all gives byte ranges of the matches
class Pattern {
 public:
  Pattern() = default;
  Pattern(const json& spec, const std::string& where) {
    if (spec.is_object() && spec.contains("String") && spec["String"].is_string()) {
      literal_ = spec["String"].get<std::string>();
      if (literal_.empty()) fail(where + ": an empty String pattern is not supported");
      return;
    }
    if (spec.is_object() && spec.contains("Regex") && spec["Regex"].is_string()) {
      compile(spec["Regex"].get<std::string>(), where);
      return;
    }
    fail(where + ": pattern must be {\"String\": ...} or {\"Regex\": ...}, got " + escape_for_message(spec.dump()));
  }

  void compile(const std::string& onig, const std::string& where) {
    const std::string icu_src = translate(onig, where);
    UErrorCode st = U_ZERO_ERROR;
    UParseError pe{};
    regex_.reset(icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(icu_src), 0, pe, st));
    if (U_FAILURE(st) || !regex_)
      fail(where + ": the regex " + escape_for_message(onig) + " does not compile in ICU (" + u_errorName(st) +
           " at offset " + std::to_string(pe.offset) + ")");
  }

  std::vector<std::pair<size_t, size_t>> find_all(const std::string& s) const {
    std::vector<std::pair<size_t, size_t>> out;
    if (!regex_) {
      for (size_t at = s.find(literal_); at != std::string::npos; at = s.find(literal_, at + literal_.size()))
        out.emplace_back(at, at + literal_.size());
      return out;
    }
    UErrorCode st = U_ZERO_ERROR;
    UText* ut = utext_openUTF8(nullptr, s.data(), static_cast<int64_t>(s.size()), &st);
    std::unique_ptr<icu::RegexMatcher> m(regex_->matcher(st));
    if (U_FAILURE(st) || !m) {
      utext_close(ut);
      fail(std::string("ICU regex matcher failed: ") + u_errorName(st));
    }
    m->reset(ut);
    while (m->find(st) && U_SUCCESS(st)) {
      const int64_t a = m->start64(st), b = m->end64(st);
      if (b > a) out.emplace_back(static_cast<size_t>(a), static_cast<size_t>(b));
    }
    utext_close(ut);
    if (U_FAILURE(st)) fail(std::string("ICU regex matching failed: ") + u_errorName(st));
    return out;
  }

  // replace every match by `content`
  std::string replace_all(const std::string& s, const std::string& content) const {
    std::string out;
    size_t prev = 0;
    for (const auto& [a, b] : find_all(s)) {
      out.append(s, prev, a - prev);
      out += content;
      prev = b;
    }
    out.append(s, prev, std::string::npos);
    return out;
  }

 private:
  // onig (tokenizers' regex engine) -> ICU: the classes whose Unicode meaning differs
  static std::string translate(const std::string& p, const std::string& where) {
    static const std::string kWord = "\\p{L}\\p{M}\\p{N}\\p{Pc}";
    std::string out;
    int depth = 0;   // inside a bracket class
    for (size_t i = 0; i < p.size(); ++i) {
      const char c = p[i];
      if (c == '\\' && i + 1 < p.size()) {
        const char e = p[i + 1];
        ++i;
        if (e == 's') out += "\\p{White_Space}";
        else if (e == 'S') out += "\\P{White_Space}";
        else if (e == 'w') out += depth ? kWord : "[" + kWord + "]";
        else if (e == 'W' && !depth) out += "[^" + kWord + "]";
        else if (e == 'W' || e == 'h' || e == 'H' || e == 'A' || e == 'z' || e == 'Z' || e == 'G' || e == 'K' ||
                 e == 'R' || e == 'X' || e == 'y' || e == 'Y' || e == 'g' || e == 'k')
          fail(where + ": the regex escape \\" + std::string(1, e) + " (in " + escape_for_message(p) +
               ") is not supported");
        else { out += '\\'; out += e; }
        continue;
      }
      if (c == '[') ++depth;
      else if (c == ']' && depth) --depth;
      out += c;
    }
    return out;
  }

  std::string literal_;
  std::shared_ptr<icu::RegexPattern> regex_;
};

// ------------------------------------------------------------------------------------------------ normalizers
struct Normalizer {
  virtual ~Normalizer() = default;
  virtual void apply(std::string& s) const = 0;
};
using NormalizerPtr = std::unique_ptr<Normalizer>;

struct UnicodeNormalizer : Normalizer {
  const icu::Normalizer2* n;
  explicit UnicodeNormalizer(const icu::Normalizer2* n_) : n(n_) {}
  void apply(std::string& s) const override {
    UErrorCode st = U_ZERO_ERROR;
    const icu::UnicodeString u = icu::UnicodeString::fromUTF8(s);
    if (n->isNormalized(u, st) && U_SUCCESS(st)) return;
    st = U_ZERO_ERROR;
    const icu::UnicodeString r = n->normalize(u, st);
    if (U_FAILURE(st)) fail(std::string("ICU normalization failed: ") + u_errorName(st));
    s.clear();
    r.toUTF8String(s);
  }
};

struct PrependNormalizer : Normalizer {
  std::string prepend;
  void apply(std::string& s) const override {
    if (!s.empty()) s.insert(0, prepend);
  }
};

struct ReplaceNormalizer : Normalizer {
  Pattern pattern;
  std::string content;
  void apply(std::string& s) const override { s = pattern.replace_all(s, content); }
};

struct SequenceNormalizer : Normalizer {
  std::vector<NormalizerPtr> parts;
  void apply(std::string& s) const override {
    for (const auto& p : parts) p->apply(s);
  }
};

std::string type_of(const json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) fail(where + ": an object with a \"type\" expected");
  return j["type"].get<std::string>();
}

template <class T>
T get_or(const json& j, const char* key, T dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  return j[key].get<T>();
}

NormalizerPtr make_normalizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string t = type_of(j, where);
  UErrorCode st = U_ZERO_ERROR;
  if (t == "NFC") return std::make_unique<UnicodeNormalizer>(icu::Normalizer2::getNFCInstance(st));
  if (t == "NFD") return std::make_unique<UnicodeNormalizer>(icu::Normalizer2::getNFDInstance(st));
  if (t == "NFKC") return std::make_unique<UnicodeNormalizer>(icu::Normalizer2::getNFKCInstance(st));
  if (t == "NFKD") return std::make_unique<UnicodeNormalizer>(icu::Normalizer2::getNFKDInstance(st));
  if (t == "Prepend") {
    auto n = std::make_unique<PrependNormalizer>();
    n->prepend = j.at("prepend").get<std::string>();
    return n;
  }
  if (t == "Replace") {
    auto n = std::make_unique<ReplaceNormalizer>();
    n->pattern = Pattern(j.at("pattern"), where + " Replace");
    n->content = j.at("content").get<std::string>();
    return n;
  }
  if (t == "Sequence") {
    auto n = std::make_unique<SequenceNormalizer>();
    for (const auto& p : j.at("normalizers")) {
      auto part = make_normalizer(p, where);
      if (part) n->parts.push_back(std::move(part));
    }
    return n;
  }
  fail(where + ": the normalizer type '" + t + "' is not supported (supported: NFC, NFD, NFKC, NFKD, Prepend, "
       "Replace, Sequence)");
}

// --------------------------------------------------------------------------------------------- pre-tokenizers
struct Piece {
  std::string text;
  bool at_start;   // begins at offset 0 of the original text (Metaspace's prepend_scheme "first")
};

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

Behavior behavior_from(const std::string& b, const std::string& where) {
  if (b == "Removed") return Behavior::Removed;
  if (b == "Isolated") return Behavior::Isolated;
  if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::MergedWithNext;
  if (b == "Contiguous") return Behavior::Contiguous;
  fail(where + ": the split behavior '" + b + "' is not supported");
}

struct Span {
  size_t a, b;
  bool match;
};

// the matches of a piece with the gaps between them, covering the whole piece
std::vector<Span> cover(const std::vector<std::pair<size_t, size_t>>& matches, size_t n) {
  std::vector<Span> out;
  size_t prev = 0;
  for (const auto& [a, b] : matches) {
    if (a > prev) out.push_back({prev, a, false});
    out.push_back({a, b, true});
    prev = b;
  }
  if (prev < n) out.push_back({prev, n, false});
  return out;
}

void split_piece(const Piece& p, std::vector<Span> spans, Behavior behavior, std::vector<Piece>& out) {
  std::vector<Span> kept;   // `match` here: to remove
  switch (behavior) {
    case Behavior::Isolated:
      for (auto s : spans) kept.push_back({s.a, s.b, false});
      break;
    case Behavior::Removed:
      kept = spans;
      break;
    case Behavior::Contiguous: {
      bool prev = false;
      for (auto s : spans) {
        if (s.match == prev && !kept.empty()) kept.back().b = s.b;
        else kept.push_back({s.a, s.b, false});
        prev = s.match;
      }
      break;
    }
    case Behavior::MergedWithPrevious: {
      bool prev = false;
      for (auto s : spans) {
        if (s.match && !prev && !kept.empty()) kept.back().b = s.b;
        else kept.push_back({s.a, s.b, false});
        prev = s.match;
      }
      break;
    }
    case Behavior::MergedWithNext: {
      bool prev = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->match && !prev && !kept.empty()) kept.back().a = it->a;
        else kept.push_back({it->a, it->b, false});
        prev = it->match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
    }
  }
  for (const auto& s : kept)
    if (!s.match && s.b > s.a) out.push_back({p.text.substr(s.a, s.b - s.a), p.at_start && s.a == 0});
}

struct PreTokenizer {
  virtual ~PreTokenizer() = default;
  virtual void apply(std::vector<Piece>& pieces) const = 0;
};
using PreTokenizerPtr = std::unique_ptr<PreTokenizer>;

template <class F>
void each_piece(std::vector<Piece>& pieces, F&& f) {
  std::vector<Piece> out;
  out.reserve(pieces.size());
  for (auto& p : pieces) f(p, out);
  pieces.swap(out);
}

const std::string& byte_char(unsigned char b) {   // GPT-2's bytes_to_unicode
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int extra = 0;
    for (int c = 0; c < 256; ++c) {
      const bool printable = (c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF);
      append_cp(t[c], printable ? c : 256 + extra++);
    }
    return t;
  }();
  return table[b];
}

const std::unordered_map<UChar32, unsigned char>& char_byte() {
  static const std::unordered_map<UChar32, unsigned char> table = [] {
    std::unordered_map<UChar32, unsigned char> t;
    for (int b = 0; b < 256; ++b) {
      size_t i = 0;
      t[next_cp(byte_char(static_cast<unsigned char>(b)), i)] = static_cast<unsigned char>(b);
    }
    return t;
  }();
  return table;
}

struct ByteLevelPre : PreTokenizer {
  bool add_prefix_space = false, use_regex = true;
  Pattern gpt2;
  ByteLevelPre(const json& j, const std::string& where) {
    add_prefix_space = get_or<bool>(j, "add_prefix_space", false);
    use_regex = get_or<bool>(j, "use_regex", true);
    gpt2.compile(R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", where);
  }
  void apply(std::vector<Piece>& pieces) const override {
    each_piece(pieces, [&](Piece& p, std::vector<Piece>& out) {
      if (add_prefix_space && (p.text.empty() || p.text[0] != ' ')) p.text.insert(0, " ");
      std::vector<Piece> parts;
      if (use_regex) split_piece(p, cover(gpt2.find_all(p.text), p.text.size()), Behavior::Isolated, parts);
      else if (!p.text.empty()) parts.push_back(p);
      for (auto& q : parts) {
        std::string mapped;
        mapped.reserve(q.text.size() * 2);
        for (unsigned char b : q.text) mapped += byte_char(b);
        out.push_back({std::move(mapped), q.at_start});
      }
    });
  }
};

struct SplitPre : PreTokenizer {
  Pattern pattern;
  Behavior behavior;
  bool invert;
  void apply(std::vector<Piece>& pieces) const override {
    each_piece(pieces, [&](Piece& p, std::vector<Piece>& out) {
      auto spans = cover(pattern.find_all(p.text), p.text.size());
      if (invert)
        for (auto& s : spans) s.match = !s.match;
      split_piece(p, std::move(spans), behavior, out);
    });
  }
};

struct MetaspacePre : PreTokenizer {
  std::string replacement;
  enum { Always, First, Never } scheme = Always;
  bool split = true;
  void apply(std::vector<Piece>& pieces) const override {
    each_piece(pieces, [&](Piece& p, std::vector<Piece>& out) {
      std::string t;
      for (char c : p.text) {
        if (c == ' ') t += replacement;
        else t += c;
      }
      const bool starts = t.compare(0, replacement.size(), replacement) == 0;
      if (!starts && (scheme == Always || (scheme == First && p.at_start))) t.insert(0, replacement);
      Piece q{std::move(t), p.at_start};
      if (!split) {
        if (!q.text.empty()) out.push_back(std::move(q));
        return;
      }
      std::vector<std::pair<size_t, size_t>> m;
      for (size_t at = q.text.find(replacement); at != std::string::npos; at = q.text.find(replacement, at + 1))
        m.emplace_back(at, at + replacement.size());
      split_piece(q, cover(m, q.text.size()), Behavior::MergedWithNext, out);
    });
  }
};

struct WhitespacePre : PreTokenizer {   // \w+|[^\w\s]+ kept, the rest removed
  Pattern words;
  explicit WhitespacePre(const std::string& where) { words.compile(R"(\w+|[^\w\s]+)", where); }
  void apply(std::vector<Piece>& pieces) const override {
    each_piece(pieces, [&](Piece& p, std::vector<Piece>& out) {
      auto spans = cover(words.find_all(p.text), p.text.size());
      for (auto& s : spans) s.match = !s.match;
      split_piece(p, std::move(spans), Behavior::Removed, out);
    });
  }
};

struct WhitespaceSplitPre : PreTokenizer {   // split on White_Space, which is removed
  void apply(std::vector<Piece>& pieces) const override {
    each_piece(pieces, [&](Piece& p, std::vector<Piece>& out) {
      std::vector<std::pair<size_t, size_t>> m;
      for (size_t i = 0; i < p.text.size();) {
        const size_t a = i;
        if (is_white_space(next_cp(p.text, i))) m.emplace_back(a, i);
      }
      split_piece(p, cover(m, p.text.size()), Behavior::Removed, out);
    });
  }
};

struct SequencePre : PreTokenizer {
  std::vector<PreTokenizerPtr> parts;
  void apply(std::vector<Piece>& pieces) const override {
    for (const auto& p : parts) p->apply(pieces);
  }
};

PreTokenizerPtr make_pre_tokenizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string t = type_of(j, where);
  const std::string w = where + " " + t;
  if (t == "ByteLevel") return std::make_unique<ByteLevelPre>(j, w);
  if (t == "Split") {
    auto p = std::make_unique<SplitPre>();
    p->pattern = Pattern(j.at("pattern"), w);
    p->behavior = behavior_from(j.at("behavior").get<std::string>(), w);
    p->invert = get_or<bool>(j, "invert", false);
    return p;
  }
  if (t == "Metaspace") {
    auto p = std::make_unique<MetaspacePre>();
    p->replacement = j.at("replacement").get<std::string>();
    size_t i = 0;
    if (p->replacement.empty() || !valid_utf8(p->replacement) || (next_cp(p->replacement, i), i) != p->replacement.size())
      fail(w + ": replacement must be one character");
    p->split = get_or<bool>(j, "split", true);
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
      const auto s = j["prepend_scheme"].get<std::string>();
      if (s == "always") p->scheme = MetaspacePre::Always;
      else if (s == "first") p->scheme = MetaspacePre::First;
      else if (s == "never") p->scheme = MetaspacePre::Never;
      else fail(w + ": prepend_scheme '" + s + "' is not supported");
    } else {
      p->scheme = get_or<bool>(j, "add_prefix_space", true) ? MetaspacePre::Always : MetaspacePre::Never;
    }
    return p;
  }
  if (t == "Whitespace") return std::make_unique<WhitespacePre>(w);
  if (t == "WhitespaceSplit") return std::make_unique<WhitespaceSplitPre>();
  if (t == "Sequence") {
    auto p = std::make_unique<SequencePre>();
    for (const auto& q : j.at("pretokenizers")) {
      auto part = make_pre_tokenizer(q, where);
      if (part) p->parts.push_back(std::move(part));
    }
    return p;
  }
  fail(where + ": the pre-tokenizer type '" + t + "' is not supported (supported: ByteLevel, Split, Metaspace, "
       "Whitespace, WhitespaceSplit, Sequence)");
}

// --------------------------------------------------------------------------------------------------- decoders
struct Decoder {
  virtual ~Decoder() = default;
  virtual void chain(std::vector<std::string>& tokens) const = 0;
};
using DecoderPtr = std::unique_ptr<Decoder>;

struct ByteLevelDec : Decoder {
  void chain(std::vector<std::string>& tokens) const override {
    const auto& map = char_byte();
    std::string bytes;
    for (const auto& t : tokens) {
      std::string mine;
      bool all = true;
      for (size_t i = 0; i < t.size();) {
        auto it = map.find(next_cp(t, i));
        if (it == map.end()) {
          all = false;
          break;
        }
        mine += static_cast<char>(it->second);
      }
      bytes += all ? mine : t;
    }
    tokens.assign(1, lossy_utf8(bytes));
  }
};

struct MetaspaceDec : Decoder {
  UChar32 replacement = 0;
  bool prepend = true;   // prepend_scheme != never
  void chain(std::vector<std::string>& tokens) const override {
    for (size_t k = 0; k < tokens.size(); ++k) {
      std::string out;
      const std::string& t = tokens[k];
      for (size_t i = 0; i < t.size();) {
        const size_t a = i;
        if (next_cp(t, i) == replacement) {
          if (!(k == 0 && prepend)) out += ' ';
        } else {
          out.append(t, a, i - a);
        }
      }
      tokens[k] = std::move(out);
    }
  }
};

std::optional<unsigned char> byte_token(const std::string& t) {   // "<0xNN>"
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return std::nullopt;
  const auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const int h = hex(t[3]), l = hex(t[4]);
  if (t[3] == '+' && l >= 0) return static_cast<unsigned char>(l);   // a signed radix-16 parse accepts "+F"
  if (h < 0 || l < 0) return std::nullopt;
  return static_cast<unsigned char>(h * 16 + l);
}

struct ByteFallbackDec : Decoder {
  void chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (valid_utf8(pending)) out.push_back(pending);
      else
        for (size_t i = 0; i < pending.size(); ++i) out.push_back(kReplacementChar);
      pending.clear();
    };
    for (auto& t : tokens) {
      if (auto b = byte_token(t)) {
        pending += static_cast<char>(*b);
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens.swap(out);
  }
};

struct FuseDec : Decoder {
  void chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, all);
  }
};

struct StripDec : Decoder {
  UChar32 content = ' ';
  size_t start = 0, stop = 0;
  void chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      std::vector<std::pair<size_t, UChar32>> cps;   // (byte offset, code point)
      for (size_t i = 0; i < t.size();) {
        const size_t a = i;
        cps.emplace_back(a, next_cp(t, i));
      }
      size_t lo = 0, hi = cps.size();
      while (lo < start && lo < hi && cps[lo].second == content) ++lo;
      size_t cut = 0;
      while (cut < stop && hi > lo && cps[hi - 1].second == content) --hi, ++cut;
      const size_t a = lo < cps.size() ? cps[lo].first : t.size();
      const size_t b = hi < cps.size() ? cps[hi].first : t.size();
      t = t.substr(a, b - a);
    }
  }
};

struct ReplaceDec : Decoder {
  Pattern pattern;
  std::string content;
  void chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) t = pattern.replace_all(t, content);
  }
};

struct SequenceDec : Decoder {
  std::vector<DecoderPtr> parts;
  void chain(std::vector<std::string>& tokens) const override {
    for (const auto& p : parts) p->chain(tokens);
  }
};

UChar32 one_char(const std::string& s, const std::string& where) {
  size_t i = 0;
  if (s.empty() || !valid_utf8(s)) fail(where + ": one character expected, got " + escape_for_message(s));
  const UChar32 c = next_cp(s, i);
  if (i != s.size()) fail(where + ": one character expected, got " + escape_for_message(s));
  return c;
}

DecoderPtr make_decoder(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string t = type_of(j, where);
  const std::string w = where + " " + t;
  if (t == "ByteLevel") return std::make_unique<ByteLevelDec>();
  if (t == "Metaspace") {
    auto d = std::make_unique<MetaspaceDec>();
    d->replacement = one_char(j.at("replacement").get<std::string>(), w);
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null())
      d->prepend = j["prepend_scheme"].get<std::string>() != "never";
    else
      d->prepend = get_or<bool>(j, "add_prefix_space", true);
    return d;
  }
  if (t == "ByteFallback") return std::make_unique<ByteFallbackDec>();
  if (t == "Fuse") return std::make_unique<FuseDec>();
  if (t == "Strip") {
    auto d = std::make_unique<StripDec>();
    d->content = one_char(j.at("content").get<std::string>(), w);
    d->start = j.at("start").get<size_t>();
    d->stop = j.at("stop").get<size_t>();
    return d;
  }
  if (t == "Replace") {
    auto d = std::make_unique<ReplaceDec>();
    d->pattern = Pattern(j.at("pattern"), w);
    d->content = j.at("content").get<std::string>();
    return d;
  }
  if (t == "Sequence") {
    auto d = std::make_unique<SequenceDec>();
    for (const auto& q : j.at("decoders")) {
      auto part = make_decoder(q, where);
      if (part) d->parts.push_back(std::move(part));
    }
    return d;
  }
  fail(where + ": the decoder type '" + t + "' is not supported (supported: ByteLevel, Metaspace, ByteFallback, "
       "Fuse, Strip, Replace, Sequence)");
}

// ------------------------------------------------------------------------------------------------------ models
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

  void tokenize(const std::string& word, std::vector<int64_t>& out) const {
    if (!bpe) {
      auto it = vocab.find(word);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
      if (unk && vocab.count(*unk)) {
        out.push_back(vocab.at(*unk));
        return;
      }
      fail("tokenizer: the word " + escape_for_message(word) + " is not in the WordLevel vocabulary, which has no "
           "unknown token");
    }
    if (ignore_merges) {
      auto it = vocab.find(word);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    struct Sym {
      int64_t id;
      int prev, next;
      bool gone;
    };
    std::vector<Sym> syms;
    int64_t pending_unk = -1;   // an unknown run not yet added
    auto add = [&](int64_t id) {
      const int n = static_cast<int>(syms.size());
      syms.push_back({id, n - 1, n + 1, false});
    };
    for (size_t i = 0; i < word.size();) {
      const size_t a = i;
      next_cp(word, i);
      std::string s = word.substr(a, i - a);
      if (a > 0 && !prefix.empty()) s = prefix + s;
      if (i == word.size() && !suffix.empty()) s += suffix;
      auto it = vocab.find(s);
      if (it != vocab.end()) {
        if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
        add(it->second);
        continue;
      }
      if (byte_fallback) {
        bool all = true;
        for (unsigned char b : s) all = all && byte_ids[b] >= 0;
        if (all) {
          for (unsigned char b : s) add(byte_ids[b]);
          continue;
        }
      }
      if (unk) {
        auto u = vocab.find(*unk);
        if (u == vocab.end()) fail("tokenizer: the unk_token " + escape_for_message(*unk) + " is not in the vocabulary");
        if (pending_unk >= 0 && !fuse_unk) add(pending_unk);
        pending_unk = u->second;
        continue;
      }
      fail("tokenizer: the vocabulary has no token for " + escape_for_message(s) +
           " and the model has no unknown token nor byte fallback for it");
    }
    if (pending_unk >= 0) add(pending_unk);
    if (syms.empty()) return;
    syms.back().next = -1;

    struct Cand {
      uint32_t rank;
      int pos;
      int64_t id;
      bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand> q;
    auto consider = [&](int pos) {
      const int nx = syms[pos].next;
      if (nx < 0) return;
      auto it = merges.find(key(syms[pos].id, syms[nx].id));
      if (it != merges.end()) q.push({it->second.first, pos, it->second.second});
    };
    for (int p = 0; p + 1 < static_cast<int>(syms.size()); ++p) consider(p);
    while (!q.empty()) {
      const Cand c = q.top();
      q.pop();
      Sym& s = syms[c.pos];
      if (s.gone || s.next < 0) continue;
      auto it = merges.find(key(s.id, syms[s.next].id));
      if (it == merges.end() || it->second.second != c.id) continue;
      Sym& r = syms[s.next];
      s.id = c.id;
      r.gone = true;
      s.next = r.next;
      if (s.next >= 0) syms[s.next].prev = c.pos;
      if (s.prev >= 0) consider(s.prev);
      consider(c.pos);
    }
    for (const auto& s : syms)
      if (!s.gone) out.push_back(s.id);
  }
};

Model make_model(const json& j, const std::string& where) {
  const std::string t = type_of(j, where);
  Model m;
  const json& vocab = j.at("vocab");
  if (!vocab.is_object()) fail(where + ": model.vocab must be an object {token: id}");
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > 0x7fffffff) fail(where + ": model.vocab id " + std::to_string(id) + " out of range");
    m.vocab[it.key()] = id;
    m.tokens[id] = it.key();
  }
  if (j.contains("unk_token") && !j["unk_token"].is_null()) m.unk = j["unk_token"].get<std::string>();
  if (t == "WordLevel") {
    m.bpe = false;
    return m;
  }
  if (t != "BPE") fail(where + ": the model type '" + t + "' is not supported (supported: BPE, WordLevel)");
  if (j.contains("dropout") && !j["dropout"].is_null() && j["dropout"].get<double>() != 0.0)
    fail(where + ": BPE dropout is not supported (it makes encoding random)");
  m.fuse_unk = get_or<bool>(j, "fuse_unk", false);
  m.byte_fallback = get_or<bool>(j, "byte_fallback", false);
  m.ignore_merges = get_or<bool>(j, "ignore_merges", false);
  m.prefix = get_or<std::string>(j, "continuing_subword_prefix", "");
  m.suffix = get_or<std::string>(j, "end_of_word_suffix", "");
  m.byte_ids.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = m.vocab.find(name);
    if (it != m.vocab.end()) m.byte_ids[b] = it->second;
  }
  const json& merges = j.contains("merges") ? j["merges"] : json::array();
  uint32_t rank = 0;
  for (const auto& mg : merges) {
    std::string a, b;
    if (mg.is_string()) {
      const auto s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail(where + ": merge " + escape_for_message(s) + " is not two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mg.is_array() && mg.size() == 2) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      fail(where + ": a merge must be \"a b\" or [\"a\", \"b\"]");
    }
    auto ia = m.vocab.find(a), ib = m.vocab.find(b);
    if (ia == m.vocab.end() || ib == m.vocab.end())
      fail(where + ": merge " + escape_for_message(a + " " + b) + " names a token the vocabulary lacks");
    const std::string merged = a + (m.prefix.size() <= b.size() ? b.substr(m.prefix.size()) : std::string());
    auto im = m.vocab.find(merged);
    if (im == m.vocab.end())
      fail(where + ": merge " + escape_for_message(a + " " + b) + " gives " + escape_for_message(merged) +
           ", which the vocabulary lacks");
    m.merges[Model::key(ia->second, ib->second)] = {rank++, im->second};
  }
  return m;
}

// ------------------------------------------------------------------------------------------------ added tokens
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

// leftmost-longest matches of the tokens (indices into `all`) in s, with single_word / lstrip / rstrip applied
// as tokenizers' AddedVocabulary applies them
void split_added(const Segment& seg, const std::vector<AddedToken>& all, const std::vector<size_t>& which,
                 std::vector<Segment>& out) {
  const std::string& s = seg.text;
  size_t start_offset = 0;
  auto emit_text = [&](size_t a, size_t b) {
    if (b > a) out.push_back({s.substr(a, b - a), -1, seg.at_start && a == 0});
  };
  size_t i = 0;
  while (i < s.size() && !which.empty()) {
    const AddedToken* best = nullptr;
    for (size_t k : which) {
      const auto& t = all[k];
      if (t.pattern.size() > (best ? best->pattern.size() : 0) && s.compare(i, t.pattern.size(), t.pattern) == 0)
        best = &t;
    }
    if (!best) {
      ++i;
      continue;
    }
    size_t start = i, stop = i + best->pattern.size();
    i = stop;   // the next search starts after this match, used or not
    if (best->single_word) {
      const bool start_space = start == 0 || !is_word_char(last_cp(s, start));
      size_t k = stop;
      const bool stop_space = stop == s.size() || !is_word_char(next_cp(s, k));
      if (!start_space || !stop_space) continue;
    }
    if (best->lstrip) {
      size_t ns = start;
      while (ns > 0) {
        size_t a = ns - 1;
        while (a > 0 && (static_cast<unsigned char>(s[a]) & 0xC0) == 0x80) --a;
        size_t k = a;
        if (!is_white_space(next_cp(s, k))) break;
        ns = a;
      }
      start = std::max(ns, start_offset);
    }
    if (best->rstrip) {
      size_t k = stop;
      while (k < s.size()) {
        size_t nk = k;
        if (!is_white_space(next_cp(s, nk))) break;
        k = nk;
      }
      stop = k;   // the next search still starts at the end of the match itself
    }
    emit_text(start_offset, start);
    out.push_back({s.substr(start, stop - start), best->id, seg.at_start && start == 0});
    start_offset = stop;
  }
  emit_text(start_offset, s.size());
}

}  // namespace

// ------------------------------------------------------------------------------------------------------ Impl
struct Tokenizer::Impl {
  std::vector<AddedToken> added;
  std::vector<size_t> raw_tokens, normalized_tokens;   // indices into `added`
  std::unordered_map<std::string, int64_t> added_ids;
  std::unordered_map<int64_t, size_t> added_by_id;
  NormalizerPtr normalizer;
  PreTokenizerPtr pre_tokenizer;
  Model model;
  DecoderPtr decoder;
  std::vector<std::vector<int64_t>> post_before, post_after;   // each post-processor's ids around the sequence
  int64_t vocab_size = 0;
  bool byte_fallback_decoder = false;   // the decoder holds a ByteFallback step

  void post_processor(const json& j, const std::string& where) {
    if (j.is_null()) return;
    const std::string t = type_of(j, where);
    if (t == "ByteLevel") return;   // offsets only
    if (t == "Sequence") {
      for (const auto& p : j.at("processors")) post_processor(p, where);
      return;
    }
    std::vector<int64_t> before, after;
    if (t == "TemplateProcessing") {
      const json& specials = j.at("special_tokens");
      bool seen_a = false;
      for (const auto& item : j.at("single")) {
        if (item.contains("Sequence")) {
          const auto id = item["Sequence"].at("id").get<std::string>();
          if (id != "A" || seen_a) fail(where + " TemplateProcessing: the single template must hold $A once");
          seen_a = true;
        } else if (item.contains("SpecialToken")) {
          const auto name = item["SpecialToken"].at("id").get<std::string>();
          if (!specials.contains(name)) fail(where + " TemplateProcessing: special token '" + name + "' undefined");
          for (const auto& id : specials[name].at("ids")) (seen_a ? after : before).push_back(id.get<int64_t>());
        } else {
          fail(where + " TemplateProcessing: unknown template item " + escape_for_message(item.dump()));
        }
      }
      if (!seen_a) fail(where + " TemplateProcessing: the single template has no $A");
    } else if (t == "BertProcessing" || t == "RobertaProcessing") {
      before.push_back(j.at("cls").at(1).get<int64_t>());
      after.push_back(j.at("sep").at(1).get<int64_t>());
    } else {
      fail(where + ": the post-processor type '" + t + "' is not supported (supported: TemplateProcessing, "
           "ByteLevel, BertProcessing, RobertaProcessing, Sequence)");
    }
    post_before.push_back(std::move(before));
    post_after.push_back(std::move(after));
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::filesystem::path& tokenizer_json) {
  std::ifstream f(tokenizer_json, std::ios::binary);
  if (!f) fail("cannot read the tokenizer " + tokenizer_json.string());
  std::stringstream ss;
  ss << f.rdbuf();
  return from_json_text(ss.str(), tokenizer_json.string());
}

Tokenizer Tokenizer::from_json_text(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(where + ": not valid JSON (" + e.what() + ")");
  }
  auto impl = std::make_unique<Impl>();
  try {
    if (!j.is_object()) fail(where + ": a JSON object expected");
    if (j.contains("truncation") && !j["truncation"].is_null())
      fail(where + ": truncation is set; it is not supported (remove it from tokenizer.json)");
    if (j.contains("padding") && !j["padding"].is_null())
      fail(where + ": padding is set; it is not supported (remove it from tokenizer.json)");
    if (!j.contains("model")) fail(where + ": no model");
    impl->normalizer = make_normalizer(j.value("normalizer", json()), where + " normalizer");
    impl->pre_tokenizer = make_pre_tokenizer(j.value("pre_tokenizer", json()), where + " pre_tokenizer");
    impl->model = make_model(j["model"], where + " model");
    impl->decoder = make_decoder(j.value("decoder", json()), where + " decoder");
    impl->byte_fallback_decoder = j.value("decoder", json()).dump().find("\"ByteFallback\"") != std::string::npos;
    impl->post_processor(j.value("post_processor", json()), where + " post_processor");
    for (const auto& a : j.value("added_tokens", json::array())) {
      AddedToken t;
      t.id = a.at("id").get<int64_t>();
      t.content = a.at("content").get<std::string>();
      t.special = get_or<bool>(a, "special", false);
      t.single_word = get_or<bool>(a, "single_word", false);
      t.lstrip = get_or<bool>(a, "lstrip", false);
      t.rstrip = get_or<bool>(a, "rstrip", false);
      t.normalized = get_or<bool>(a, "normalized", !t.special);
      if (t.content.empty()) fail(where + ": an added token with empty content (id " + std::to_string(t.id) + ")");
      if (!valid_utf8(t.content)) fail(where + ": added token " + std::to_string(t.id) + " is not valid UTF-8");
      t.pattern = t.content;
      if (t.normalized && impl->normalizer) impl->normalizer->apply(t.pattern);
      impl->added_ids[t.content] = t.id;
      impl->added_by_id[t.id] = impl->added.size();
      (t.normalized ? impl->normalized_tokens : impl->raw_tokens).push_back(impl->added.size());
      impl->added.push_back(std::move(t));
    }
  } catch (const json::exception& e) {
    fail(where + ": malformed (" + e.what() + ")");
  }
  int64_t top = -1;
  for (const auto& [id, _] : impl->model.tokens) top = std::max(top, id);
  for (const auto& t : impl->added) top = std::max(top, t.id);
  impl->vocab_size = top + 1;
  return Tokenizer(std::move(impl));
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  if (!valid_utf8(text)) fail("tokenizer: the text to encode is not valid UTF-8");
  const Impl& m = *impl_;
  std::vector<Segment> first;
  split_added({text, -1, true}, m.added, m.raw_tokens, first);
  std::vector<Segment> segs;
  for (auto& s : first) {
    if (s.id >= 0) {
      segs.push_back(std::move(s));
      continue;
    }
    if (m.normalizer) m.normalizer->apply(s.text);
    if (s.text.empty()) continue;
    split_added(s, m.added, m.normalized_tokens, segs);
  }
  std::vector<int64_t> ids;
  for (auto& s : segs) {
    if (s.id >= 0) {
      ids.push_back(s.id);
      continue;
    }
    std::vector<Piece> pieces{{std::move(s.text), s.at_start}};
    if (m.pre_tokenizer) m.pre_tokenizer->apply(pieces);
    for (const auto& p : pieces)
      if (!p.text.empty()) m.model.tokenize(p.text, ids);
  }
  if (add_special_tokens) {
    for (size_t k = 0; k < m.post_before.size(); ++k) {
      std::vector<int64_t> out = m.post_before[k];
      out.insert(out.end(), ids.begin(), ids.end());
      out.insert(out.end(), m.post_after[k].begin(), m.post_after[k].end());
      ids.swap(out);
    }
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  const Impl& m = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int64_t id : ids) {
    auto a = m.added_by_id.find(id);
    if (a != m.added_by_id.end()) {
      if (skip_special_tokens && m.added[a->second].special) continue;
      tokens.push_back(m.added[a->second].pattern);   // HF decodes a `normalized` added token in its normalized form
      continue;
    }
    auto t = m.model.tokens.find(id);
    if (t != m.model.tokens.end()) tokens.push_back(t->second);
  }
  if (!m.decoder) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  m.decoder->chain(tokens);
  std::string out;
  for (const auto& t : tokens) out += t;
  return out;
}

std::optional<int64_t> Tokenizer::token_id(const std::string& token) const {
  auto a = impl_->added_ids.find(token);
  if (a != impl_->added_ids.end()) return a->second;
  auto t = impl_->model.vocab.find(token);
  if (t != impl_->model.vocab.end()) return t->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::id_token(int64_t id) const {
  auto a = impl_->added_by_id.find(id);
  if (a != impl_->added_by_id.end()) return impl_->added[a->second].pattern;
  auto t = impl_->model.tokens.find(id);
  if (t != impl_->model.tokens.end()) return t->second;
  return std::nullopt;
}

bool Tokenizer::is_special(int64_t id) const {
  auto a = impl_->added_by_id.find(id);
  return a != impl_->added_by_id.end() && impl_->added[a->second].special;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

bool Tokenizer::is_fallback_byte(int64_t id) const {
  if (!impl_->byte_fallback_decoder || impl_->added_by_id.count(id)) return false;
  auto t = impl_->model.tokens.find(id);
  return t != impl_->model.tokens.end() && byte_token(t->second).has_value();
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_seq(s, i);
    if (!n) return false;
    i += n;
  }
  return true;
}

// --------------------------------------------------------------------------------------------- StreamDecoder
StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tok_(&tokenizer), skip_(skip_special_tokens) {}

std::string StreamDecoder::push(int64_t id) {
  ids_.push_back(id);
  // a ByteFallback decoder turns a whole run of byte tokens into U+FFFD when the run is not valid UTF-8: the run's
  // text is only final once a token that is not a byte token ends it
  if (tok_->is_fallback_byte(id)) return "";
  const std::string text = tok_->decode(ids_, skip_);
  const bool pending = text.size() >= 3 && text.compare(text.size() - 3, 3, kReplacementChar) == 0;
  if (text.size() <= prefix_.size() || pending) return "";
  size_t from = prefix_.size();
  if (text.compare(0, prefix_.size(), prefix_) != 0) {
    // the decoder rewrote text already emitted (ByteFallback turns a whole run of byte tokens into U+FFFD once
    // it is not valid UTF-8): what was emitted stays, the rest starts at the next character boundary
    while (from < text.size() && (static_cast<unsigned char>(text[from]) & 0xC0) == 0x80) ++from;
  }
  std::string fresh = text.substr(from);
  const size_t new_index = ids_.size() - prefix_index_;
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_index_));
  prefix_ = tok_->decode(ids_, skip_);
  prefix_index_ = new_index;
  return fresh;
}

std::string StreamDecoder::finish() {
  const std::string text = tok_->decode(ids_, skip_);
  std::string rest;
  size_t from = prefix_.size();
  while (from < text.size() && (static_cast<unsigned char>(text[from]) & 0xC0) == 0x80) ++from;
  if (from < text.size()) rest = text.substr(from);
  ids_.clear();
  prefix_.clear();
  prefix_index_ = 0;
  return rest;
}

}  // namespace fastv
