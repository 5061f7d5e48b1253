// Gradient-check helpers for the CPU kernels: seeded random inputs, a scalar probe loss
// L = sum_i w_i y_i over a kernel's outputs, central finite differences of L, and a comparison
// that names the first element out of tolerance. All in double, where central differences with
// h = 1e-6 are accurate to about 1e-8 on these smooth, O(1) functions.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <vector>

namespace px::test {

inline std::vector<double> random_vector(std::size_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

inline double dot(std::span<const double> a, std::span<const double> b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) s += a[i] * b[i];
  return s;
}

// d loss / d x by central differences; `loss` reads x's current contents.
inline std::vector<double> numeric_grad(std::vector<double>& x, const std::function<double()>& loss, double h = 1e-6) {
  std::vector<double> g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = loss();
    x[i] = keep - h;
    const double down = loss();
    x[i] = keep;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

// |actual - expected| <= tol * max(1, |expected|) elementwise.
inline ::testing::AssertionResult all_near(std::span<const double> actual, std::span<const double> expected, double tol) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure() << "sizes differ: " << actual.size() << " vs " << expected.size();
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double err = std::abs(actual[i] - expected[i]);
    if (!(err <= tol * std::max(1.0, std::abs(expected[i]))))
      return ::testing::AssertionFailure() << "element " << i << ": " << actual[i] << " vs " << expected[i] << " (error "
                                           << err << ", tolerance " << tol << ")";
  }
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult all_near(const std::vector<double>& a, const std::vector<double>& e, double tol) {
  return all_near(std::span<const double>(a), std::span<const double>(e), tol);
}

}  // namespace px::test
