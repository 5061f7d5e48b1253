// The GPU tests' device check and tolerance comparison.
#include "tests/cuda/gpu_test.hpp"

#include <cmath>
#include <cstdlib>
#include <random>
#include <string_view>

#include "engine/backends/cuda/check.hpp"

namespace px::test {

bool gpu_available() {
  if (px::cuda::device_count() > 0) return true;
  const char* require = std::getenv("PARALLAX_REQUIRE_GPU");
  if (require && std::string_view(require) == "1") ADD_FAILURE() << "PARALLAX_REQUIRE_GPU=1 but no CUDA device is visible";
  return false;
}

::testing::AssertionResult close(std::span<const float> got, std::span<const float> want, double atol, double rtol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes differ: " << got.size() << " vs " << want.size();
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(double(got[i]) - double(want[i])) / (atol + rtol * std::abs(double(want[i])));
    if (!(err <= worst)) {  // also catches NaN
      worst = err;
      at = i;
      if (std::isnan(err)) break;
    }
  }
  if (got.empty() || worst <= 1.0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "element " << at << ": got " << got[at] << ", want " << want[at] << " (error "
                                       << worst << " x (atol " << atol << " + rtol " << rtol << " |want|))";
}

std::vector<float> uniform(std::size_t n, std::uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

}  // namespace px::test
