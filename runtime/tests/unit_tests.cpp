// Host unit tests of fastv_runtime (no bundle, no GPU): position rules, candidates, sha256, errors.
#include "fastv/runtime.hpp"

#include <fstream>
#include <functional>
#include <iostream>

namespace {

int failed = 0, passed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::cerr << "FAILED: " << what << "\n";
  }
}

std::vector<int64_t> values(const fastv::Tensor& t) {
  return std::vector<int64_t>(t.as<int64_t>(), t.as<int64_t>() + t.numel());
}

bool throws_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const fastv::Error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

}  // namespace

int main() {
  using fastv::Tensor;
  fastv::Bundle rope;
  rope.position_rank = 2;
  rope.image_token_ids = {500};
  rope.tokens_per_image = 2;
  // left-padded batch of 2: [pad, 1, 500, 500, 7] and [1, 9, 500, 500, 7]
  const Tensor ids = Tensor::from_i64({2, 5}, {0, 1, 500, 500, 7, 1, 9, 500, 500, 7});
  const Tensor mask = Tensor::from_i64({2, 5}, {0, 1, 1, 1, 1, 1, 1, 1, 1, 1});
  const Tensor pos = fastv::prefill_positions(rope, ids, mask);
  check(values(pos) == std::vector<int64_t>{1, 0, 1, 2, 3, 0, 1, 2, 3, 4}, "rank-2 positions: cumsum(mask)-1, padding 1");
  check(values(fastv::decode_positions(pos, 2)) == std::vector<int64_t>{6, 7}, "rank-2 decode: max + 1 + t");
  check(values(fastv::find_candidates(rope, ids)) == std::vector<int64_t>{2, 3, 2, 3}, "candidates per row");
  const Tensor uneven = Tensor::from_i64({2, 3}, {500, 1, 2, 500, 500, 3});
  check(throws_with([&] { fastv::find_candidates(rope, uneven); }, "different numbers of image tokens"),
        "rows with different image-token counts are refused");

  fastv::Bundle mrope = rope;
  mrope.position_rank = 3;
  mrope.spatial_merge_size = 2;
  mrope.grid_thw = {1, 4, 6};   // (1, 2, 3) after merging: 6 tokens
  mrope.tokens_per_image = 6;
  const Tensor mids = Tensor::from_i64({1, 9}, {0, 1, 500, 500, 500, 500, 500, 500, 7});
  const Tensor mmask = Tensor::from_i64({1, 9}, {0, 1, 1, 1, 1, 1, 1, 1, 1});
  const Tensor mpos = fastv::prefill_positions(mrope, mids, mmask);
  check(mpos.shape == std::vector<int64_t>{3, 1, 9}, "M-RoPE shape [3, B, n]");
  // text 1 -> 0; image offset 1: t = 1, h = 1 + (0,0,0,1,1,1), w = 1 + (0,1,2,0,1,2); text 7 -> 1 + 2 + 1 = 4
  check(values(mpos) == std::vector<int64_t>{0, 0, 1, 1, 1, 1, 1, 1, 4,
                                             0, 0, 1, 1, 1, 2, 2, 2, 4,
                                             0, 0, 1, 2, 3, 1, 2, 3, 4},
        "M-RoPE prefill triples (padding 0)");
  check(values(fastv::decode_positions(mpos, 0)) == std::vector<int64_t>{5, 5, 5}, "M-RoPE decode: max + 1 + t");

  const std::string tmp = "fastv_runtime_tests.tmp";
  { std::ofstream(tmp) << "abc"; }
  check(fastv::sha256_file(tmp) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256 of 'abc'");
  std::remove(tmp.c_str());
  check(throws_with([] { fastv::load_bundle("no-such-bundle-dir"); }, "is not a bundle directory"),
        "a missing bundle directory is one clear error");

  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
