// The seeded sampler of docs/design.md §8 (the Python reference: fastv_export/runtime/sampling.py); every sum is
// accumulated in order, as the reference's cumulative sums are.
#include "fastv/sampler.hpp"

#include "fastv/runtime.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

namespace fastv {

uint64_t SplitMix64::next() {
  state_ += 0x9E3779B97F4A7C15ull;
  uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

namespace {

std::string num(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

}  // namespace

void SamplingParams::check() const {
  if (!std::isfinite(temperature) || temperature < 0)
    throw Error("sampling parameter temperature must be >= 0 (0 = greedy), got " + num(temperature));
  if (top_k < 0 || top_k >= (int64_t{1} << 31))
    throw Error("sampling parameter top_k must be an integer in [0, 2^31) (0 = every token), got " +
                std::to_string(top_k));
  if (!std::isfinite(top_p) || !(top_p > 0 && top_p <= 1))
    throw Error("sampling parameter top_p must be in (0, 1] (1 = every token), got " + num(top_p));
}

int64_t sample_row(const float* logits, int64_t vocab, const SamplingParams& params, double u) {
  // 1. z = logit / T in float64
  std::vector<double> z(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) z[i] = static_cast<double>(logits[i]) / params.temperature;
  // 2. ids by z descending, equal values by ascending id; top_k keeps the first k
  std::vector<int64_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), int64_t{0});
  auto before = [&](int64_t a, int64_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
  size_t kept = order.size();
  if (params.top_k > 0 && params.top_k < vocab) {
    kept = static_cast<size_t>(params.top_k);
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(kept), order.end(), before);
    order.resize(kept);
  } else {
    std::sort(order.begin(), order.end(), before);
  }
  const double first = z[order[0]];
  if (!std::isfinite(first)) {
    float top = logits[0];
    for (int64_t i = 1; i < vocab; ++i) top = std::max(top, logits[i]);
    throw Error("sampling parameter temperature " + num(params.temperature) + " is too small for logits up to " +
                num(top) + " (they overflow); use temperature 0 for greedy");
  }
  // 3. softmax over the kept ids, the sum accumulated in order
  std::vector<double> p(kept);
  double s = 0;
  for (size_t i = 0; i < kept; ++i) {
    p[i] = std::exp(z[order[i]] - first);
    s += p[i];
  }
  for (auto& x : p) x /= s;
  // 4. top_p: the first n ids whose running sum reaches top_p (all when rounding never reaches it)
  size_t n = kept;
  if (params.top_p < 1) {
    double c = 0;
    for (size_t i = 0; i < kept; ++i) {
      c += p[i];
      if (c >= params.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  // 5. renormalise over the n ids
  double t = 0;
  for (size_t i = 0; i < n; ++i) t += p[i];
  // 6. the first id whose running sum exceeds u; else the last one with q > 0
  double c = 0;
  for (size_t i = 0; i < n; ++i) {
    c += p[i] / t;
    if (c > u) return order[i];
  }
  for (size_t i = n; i-- > 0;)
    if (p[i] / t > 0) return order[i];
  return order[0];
}

Sampler::Sampler(SamplingParams params, int64_t rows) : params_(params) {
  if (rows < 1) throw Error("a sampler needs a batch of at least 1 row, got " + std::to_string(rows));
  params_.check();
  SplitMix64 seeder(params_.seed);
  for (int64_t r = 0; r < rows; ++r) streams_.emplace_back(seeder.next());
}

std::vector<int64_t> Sampler::operator()(const float* logits, int64_t rows, int64_t vocab) {
  if (rows != static_cast<int64_t>(streams_.size()) || vocab < 1)
    throw Error("the sampler takes logits [" + std::to_string(streams_.size()) + ", vocab], got [" +
                std::to_string(rows) + ", " + std::to_string(vocab) + "]");
  std::vector<int64_t> out(static_cast<size_t>(rows));
  if (params_.greedy()) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = logits + r * vocab;
      out[r] = std::max_element(row, row + vocab) - row;   // the first maximum: the lowest id
    }
    return out;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * vocab;
    bool any = false;
    for (int64_t i = 0; i < vocab; ++i) {
      if (std::isnan(row[i]) || row[i] == INFINITY)
        throw Error("the logits to sample from hold NaN or +inf, or a row is all -inf");
      any = any || row[i] != -INFINITY;
    }
    if (!any) throw Error("the logits to sample from hold NaN or +inf, or a row is all -inf");
  }
  for (int64_t r = 0; r < rows; ++r) out[r] = sample_row(logits + r * vocab, vocab, params_, streams_[r].uniform());
  return out;
}

}  // namespace fastv
