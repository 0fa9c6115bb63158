// Text side of fastv::Tokenizer (see tokenizer_parts.hpp): UTF-8 helpers, tokenizers' regex patterns over ICU
// (icu::RegexMatcher on UTF-8 UText, so match offsets are byte offsets; the onig-style classes \s \S \w \W are
// rewritten to the Unicode properties tokenizers' regex engine gives them: White_Space; Letter | Mark | Number |
// Connector_Punctuation), the normalizers and the pre-tokenizers.
#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utext.h>

#include <algorithm>

#include "tokenizer_parts.hpp"

namespace fastv::tokenizer_parts {

void fail(const std::string& msg) { throw Error(msg); }

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
Pattern::Pattern(const json& spec, const std::string& where) {
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

void Pattern::compile(const std::string& onig, const std::string& where) {
  const std::string icu_src = translate(onig, where);
  UErrorCode st = U_ZERO_ERROR;
  UParseError pe{};
  regex_.reset(icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(icu_src), 0, pe, st));
  if (U_FAILURE(st) || !regex_)
    fail(where + ": the regex " + escape_for_message(onig) + " does not compile in ICU (" + u_errorName(st) +
         " at offset " + std::to_string(pe.offset) + ")");
}

std::vector<std::pair<size_t, size_t>> Pattern::find_all(const std::string& s) const {
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

std::string Pattern::replace_all(const std::string& s, const std::string& content) const {
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

// onig (tokenizers' regex engine) -> ICU: the classes whose Unicode meaning differs
std::string Pattern::translate(const std::string& p, const std::string& where) {
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

namespace {

// ------------------------------------------------------------------------------------------------ normalizers

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
}  // namespace

std::string type_of(const json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) fail(where + ": an object with a \"type\" expected");
  return j["type"].get<std::string>();
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

namespace {

// --------------------------------------------------------------------------------------------- pre-tokenizers
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

template <class F>
void each_piece(std::vector<Piece>& pieces, F&& f) {
  std::vector<Piece> out;
  out.reserve(pieces.size());
  for (auto& p : pieces) f(p, out);
  pieces.swap(out);
}
}  // namespace

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

namespace {

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
}  // namespace

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

}  // namespace fastv::tokenizer_parts
