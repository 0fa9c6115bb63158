// Unit tests of fastv-run's request path (no bundle): the SplitMix64 sampler of docs/design.md §8 (its check values,
// hand-computed draws, and the draws Python's sampler made for the same logits and seeds), requests in the OpenAI
// format and their one-line errors, and the pre-rendered chat template.
//
// usage: fastv_request_tests [unit | draws FILE]
//   draws FILE: {"cases": [{"logits": [[... (null: -inf)]], "temperature", "top_k", "top_p", "seed", "steps",
//                           "tokens": [[row tokens per step]]}]} written by tests/test_cpp_request.py
#include "fastv/request.hpp"
#include "fastv/sampler.hpp"
#include "fastv/session.hpp"

#include <cmath>
#include <fstream>
#include <functional>
#include <iostream>

#include "check.hpp"

namespace {

using nlohmann::json;

using fastv_test::check;
using fastv_test::failed;
using fastv_test::passed;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const fastv::Error& e) {
    return e.what();
  }
  return "<no error>";
}

void expect_error(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  const std::string e = error_of(f);
  const bool ok = e.find(needle) != std::string::npos && e.find('\n') == std::string::npos;
  check(ok, what + ": expected one line with '" + needle + "', got '" + e + "'");
}

void sampler_checks() {
  fastv::SplitMix64 g(1234567);
  const uint64_t want[] = {6457827717110365317ull, 3203168211198807973ull, 9817491932198370423ull,
                           4593380528125082431ull, 16408922859458223821ull};
  bool same = true;
  for (uint64_t w : want) same = same && g.next() == w;
  check(same, "SplitMix64(1234567): the check values of docs/design.md §8");
  fastv::SplitMix64 z(0);
  check(z.next() == 0xE220A8397B1DCDAFull && z.next() == 0x6E789E6AA1B965F4ull, "SplitMix64(0): check values");
  fastv::SplitMix64 u(7);
  const uint64_t first = fastv::SplitMix64(7).next();
  check(u.uniform() == static_cast<double>(first >> 11) / 9007199254740992.0, "uniform(): (next() >> 11) * 2^-53");

  // greedy: the lowest id among equal maxima, nothing drawn
  const float tie[] = {0.f, 3.f, 1.f, 3.f};
  fastv::Sampler greedy({}, 1);
  check(greedy(tie, 1, 4) == std::vector<int64_t>{1}, "greedy: lowest id among equal maxima");

  // logits (0, ln 3): p = (0.25, 0.75) in the order id 1, id 0: u < 0.75 -> 1, else 0
  const float two[] = {0.f, static_cast<float>(std::log(3.0))};
  fastv::SamplingParams p;
  p.temperature = 1.0;
  check(fastv::sample_row(two, 2, p, 0.7) == 1 && fastv::sample_row(two, 2, p, 0.8) == 0,
        "sample_row: cumulative q in z-descending order");
  p.top_p = 0.5;
  check(fastv::sample_row(two, 2, p, 0.99) == 1, "top_p 0.5 keeps the likeliest id only");
  p.top_p = 1.0;
  p.top_k = 1;
  check(fastv::sample_row(two, 2, p, 0.99) == 1, "top_k 1 keeps the likeliest id only");
  p.top_k = 0;
  const float ninf[] = {-INFINITY, 0.f, -INFINITY};
  check(fastv::sample_row(ninf, 3, p, 0.999999) == 1, "-inf logits are never drawn");
  const float eq[] = {1.f, 1.f, 1.f, 1.f};
  p.top_k = 2;
  check(fastv::sample_row(eq, 4, p, 0.6) == 1 && fastv::sample_row(eq, 4, p, 0.4) == 0,
        "top_k among equal logits keeps the lowest ids");
  p.top_k = 0;

  const float bad[] = {0.f, NAN};
  fastv::Sampler s(p, 1);
  expect_error([&] { s(bad, 1, 2); }, "hold NaN or +inf", "NaN logits");
  const float allinf[] = {-INFINITY, -INFINITY};
  expect_error([&] { s(allinf, 1, 2); }, "a row is all -inf", "a row of -inf");
  fastv::SamplingParams tiny = p;
  tiny.temperature = 1e-320;
  const float big[] = {10.f, 1.f};
  expect_error([&] { fastv::sample_row(big, 2, tiny, 0.5); }, "is too small for logits up to 10", "overflow");
  fastv::SamplingParams neg;
  neg.temperature = -1;
  expect_error([&] { neg.check(); }, "temperature must be >= 0", "negative temperature");
  fastv::SamplingParams top;
  top.top_p = 0;
  expect_error([&] { top.check(); }, "top_p must be in (0, 1]", "top_p 0");
}

void request_checks() {
  auto parse = [](const std::string& text) { return fastv::parse_requests(json::parse(text), "/base"); };
  const auto r = parse(R"({"messages": [{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "image_url",
       "image_url": {"url": "file:///abs/dog%20x.jpg"}}, {"type": "text", "text": "What?"}]}],
      "max_tokens": 8, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "seed": 18446744073709551615,
      "stop": "\n", "model": "ignored"})")[0];
  check(r.messages.size() == 2 && r.messages[1].parts.size() == 3, "request: messages and parts");
  check(r.messages[1].parts[0].value == "/base/cat.png", "request: a relative path is taken from the file's folder");
  check(r.messages[1].parts[1].kind == "image" && r.messages[1].parts[1].value == "/abs/dog x.jpg",
        "request: image_url file:// URL, percent-decoded");
  check(r.max_tokens == 8 && r.temperature == 0.5 && r.top_k == 3 && r.top_p == 0.9 &&
            r.seed == 18446744073709551615ull && r.stop == std::vector<std::string>{"\n"},
        "request: sampling fields");
  check(parse(R"([{"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 4}])")[0].max_tokens == 4,
        "request: max_completion_tokens");

  expect_error([&] { parse("[]"); }, "the request list is empty", "empty list");
  expect_error([&] { parse("3"); }, "request 0: expected a JSON object with 'messages', got a number", "not an object");
  expect_error([&] { parse("{}"); }, "request 0: missing field 'messages'", "no messages");
  expect_error([&] { parse(R"({"messages": []})"); }, "'messages' must be a non-empty list, got a list", "no message");
  expect_error([&] { parse(R"({"messages": [{"role": "bot", "content": "x"}]})"); },
               "request 0: messages[0]: unknown role 'bot'; use one of system, user, assistant", "unknown role");
  expect_error([&] { parse(R"({"messages": [{"content": "x"}]})"); }, "messages[0]: missing field 'role'", "no role");
  expect_error([&] { parse(R"({"messages": [{"role": "user"}]})"); }, "messages[0]: missing field 'content'",
               "no content");
  expect_error([&] { parse(R"({"messages": [{"role": "user", "content": 3}]})"); },
               "messages[0].content: expected a string or a list of parts, got a number", "content type");
  expect_error([&] { parse(R"({"messages": [{"role": "user", "content": [{"type": "audio"}]}]})"); },
               "messages[0].content[0]: unknown content type 'audio'", "unknown part type");
  expect_error([&] { parse(R"({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]})"); },
               "messages[0].content[0].text: expected a string, got a number", "text not a string");
  expect_error([&] { parse(R"({"messages": [{"role": "user", "content": [{"type": "image"}]}]})"); },
               "messages[0].content[0]: missing field 'image'", "image without a path");
  expect_error([&] { parse(R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})"); },
               "missing field 'image_url.url'", "image_url without url");
  expect_error([&] { parse(R"({"messages": [{"role": "user", "content": [{"type": "image", "image": "http://x/a.png"}]}]})"); },
               "is not a local file; give a path or a file:// URL (nothing is downloaded)", "http URL");
  const std::string msg = R"({"messages": [{"role": "user", "content": "x"}], )";
  expect_error([&] { parse(msg + R"("max_tokens": 0})"); }, "request 0.max_tokens: 0 is out of range [1, 2147483647]",
               "max_tokens 0");
  expect_error([&] { parse(msg + R"("max_tokens": 1.5})"); }, "request 0.max_tokens: expected an integer, got a number",
               "max_tokens 1.5");
  expect_error([&] { parse(msg + R"("temperature": -1})"); }, "request 0.temperature: -1.0 is out of range [0.0, inf)",
               "temperature -1");
  expect_error([&] { parse(msg + R"("top_p": 0})"); }, "request 0.top_p: 0.0 is out of range (0.0, 1.0]", "top_p 0");
  expect_error([&] { parse(msg + R"("top_k": true})"); }, "request 0.top_k: expected an integer, got a boolean",
               "top_k bool");
  expect_error([&] { parse(msg + R"("seed": -3})"); }, "request 0.seed: -3 is out of range [0, inf)", "seed -3");
  expect_error([&] { parse(msg + R"("stop": [""]})"); }, "request 0.stop: expected a non-empty string or a list of them",
               "empty stop");
  expect_error([] { fastv::load_requests("/no/such/req.json"); }, "request file /no/such/req.json does not exist",
               "missing file");

  // a batch that disagrees on a setting, the command line's value wins
  const auto batch = parse(R"([{"messages": [{"role": "user", "content": "a"}], "temperature": 0.5},
                               {"messages": [{"role": "user", "content": "b"}], "temperature": 0.7}])");
  expect_error([&] { fastv::pick_sampling(batch, {}); }, "ask for different temperature ([0.5, 0.7])", "batch settings");
  fastv::Overrides o;
  o.temperature = 0.0;
  check(fastv::pick_sampling(batch, o).greedy(), "--temperature overrides the requests'");
  check(fastv::pick_max_new_tokens(batch, {}) == fastv::kDefaultNewTokens, "default max new tokens");
}

void chat_checks() {
  // docs/manifest.md's example: llava-hf's LLaVA-1.5 template
  const json llava = {{"start", ""}, {"bos_in_template", false}, {"default_system", nullptr}, {"system", nullptr},
                      {"user", {{"prefix", "USER: "}, {"suffix", ""}}},
                      {"assistant", {{"prefix", "ASSISTANT: "}, {"suffix", ""}}},
                      {"text_prefix", ""}, {"text_suffix", " "}, {"image", "<image>\n"}, {"video", nullptr},
                      {"media_first", true}, {"generation_prompt", "ASSISTANT:"}};
  const fastv::ChatForm f = fastv::ChatForm::from_json(llava, "chat");
  const std::vector<fastv::Message> m{{"user", {{"text", "What is it?"}, {"image", "a.png"}}}};
  check(f.render(m, true) == "USER: <image>\nWhat is it? ASSISTANT:", "LLaVA-1.5 form: media first, generation prompt");
  expect_error([&] { f.render({{"system", {{"text", "x"}}}, {"user", {{"text", "y"}}}}, true); },
               "takes no system message", "a template without system messages");
  expect_error([&] { f.render({{"user", {{"video", "v"}}}}, true); }, "writes no video parts", "no video text");
  // ChatML with a default system message; a final assistant message is continued
  json chatml = llava;
  chatml["start"] = "";
  chatml["default_system"] = "You are a helpful assistant.";
  chatml["system"] = {{"prefix", "<|im_start|>system\n"}, {"suffix", "<|im_end|>\n"}};
  chatml["user"] = {{"prefix", "<|im_start|>user\n"}, {"suffix", "<|im_end|>\n"}};
  chatml["assistant"] = {{"prefix", "<|im_start|>assistant\n"}, {"suffix", "<|im_end|>\n"}};
  chatml["text_suffix"] = "";
  chatml["image"] = "<|vision_start|><|image_pad|><|vision_end|>";
  chatml["media_first"] = false;
  chatml["generation_prompt"] = "<|im_start|>assistant\n";
  const fastv::ChatForm c = fastv::ChatForm::from_json(chatml, "chat");
  check(c.render({{"user", {{"text", "Hi"}, {"image", "a"}}}}, true) ==
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|vision_start|>"
            "<|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n",
        "ChatML form: default system, parts in order");
  check(c.render({{"user", {{"text", "Hi"}}}, {"assistant", {{"text", "The"}}}}, false) ==
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nThe",
        "a final assistant message is continued");
  json broken = llava;
  broken.erase("image");
  expect_error([&] { fastv::ChatForm::from_json(broken, "m.json field 'serving.chat'"); }, "field 'image' is missing",
               "a chat form without its image text");
}

int draws(const std::string& path) {
  std::ifstream f(path);
  const json j = json::parse(f);
  for (const auto& c : j["cases"]) {
    fastv::SamplingParams p;
    p.temperature = c["temperature"].get<double>();
    p.top_k = c["top_k"].get<int64_t>();
    p.top_p = c["top_p"].get<double>();
    p.seed = c["seed"].get<uint64_t>();
    std::vector<std::vector<float>> logits;   // null: -inf
    for (const auto& row : c["logits"]) {
      logits.emplace_back();
      for (const auto& x : row) logits.back().push_back(x.is_null() ? -INFINITY : x.get<float>());
    }
    const int64_t rows = static_cast<int64_t>(logits.size()), vocab = static_cast<int64_t>(logits[0].size());
    std::vector<float> flat;
    for (const auto& row : logits) flat.insert(flat.end(), row.begin(), row.end());
    fastv::Sampler s(p, rows);
    std::vector<std::vector<int64_t>> got;
    for (int step = 0; step < c["steps"].get<int>(); ++step) got.push_back(s(flat.data(), rows, vocab));
    check(got == c["tokens"].get<std::vector<std::vector<int64_t>>>(), "Python's draws: case " + c["name"].dump());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "unit";
  try {
    if (mode == "draws" && argc > 2) {
      draws(argv[2]);
    } else if (mode == "unit") {
      sampler_checks();
      request_checks();
      chat_checks();
    } else {
      std::cerr << "usage: fastv_request_tests [unit | draws FILE]\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::cerr << "FAILED: " << e.what() << "\n";
    ++failed;
  }
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
