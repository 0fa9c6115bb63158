// fastv-run: generate with a fastv-export bundle from inputs written by
// `fastv-export run BUNDLE ... --dump-inputs DIR` (runtime/README.md).
#include "fastv/runtime.hpp"

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

namespace {

const char* kUsage =
    "usage: fastv-run --bundle DIR --inputs DIR [--max-new-tokens N] [--executor trt|cpu] [--json]\n"
    "       fastv-run --bundle DIR --check [--inputs DIR]\n"
    "  --bundle DIR          a bundle written by `fastv-export export` (engines: `fastv-export build`)\n"
    "  --inputs DIR          inputs.json + .bin files written by `fastv-export run ... --dump-inputs DIR`\n"
    "  --max-new-tokens N    tokens to generate at most (default 32; stops earlier at EOS)\n"
    "  --executor trt|cpu    TensorRT engines (GPU), or the ONNX graphs in ONNX Runtime on the CPU\n"
    "                        (default: trt when this build has TensorRT and the bundle has engines, else cpu)\n"
    "  --json                print one JSON object: tokens, kept positions, per-stage times\n"
    "  --check               verify the bundle (manifest, files, graphs) and, with --inputs, the inputs;\n"
    "                        run nothing (exit 0: verified)\n";

int usage_error(const std::string& msg) {
  std::cerr << "fastv-run: " << msg << " (see --help)\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string bundle_dir, inputs_dir, executor;
  int max_new_tokens = 32;
  bool as_json = false, check_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--bundle" || a == "--inputs" || a == "--executor" || a == "--max-new-tokens") {
      const char* v = value();
      if (!v) return usage_error(a + " needs a value");
      if (a == "--bundle") bundle_dir = v;
      else if (a == "--inputs") inputs_dir = v;
      else if (a == "--executor") executor = v;
      else {
        char* end = nullptr;
        const long n = std::strtol(v, &end, 10);
        if (!*v || *end || n < 1 || n > 1000000) return usage_error("--max-new-tokens must be a positive integer");
        max_new_tokens = static_cast<int>(n);
      }
    } else if (a == "--json") {
      as_json = true;
    } else if (a == "--check") {
      check_only = true;
    } else {
      return usage_error("unknown argument '" + a + "'");
    }
  }
  if (bundle_dir.empty() || (inputs_dir.empty() && !check_only))
    return usage_error("--bundle and --inputs are required");
  if (!executor.empty() && executor != "trt" && executor != "cpu")
    return usage_error("--executor must be trt or cpu, got '" + executor + "'");
  try {
    const fastv::Bundle bundle = fastv::load_bundle(bundle_dir);
    if (check_only) {
      if (!inputs_dir.empty()) fastv::read_inputs(inputs_dir, bundle);
      std::cout << bundle_dir << ": verified\n";
      return 0;
    }
    if (executor.empty()) executor = fastv::tensorrt_available() && bundle.has_engines() ? "trt" : "cpu";
    if (executor == "trt") fastv::check_tensorrt_bundle(bundle);   // before reading inputs or any GPU work
    const fastv::Inputs inputs = fastv::read_inputs(inputs_dir, bundle);
    auto ex = executor == "trt" ? fastv::make_tensorrt_executor(bundle) : fastv::make_cpu_executor(bundle);
    const fastv::Generation g = fastv::generate(bundle, *ex, inputs, max_new_tokens);
    const int64_t rows = g.kept.shape[0], kept = g.kept.shape[1];
    std::vector<std::vector<int64_t>> kept_rows(rows);
    for (int64_t r = 0; r < rows; ++r)
      kept_rows[r].assign(g.kept.as<int64_t>() + r * kept, g.kept.as<int64_t>() + (r + 1) * kept);
    if (as_json) {
      nlohmann::json j;
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
      std::cerr << "fastv-run: " << ex->name() << " executor, prompt " << inputs.input_ids.shape[1] << " tokens, kept "
                << kept << " after TokenSelect; prefill " << g.timings_ms.at("prefill") << " ms, decode "
                << g.timings_ms.at("decode_per_token") << " ms/token\n";
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
