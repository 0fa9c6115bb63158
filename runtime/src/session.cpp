// The Session: `fastv-export run` (fastv_export/commands/run.py) in C++ over a bundle loaded once.
#include "fastv/session.hpp"

#include "fastv/tokenizer.hpp"

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>

namespace fastv {

namespace {

template <class T, class F>
std::optional<T> pick(const std::optional<T>& cli, const std::vector<Request>& batch, F get, const std::string& name) {
  if (cli) return cli;
  std::vector<T> given;
  for (const auto& r : batch)
    if (auto v = get(r); v && std::find(given.begin(), given.end(), *v) == given.end()) given.push_back(*v);
  if (given.size() > 1) {
    std::sort(given.begin(), given.end());
    std::ostringstream s;
    for (size_t i = 0; i < given.size(); ++i) s << (i ? ", " : "") << given[i];
    std::string flag = name;
    std::replace(flag.begin(), flag.end(), '_', '-');
    throw Error("the requests of this batch ask for different " + name + " ([" + s.str() +
                "]); one batch samples with one setting: give --" + flag + " or run them separately");
  }
  if (given.empty()) return std::nullopt;
  return given[0];
}

// how many bytes at the end of ``s`` start an incomplete... (a cut must not split a UTF-8 character)
size_t utf8_floor(const std::string& s, size_t n) {
  while (n > 0 && n < s.size() && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return n;
}

// one row's stop strings (fastv_export/frontend/stream.py StopStrings)
struct Stops {
  std::vector<std::string> stops;
  size_t holdback = 0;
  explicit Stops(const std::vector<std::string>& s) {
    for (const auto& x : s)
      if (!x.empty()) stops.push_back(x);
    for (const auto& x : stops) holdback = std::max(holdback, x.size() - 1);
  }
  std::optional<size_t> cut(const std::string& text) const {
    std::optional<size_t> at;
    for (const auto& s : stops) {
      const size_t i = text.find(s);
      if (i != std::string::npos && (!at || i < *at)) at = i;
    }
    return at;
  }
  // the part of ``text`` that may be shown: up to the first stop string, else all when finished, else all but the
  // held-back end (bytes, never splitting a character)
  size_t visible(const std::string& text, bool finished) const {
    if (auto at = cut(text)) return *at;
    if (finished || !holdback) return text.size();
    return utf8_floor(text, text.size() > holdback ? text.size() - holdback : 0);
  }
};

}  // namespace

int64_t pick_max_new_tokens(const std::vector<Request>& batch, const Overrides& o) {
  const auto n = pick<int64_t>(o.max_new_tokens, batch, [](const Request& r) { return r.max_tokens; }, "max_tokens");
  const int64_t v = n.value_or(kDefaultNewTokens);
  if (v < 1) throw Error("--max-new-tokens must be >= 1");
  if (v > 1000000) throw Error("--max-new-tokens must be at most 1000000");
  return v;
}

SamplingParams pick_sampling(const std::vector<Request>& batch, const Overrides& o) {
  SamplingParams p;
  p.temperature = pick<double>(o.temperature, batch, [](const Request& r) { return r.temperature; }, "temperature")
                      .value_or(0.0);
  p.top_k = pick<int64_t>(o.top_k, batch, [](const Request& r) { return r.top_k; }, "top_k").value_or(0);
  p.top_p = pick<double>(o.top_p, batch, [](const Request& r) { return r.top_p; }, "top_p").value_or(1.0);
  p.seed = pick<uint64_t>(o.seed, batch, [](const Request& r) { return r.seed; }, "seed").value_or(0);
  if (!(p.temperature >= 0) || p.top_k < 0 || !(p.top_p > 0 && p.top_p <= 1))
    throw Error("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]");
  p.check();
  return p;
}

Inputs batch_inputs(const Bundle& bundle, const std::vector<Prompt>& prompts, int64_t pad) {
  if (prompts.empty()) throw Error("no request to prepare");
  size_t n = 0;
  std::vector<int64_t> counts;
  for (const auto& p : prompts) {
    n = std::max(n, p.ids.size());
    counts.push_back(p.media_tokens);
  }
  if (std::set<int64_t>(counts.begin(), counts.end()).size() > 1) {
    std::string c;
    for (auto x : counts) c += (c.empty() ? "" : ", ") + std::to_string(x);
    throw Error("the requests of this batch hold different numbers of image tokens ([" + c + "]); FastV needs the "
                "same count in every row: batch requests with the same media sizes, or run them one at a time");
  }
  const int64_t rows = static_cast<int64_t>(prompts.size()), len = static_cast<int64_t>(n);
  std::vector<int64_t> ids(static_cast<size_t>(rows * len), pad), mask(static_cast<size_t>(rows * len), 0);
  Inputs in;
  for (int64_t r = 0; r < rows; ++r) {
    const auto& p = prompts[r].ids;
    const int64_t off = len - static_cast<int64_t>(p.size());
    for (size_t i = 0; i < p.size(); ++i) {
      ids[r * len + off + i] = p[i];
      mask[r * len + off + i] = 1;
    }
    for (const auto& t : prompts[r].pixels) in.images.push_back(t);
    for (float s : prompts[r].video_seconds) in.video_seconds.push_back(s);
  }
  if (bundle.vision_layout == "patch_grid") {   // each image's own patch grid: vision feeds and positions
    in.row_grids.resize(prompts.size());
    for (size_t r = 0; r < prompts.size(); ++r)
      for (const auto& g : prompts[r].grids) in.row_grids[r].push_back({g.at(0), g.at(1), g.at(2)});
  }
  in.input_ids = Tensor::from_i64({rows, len}, ids);
  in.attention_mask = Tensor::from_i64({rows, len}, mask);
  return in;
}

Session::Session(const std::filesystem::path& bundle_dir, const std::string& executor)
    : bundle_(load_bundle(bundle_dir)) {
  frontend_ = std::make_unique<Frontend>(Frontend::load(bundle_));
  std::string kind = executor.empty() ? (tensorrt_available() && bundle_.has_engines() ? "trt" : "cpu") : executor;
  if (kind != "trt" && kind != "cpu") throw Error("executor must be trt or cpu, got '" + kind + "'");
  if (kind == "trt") check_tensorrt_bundle(bundle_);
  executor_ = kind == "trt" ? make_tensorrt_executor(bundle_) : make_cpu_executor(bundle_);
  executor_name_ = executor_->name();
}

Session::~Session() = default;

Result Session::generate(const std::vector<Request>& batch, const Overrides& o, const OnToken& on_token) {
  if (batch.empty()) throw Error("no request to answer");
  const int64_t max_new = pick_max_new_tokens(batch, o);
  const SamplingParams params = pick_sampling(batch, o);
  std::vector<Prompt> prompts;
  for (size_t i = 0; i < batch.size(); ++i)
    prompts.push_back(frontend_->prepare(batch[i], o.raw, batch.size() > 1 ? "request " + std::to_string(i) + ": " : ""));
  const Inputs in = batch_inputs(bundle_, prompts, frontend_->pad_token_id());
  if (executor_name_ != "cpu" && bundle_.has_engines()) {   // the engines' limits (fastv-export build)
    const auto& eng = bundle_.manifest["engines"];
    const int64_t most = eng.contains("lengths") ? eng["lengths"].value("prompt", int64_t{0}) : 0;
    if (most > 0 && in.input_ids.shape[1] > most)
      throw Error("the prompt takes " + std::to_string(in.input_ids.shape[1]) + " tokens; this bundle's engines take "
                  "at most " + std::to_string(most) + " (--max-prompt of `fastv-export build`): shorten the prompt, "
                  "use smaller images, or rebuild with a larger --max-prompt");
  }
  const size_t rows = batch.size();
  const std::vector<int64_t>& eos_ids = frontend_->eos_token_ids();
  const std::set<int64_t> eos(eos_ids.begin(), eos_ids.end());
  std::vector<Stops> stops;
  for (const auto& r : batch) stops.emplace_back(o.stop ? *o.stop : r.stop);
  std::vector<StreamDecoder> decoders;
  for (size_t r = 0; r < rows; ++r) decoders.emplace_back(frontend_->tokenizer(), true);   // special tokens skipped, as Python decodes
  std::vector<std::string> text(rows);
  std::vector<size_t> shown(rows, 0);
  std::vector<bool> done(rows, false);
  std::vector<int64_t> length(rows, 0);
  Result res;
  res.rows.resize(rows);
  for (auto& a : res.rows) a.finish_reason = "length";

  Sampler sampler(params, static_cast<int64_t>(rows));
  GenerateOptions opts;
  if (!params.greedy())
    opts.choose = [&](const float* logits, int64_t n, int64_t vocab) { return sampler(logits, n, vocab); };
  if (!eos_ids.empty()) opts.eos_token_id = eos_ids[0];
  opts.on_token = [&](int step, const std::vector<int64_t>& tokens) {
    std::vector<std::string> fresh(rows);
    for (size_t r = 0; r < rows; ++r) {
      if (done[r]) continue;
      length[r] = step + 1;
      if (eos.count(tokens[r])) {
        done[r] = true;
        res.rows[r].finish_reason = "stop";
      } else {
        text[r] += decoders[r].push(tokens[r]);
        if (stops[r].cut(text[r])) {
          done[r] = true;
          res.rows[r].finish_reason = "stop";
        }
      }
      const size_t vis = stops[r].visible(text[r], done[r]);
      if (vis > shown[r]) {
        fresh[r] = text[r].substr(shown[r], vis - shown[r]);
        shown[r] = vis;
      }
    }
    const bool user_stop = on_token && on_token(step, tokens, fresh);
    return user_stop || std::all_of(done.begin(), done.end(), [](bool d) { return d; });
  };
  const Generation g = fastv::generate(bundle_, *executor_, in, static_cast<int>(max_new), opts);
  const int64_t kept = g.kept.shape[1];
  for (size_t r = 0; r < rows; ++r) {
    Answer& a = res.rows[r];
    const std::string all = text[r] + decoders[r].finish();
    a.text = all.substr(0, stops[r].visible(all, true));
    const size_t n = length[r] ? static_cast<size_t>(length[r]) : g.tokens[r].size();
    a.tokens.assign(g.tokens[r].begin(), g.tokens[r].begin() + static_cast<std::ptrdiff_t>(std::min(n, g.tokens[r].size())));
    a.prompt_tokens = static_cast<int64_t>(prompts[r].ids.size());
    a.kept_positions.assign(g.kept.as<int64_t>() + r * kept, g.kept.as<int64_t>() + (r + 1) * kept);
  }
  for (const auto& [k, v] : g.timings_ms) res.timings_ms[k] = std::round(v * 1e3) / 1e3;
  return res;
}

}  // namespace fastv
