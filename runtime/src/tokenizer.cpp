// fastv::Tokenizer over tokenizer.json (see fastv/tokenizer.hpp). The encoding pipeline is the one the HF
// `tokenizers` library documents: added tokens split out of the raw text (those not `normalized`), the normalizer
// on each remaining piece, the `normalized` added tokens split out of the normalized pieces, the pre-tokenizer,
// the model on each pre-token, the post-processor. The parts are in tokenizer_parts.hpp (tokenizer_text.cpp,
// tokenizer_vocab.cpp).
#include "fastv/tokenizer.hpp"

#include <fstream>
#include <sstream>

#include "tokenizer_parts.hpp"

namespace fastv {

using namespace tokenizer_parts;

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
