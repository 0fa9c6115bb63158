// Choosing the next token on the host: greedy, or seeded sampling with temperature, top-k and top-p, the
// algorithm of docs/design.md §8 (the Python reference: fastv_export/runtime/sampling.py). The same seed and
// logits give the same tokens as Python.
#pragma once

#include <cstdint>
#include <vector>

namespace fastv {

/// SplitMix64 over one 64-bit state; uniform() is (next() >> 11) * 2^-53, in [0, 1).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next();
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  uint64_t state() const { return state_; }

 private:
  uint64_t state_;
};

/// How the next token is chosen: temperature 0 is greedy (the others unused); top_k 0 keeps every token;
/// top_p 1 keeps every token; seed seeds the draws.
struct SamplingParams {
  double temperature = 0.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;
  bool greedy() const { return temperature == 0.0; }
  /// Error naming the parameter and its range (§8) when one is out of range.
  void check() const;
};

/// The token of one row for the uniform draw u in [0, 1) (§8 steps 1-6); logits of one row, as float32.
int64_t sample_row(const float* logits, int64_t vocab, const SamplingParams& params, double u);

/// sampler(logits [rows, vocab]) -> rows ids: greedy (lowest id among equal maxima) at temperature 0, else one
/// draw per row per call from the row's own SplitMix64 stream (row r: seeded with the (r+1)-th output of
/// SplitMix64(seed)).
class Sampler {
 public:
  explicit Sampler(SamplingParams params = {}, int64_t rows = 1);
  std::vector<int64_t> operator()(const float* logits, int64_t rows, int64_t vocab);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::vector<SplitMix64> streams_;
};

}  // namespace fastv
