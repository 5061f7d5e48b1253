// Rotary embedding: norm-preserving, relative (q.k depends on position difference only), and its
// backward is the transpose of the forward (checked by finite differences).
#include <gtest/gtest.h>

#include <cmath>

#include "engine/backends/cpu/rope.hpp"
#include "tests/kernels/gradcheck.hpp"

namespace px::cpu {
namespace {

using test::all_near;
using test::numeric_grad;
using test::random_vector;
using V = std::vector<double>;
constexpr std::int64_t kD = 8;

double dot_rotated(V q, V k, std::int32_t pq, std::int32_t pk) {
  const std::vector<std::int32_t> a = {pq}, b = {pk};
  rope_forward<double>(q, 1, kD, 1, kD, a, 10000.0);
  rope_forward<double>(k, 1, kD, 1, kD, b, 10000.0);
  return test::dot(q, k);
}

TEST(Rope, DependsOnRelativePositionOnly) {
  const V q = random_vector(kD, 1), k = random_vector(kD, 2);
  EXPECT_NEAR(dot_rotated(q, k, 7, 3), dot_rotated(q, k, 104, 100), 1e-12);
  EXPECT_NEAR(dot_rotated(q, k, 0, 0), test::dot(q, k), 1e-12);
}

TEST(Rope, RotatesOnlyTheFirstHeadsOfEachRowAndKeepsNorms) {
  // Two rows of [2 rotated heads | 1 untouched head] (Q and K rotated, V not).
  const std::int64_t ld = 3 * kD;
  const V x0 = random_vector(2 * ld, 3);
  V x = x0;
  const std::vector<std::int32_t> positions = {5, 9};
  rope_forward<double>(x, 2, ld, 2, kD, positions, 10000.0);
  for (std::int64_t r = 0; r < 2; ++r) {
    for (std::int64_t c = 2 * kD; c < ld; ++c) EXPECT_EQ(x[static_cast<std::size_t>(r * ld + c)], x0[static_cast<std::size_t>(r * ld + c)]);
    for (std::int64_t hd = 0; hd < 2; ++hd) {
      double n0 = 0, n1 = 0;
      for (std::int64_t c = 0; c < kD; ++c) {
        const auto i = static_cast<std::size_t>(r * ld + hd * kD + c);
        n0 += x0[i] * x0[i];
        n1 += x[i] * x[i];
      }
      EXPECT_NEAR(n0, n1, 1e-12);
    }
  }
}

TEST(Rope, BackwardMatchesFiniteDifferences) {
  const std::int64_t ld = 2 * kD, rows = 3;
  V x = random_vector(rows * ld, 4);
  const V probe = random_vector(x.size(), 5);
  const std::vector<std::int32_t> positions = {0, 4, 11};
  auto loss = [&] {
    V y = x;
    rope_forward<double>(y, rows, ld, 2, kD, positions, 500000.0);
    return test::dot(y, probe);
  };
  V dx = probe;
  rope_backward<double>(dx, rows, ld, 2, kD, positions, 500000.0);
  EXPECT_TRUE(all_near(dx, numeric_grad(x, loss), 1e-8));
}

}  // namespace
}  // namespace px::cpu
