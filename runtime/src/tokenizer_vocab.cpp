// Vocabulary side of fastv::Tokenizer (see tokenizer_parts.hpp): the decoders, the BPE and WordLevel models
// (BPE merges by rank with a priority queue, byte fallback, unknown tokens) and the added tokens' splitting.
#include <algorithm>
#include <cstdio>
#include <queue>

#include "tokenizer_parts.hpp"

namespace fastv::tokenizer_parts {

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

namespace {

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
}  // namespace

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
void Model::tokenize(const std::string& word, std::vector<int64_t>& out) const {
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

}  // namespace fastv::tokenizer_parts
