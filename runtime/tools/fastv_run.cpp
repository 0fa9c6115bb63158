// fastv-run: answer a request with a fastv-export bundle (runtime/README.md): the request path in C++ (chat template,
// image preprocessing, tokenizer, sampling, streaming), or inputs written by `fastv-export run ... --dump-inputs`;
// --check verifies a bundle (and inputs) and runs nothing.
#include "fastv/request.hpp"
#include "fastv/runtime.hpp"
#include "fastv/sampler.hpp"
#include "fastv/session.hpp"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* kUsage =
    "usage: fastv-run --bundle DIR (--request JSON | --prompt TEXT [--image PATH]... [--video DIR]... [--system TEXT]\n"
    "                 [--raw] | --inputs DIR) [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]\n"
    "                 [--seed S] [--stop TEXT]... [--stream] [--json] [--dry-run] [--each] [--executor trt|cpu]\n"
    "       fastv-run --bundle DIR --check [--inputs DIR]\n"
    "  --bundle DIR          a bundle written by `fastv-export export` (engines: `fastv-export build`)\n"
    "  --request JSON        a request (or a list: one batch) in the OpenAI chat format, as `fastv-export run` takes\n"
    "  --prompt TEXT         the user's text (a typed \\n is a line break); with --image PATH (repeatable, PNG or\n"
    "                        JPEG), --video DIR (repeatable: a folder of frames; Qwen2-VL / Qwen2.5-VL bundles) and\n"
    "                        --system TEXT: one user turn, the images, then the videos, then the text\n"
    "  --raw                 send --prompt as written, without the chat template (the model's own placeholders)\n"
    "  --inputs DIR          inputs.json + .bin files written by `fastv-export run ... --dump-inputs DIR`\n"
    "  --max-new-tokens N    tokens to generate at most (default: the request's max_tokens, else 32)\n"
    "  --temperature T       0 (default): greedy; else seeded sampling (docs/design.md §8) with --top-k K (0: all),\n"
    "                        --top-p P (1: off) and --seed S (default 0): the same draws as `fastv-export run`\n"
    "  --stop TEXT           stop a row when its text contains TEXT, cut there (repeatable)\n"
    "  --stream              print the text as it is generated (one request)\n"
    "  --json                print one JSON record: tokens, text, finish reason, kept positions, per-stage times\n"
    "  --each                answer the requests of a --request list one after another (not as one batch):\n"
    "                        one output (one --json line) per request, the bundle and executor loaded once\n"
    "  --dry-run             print the prompt token ids and the sha256 of the float32 pixel values; run no graph\n"
    "  --executor trt|cpu    TensorRT engines (GPU), or the ONNX graphs in ONNX Runtime on the CPU\n"
    "                        (default: trt when this build has TensorRT and the bundle has engines, else cpu)\n"
    "  --check               verify the bundle (manifest, files, graphs) and, with --inputs, the inputs;\n"
    "                        run nothing (exit 0: verified)\n";

int usage_error(const std::string& msg) {
  std::cerr << "fastv-run: " << msg << " (see --help)\n";
  return 2;
}

std::string line_breaks(std::string s) {   // a typed backslash-n is a line break
  for (size_t at = s.find("\\n"); at != std::string::npos; at = s.find("\\n", at + 1)) s.replace(at, 2, "\n");
  return s;
}

bool parse_double(const char* v, double& out) {
  char* end = nullptr;
  out = std::strtod(v, &end);
  return *v && !*end && std::isfinite(out);
}

bool parse_int(const char* v, int64_t& out) {
  char* end = nullptr;
  out = std::strtoll(v, &end, 10);
  return *v && !*end;
}

json answer_record(const fastv::Result& res, const std::string& executor) {
  json rows = json::array();
  for (const auto& a : res.rows)
    rows.push_back({{"tokens", a.tokens}, {"text", a.text}, {"finish_reason", a.finish_reason},
                    {"prompt_tokens", a.prompt_tokens}, {"kept_positions", a.kept_positions}});
  return {{"rows", rows}, {"timings_ms", res.timings_ms}, {"executor", executor}};
}

}  // namespace

int main(int argc, char** argv) {
  std::string bundle_dir, inputs_dir, executor, request_file;
  std::optional<std::string> prompt, system;
  std::vector<std::string> images, videos;
  fastv::Overrides o;
  bool as_json = false, stream = false, dry_run = false, each = false, check_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--json") {
      as_json = true;
    } else if (a == "--stream") {
      stream = true;
    } else if (a == "--each") {
      each = true;
    } else if (a == "--dry-run") {
      dry_run = true;
    } else if (a == "--raw") {
      o.raw = true;
    } else if (a == "--bundle" || a == "--inputs" || a == "--executor" || a == "--max-new-tokens" ||
               a == "--request" || a == "--prompt" || a == "--system" || a == "--image" || a == "--video" ||
               a == "--temperature" || a == "--top-k" || a == "--top-p" || a == "--seed" || a == "--stop") {
      const char* v = value();
      if (!v) return usage_error(a + " needs a value");
      int64_t n = 0;
      double d = 0;
      if (a == "--bundle") bundle_dir = v;
      else if (a == "--inputs") inputs_dir = v;
      else if (a == "--executor") executor = v;
      else if (a == "--request") request_file = v;
      else if (a == "--prompt") prompt = v;
      else if (a == "--system") system = v;
      else if (a == "--image") images.push_back(v);
      else if (a == "--video") videos.push_back(v);
      else if (a == "--stop") {
        if (!o.stop) o.stop.emplace();
        o.stop->push_back(v);
      } else if (a == "--max-new-tokens") {
        if (!parse_int(v, n) || n < 1 || n > 1000000) return usage_error("--max-new-tokens must be a positive integer");
        o.max_new_tokens = n;
      } else if (a == "--top-k") {
        if (!parse_int(v, n)) return usage_error("--top-k must be an integer");
        o.top_k = n;
      } else if (a == "--seed") {
        char* end = nullptr;
        const unsigned long long s = std::strtoull(v, &end, 10);
        if (!*v || *end || *v == '-') return usage_error("--seed must be an integer in [0, 2^64)");
        o.seed = s;
      } else {
        if (!parse_double(v, d)) return usage_error(a + " must be a number");
        (a == "--temperature" ? o.temperature : o.top_p) = d;
      }
    } else if (a == "--check") {
      check_only = true;
    } else {
      return usage_error("unknown argument '" + a + "'");
    }
  }
  if (bundle_dir.empty()) return usage_error("--bundle is required");
  if (!executor.empty() && executor != "trt" && executor != "cpu")
    return usage_error("--executor must be trt or cpu, got '" + executor + "'");
  const bool request_mode = !request_file.empty() || prompt || !images.empty() || !videos.empty() || system;
  if (!inputs_dir.empty() && request_mode)
    return usage_error("--inputs DIR holds the whole input; drop --request / --prompt / --image / --system");
  if (check_only && (request_mode || dry_run || stream || each || o.stop || o.raw))
    return usage_error("--check verifies the bundle (with --inputs DIR, the inputs) and runs nothing; drop the "
                       "request options");
  if (inputs_dir.empty() && !request_mode && !check_only)
    return usage_error("give --prompt TEXT (with --image), --request FILE or --inputs DIR");
  try {
    if (check_only) {   // the manifest, the files, the graphs (and the inputs): nothing is run
      const fastv::Bundle bundle = fastv::load_bundle(bundle_dir);
      if (!inputs_dir.empty()) fastv::read_inputs(inputs_dir, bundle);
      std::cout << bundle_dir << ": verified\n";
      return 0;
    }
    if (!inputs_dir.empty()) {   // the inputs Python wrote: token ids and pixels as they are
      if (dry_run || stream || o.stop || o.raw)
        return usage_error("--dry-run, --stream, --stop and --raw take a request (--request or --prompt)");
      const fastv::Bundle bundle = fastv::load_bundle(bundle_dir);
      if (executor.empty()) executor = fastv::tensorrt_available() && bundle.has_engines() ? "trt" : "cpu";
      if (executor == "trt") fastv::check_tensorrt_bundle(bundle);   // before reading inputs or any GPU work
      const fastv::Inputs inputs = fastv::read_inputs(inputs_dir, bundle);
      const fastv::SamplingParams params = fastv::pick_sampling({}, o);
      fastv::Sampler sampler(params, inputs.input_ids.shape[0]);
      fastv::GenerateOptions opts;
      if (!params.greedy()) opts.choose = [&](const float* l, int64_t r, int64_t v) { return sampler(l, r, v); };
      auto ex = executor == "trt" ? fastv::make_tensorrt_executor(bundle) : fastv::make_cpu_executor(bundle);
      const fastv::Generation g =
          fastv::generate(bundle, *ex, inputs, static_cast<int>(o.max_new_tokens.value_or(32)), opts);
      const int64_t rows = g.kept.shape[0], kept = g.kept.shape[1];
      std::vector<std::vector<int64_t>> kept_rows(rows);
      for (int64_t r = 0; r < rows; ++r)
        kept_rows[r].assign(g.kept.as<int64_t>() + r * kept, g.kept.as<int64_t>() + (r + 1) * kept);
      if (as_json) {
        json j;
        j["executor"] = ex->name();
        j["tokens"] = g.tokens;
        j["kept_positions"] = kept_rows;
        j["prompt_tokens"] = inputs.input_ids.shape[1];
        j["timings_ms"] = g.timings_ms;
        std::cout << j.dump() << "\n";
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          std::cout << "tokens:";
          for (auto t : g.tokens[r]) std::cout << " " << t;
          std::cout << "\n";
        }
        std::cerr << "fastv-run: " << ex->name() << " executor, prompt " << inputs.input_ids.shape[1]
                  << " tokens, kept " << kept << " after TokenSelect; prefill " << g.timings_ms.at("prefill")
                  << " ms, decode " << g.timings_ms.at("decode_per_token") << " ms/token\n";
      }
      return 0;
    }

    // ---- a request
    std::vector<fastv::Request> batch;
    if (!request_file.empty()) {
      if (prompt || !images.empty() || !videos.empty() || system)
        throw fastv::Error("--request FILE holds the whole request; drop --prompt / --image / --video / --system "
                           "(or drop --request)");
      batch = fastv::load_requests(request_file);
    } else {
      if (!prompt) throw fastv::Error("give --prompt TEXT (with --image / --video), or --request FILE");
      if (prompt->find_first_not_of(" \t\r\n") == std::string::npos)
        throw fastv::Error("--prompt is empty; give the instruction text");
      const std::string sys = system ? line_breaks(*system) : std::string();
      batch.push_back(fastv::request_from_cli(line_breaks(*prompt), images, videos, system ? &sys : nullptr));
    }
    for (size_t i = 0; i < batch.size(); ++i)   // the media exist, before anything is loaded
      for (const auto& p : batch[i].media()) {
        const bool ok = fs::is_regular_file(p.value) || (p.kind == "video" && fs::is_directory(p.value));
        if (!ok)
          throw fastv::Error((batch.size() > 1 ? "request " + std::to_string(i) + ": " : std::string()) + p.kind +
                             " " + p.value + " does not exist");
      }
    if (dry_run) {   // the prompt ids and a pixel checksum, no graph run (no executor needed)
      const fastv::Bundle bundle = fastv::load_bundle(bundle_dir);
      const fastv::Frontend front = fastv::Frontend::load(bundle);
      fastv::pick_max_new_tokens(batch, o);
      fastv::pick_sampling(batch, o);
      json rows = json::array();
      for (size_t i = 0; i < batch.size(); ++i) {
        const fastv::Prompt p =
            front.prepare(batch[i], o.raw, batch.size() > 1 ? "request " + std::to_string(i) + ": " : "");
        json shapes = json::array();
        for (const auto& t : p.pixels) shapes.push_back(t.shape);
        rows.push_back({{"prompt_ids", p.ids}, {"prompt_tokens", p.ids.size()}, {"prompt_text", p.text},
                        {"pixel_shapes", shapes}, {"pixel_sha256", fastv::pixel_checksum(p.pixels)}});
      }
      std::cout << json({{"rows", rows}}).dump() << "\n";
      return 0;
    }
    fastv::Session session(bundle_dir, executor);
    const bool streamed = stream && !as_json && batch.size() == 1;
    std::string printed;
    fastv::OnToken on_token;
    if (streamed)
      on_token = [&](int, const std::vector<int64_t>&, const std::vector<std::string>& text) {
        if (!text[0].empty()) {
          std::cout << text[0] << std::flush;
          printed += text[0];
        }
        return false;
      };
    if (each) {   // one request at a time through the same session
      for (const auto& request : batch) {
        const fastv::Result res = session.generate(request, o);
        if (as_json) {
          std::cout << answer_record(res, session.executor_name()).dump() << "\n";
        } else {
          std::cout << "tokens: " << json(res.rows[0].tokens).dump() << "\n";
          std::cout << "text  : " << json(res.rows[0].text).dump() << "\n";
        }
      }
      return 0;
    }
    const fastv::Result res = session.generate(batch, o, on_token);
    if (as_json) {
      std::cout << answer_record(res, session.executor_name()).dump() << "\n";
    } else if (streamed) {
      std::cout << res.rows[0].text.substr(std::min(printed.size(), res.rows[0].text.size())) << "\n" << std::flush;
    } else {
      for (size_t r = 0; r < res.rows.size(); ++r) {
        const std::string prefix = batch.size() > 1 ? "[" + std::to_string(r) + "] " : "";
        std::cout << prefix << "tokens: " << json(res.rows[r].tokens).dump() << "\n";
        std::cout << prefix << "text  : " << json(res.rows[r].text).dump() << "\n";
      }
      std::cerr << "fastv-run: " << session.executor_name() << " executor, prompt " << res.rows[0].prompt_tokens
                << " tokens, kept " << res.rows[0].kept_positions.size() << " after TokenSelect; prefill "
                << res.timings_ms.at("prefill") << " ms, decode " << res.timings_ms.at("decode_per_token")
                << " ms/token\n";
    }
    return 0;
  } catch (const fastv::Error& e) {
    std::cerr << "fastv-run: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "fastv-run: internal error: " << e.what() << "\n";
    return 3;
  }
}
