// The host tests' pass/fail counting, shared by every test binary of runtime/tests.
#pragma once
#include <iostream>
#include <string>

namespace fastv_test {

inline int failed = 0, passed = 0;

/// Count one check; print what failed.
inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::cerr << "FAILED: " << what << "\n";
  }
}

}  // namespace fastv_test
