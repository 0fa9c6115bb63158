// A Session: a bundle, its request path (tokenizer, image processor, chat template) and its executor loaded once,
// serving requests one after another (the engines are deserialized once). generate() is
// `fastv-export run` in C++: settings picked as it picks them, greedy or the seeded sampler of docs/design.md §8,
// stop strings, the EOS ids of the manifest's serving.generation, text decoded as it comes.
#pragma once

#include "fastv/request.hpp"
#include "fastv/runtime.hpp"
#include "fastv/sampler.hpp"

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace fastv {

/// What the command line sets; unset fields come from the requests (the same in every request of a batch), else
/// the defaults (32 tokens, greedy, top_k 0, top_p 1, seed 0).
struct Overrides {
  std::optional<int64_t> max_new_tokens;
  std::optional<double> temperature;
  std::optional<int64_t> top_k;
  std::optional<double> top_p;
  std::optional<uint64_t> seed;
  std::optional<std::vector<std::string>> stop;
  bool raw = false;   // the text as written, without the chat template
};

inline constexpr int64_t kDefaultNewTokens = 32;

/// One row's answer (the fields of `fastv-export run --json`).
struct Answer {
  std::vector<int64_t> tokens;   // the generated ids up to and with the one that ended the row
  std::string text;              // decoded (special tokens skipped), cut before the first stop string
  std::string finish_reason;     // "stop" (EOS or a stop string) or "length"
  int64_t prompt_tokens = 0;
  std::vector<int64_t> kept_positions;
};

struct Result {
  std::vector<Answer> rows;
  std::map<std::string, double> timings_ms;
};

/// Per chosen token: the step, the [rows] tokens (pads included) and each row's newly visible text (only complete
/// UTF-8 characters, held back while a stop string may be forming). Returning true stops the generation.
using OnToken = std::function<bool(int step, const std::vector<int64_t>& tokens, const std::vector<std::string>& text)>;

class Session {
 public:
  /// Loads and verifies the bundle, its request path and the executor ("trt", "cpu", or "" for trt when this build
  /// has TensorRT and the bundle has engines, else cpu).
  Session(const std::filesystem::path& bundle_dir, const std::string& executor = "");
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const Bundle& bundle() const { return bundle_; }
  const Frontend& frontend() const { return *frontend_; }
  const std::string& executor_name() const { return executor_name_; }

  /// Answers a batch of requests (one row each, left-padded) under ``overrides``.
  Result generate(const std::vector<Request>& batch, const Overrides& overrides = {}, const OnToken& on_token = {});
  Result generate(const Request& request, const Overrides& overrides = {}, const OnToken& on_token = {}) {
    return generate(std::vector<Request>{request}, overrides, on_token);
  }

 private:
  Bundle bundle_;
  std::unique_ptr<Frontend> frontend_;
  std::unique_ptr<Executor> executor_;
  std::string executor_name_;
};

/// The settings ``overrides`` and ``batch`` give (Error when the requests of a batch disagree).
int64_t pick_max_new_tokens(const std::vector<Request>& batch, const Overrides& overrides);
SamplingParams pick_sampling(const std::vector<Request>& batch, const Overrides& overrides);

/// The inputs of a batch of prompts: ids left-padded with ``pad``, the mask, every row's pixels in order and,
/// for a patch_grid bundle, every row's media grids.
Inputs batch_inputs(const Bundle& bundle, const std::vector<Prompt>& prompts, int64_t pad);

}  // namespace fastv
