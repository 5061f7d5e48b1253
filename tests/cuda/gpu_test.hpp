// Shared by the CUDA kernel tests: skip (or, with PARALLAX_REQUIRE_GPU=1, fail) without a device,
// and compare a device result to a CPU reference with a stated tolerance.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace px::test {

// True when a CUDA device is usable. Otherwise records why: a skip, or a failure when the
// environment demands a GPU (PARALLAX_REQUIRE_GPU=1).
bool gpu_available();

// max |got - want| / (atol + rtol |want|) over all elements, and where it peaks; passes when <= 1.
::testing::AssertionResult close(std::span<const float> got, std::span<const float> want, double atol, double rtol);

// n values uniform in [lo, hi), the same for the same seed on every machine's standard library
// generator (mt19937_64 is fully specified; the distribution is libstdc++'s).
std::vector<float> uniform(std::size_t n, std::uint64_t seed, float lo, float hi);

}  // namespace px::test

// First statement of every GPU test.
#define PX_REQUIRE_GPU()                                 \
  do {                                                   \
    if (!::px::test::gpu_available()) {                  \
      if (::testing::Test::HasFailure()) return;         \
      GTEST_SKIP() << "no CUDA device on this machine";  \
    }                                                    \
  } while (0)
