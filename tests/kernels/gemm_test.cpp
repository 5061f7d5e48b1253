// Linear-layer GEMMs against a triple loop, and their backward against finite differences.
#include <gtest/gtest.h>

#include "engine/backends/cpu/gemm.hpp"
#include "tests/kernels/gradcheck.hpp"

namespace px::cpu {
namespace {

using test::all_near;
using test::numeric_grad;
using test::random_vector;
using V = std::vector<double>;

V naive_linear(const V& x, const V& w, const V& b, std::int64_t m, std::int64_t n, std::int64_t k) {
  V y(static_cast<std::size_t>(m * n));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double s = b.empty() ? 0.0 : b[static_cast<std::size_t>(j)];
      for (std::int64_t p = 0; p < k; ++p) s += x[static_cast<std::size_t>(i * k + p)] * w[static_cast<std::size_t>(p * n + j)];
      y[static_cast<std::size_t>(i * n + j)] = s;
    }
  return y;
}

TEST(Gemm, LinearForwardMatchesTripleLoop) {
  const std::int64_t m = 5, n = 7, k = 3;
  V x = random_vector(m * k, 1), w = random_vector(k * n, 2), b = random_vector(n, 3), y(m * n);
  linear_forward<double>(x, w, b, y, m, n, k);
  EXPECT_TRUE(all_near(y, naive_linear(x, w, b, m, n, k), 1e-14));
  linear_forward<double>(x, w, {}, y, m, n, k);
  EXPECT_TRUE(all_near(y, naive_linear(x, w, {}, m, n, k), 1e-14));
}

TEST(Gemm, LinearBackwardMatchesFiniteDifferences) {
  const std::int64_t m = 4, n = 6, k = 5;
  V x = random_vector(m * k, 4), w = random_vector(k * n, 5), b = random_vector(n, 6), probe = random_vector(m * n, 7);
  auto loss = [&] { return test::dot(naive_linear(x, w, b, m, n, k), probe); };
  V dx(m * k, 9.0), dw(k * n, 0.0), db(n, 0.0);
  linear_backward_input<double>(probe, w, dx, m, n, k);
  linear_backward_weight<double>(x, probe, dw, db, m, n, k);
  EXPECT_TRUE(all_near(dx, numeric_grad(x, loss), 1e-8));
  EXPECT_TRUE(all_near(dw, numeric_grad(w, loss), 1e-8));
  EXPECT_TRUE(all_near(db, numeric_grad(b, loss), 1e-8));
  // Weight gradients accumulate across micro-batches; input gradients accumulate when asked.
  V dw2 = dw, db2 = db, dx2 = dx;
  linear_backward_weight<double>(x, probe, dw2, db2, m, n, k);
  linear_backward_input<double>(probe, w, dx2, m, n, k, true);
  for (std::size_t i = 0; i < dw.size(); ++i) EXPECT_DOUBLE_EQ(dw2[i], 2 * dw[i]);
  for (std::size_t i = 0; i < db.size(); ++i) EXPECT_DOUBLE_EQ(db2[i], 2 * db[i]);
  for (std::size_t i = 0; i < dx.size(); ++i) EXPECT_DOUBLE_EQ(dx2[i], 2 * dx[i]);
}

TEST(Gemm, FloatAgreesWithDouble) {
  const std::int64_t m = 33, n = 17, k = 65;
  V x = random_vector(m * k, 8), w = random_vector(k * n, 9), yd(m * n);
  std::vector<float> xf(x.begin(), x.end()), wf(w.begin(), w.end()), yf(m * n);
  linear_forward<double>(x, w, {}, yd, m, n, k);
  linear_forward<float>(xf, wf, {}, yf, m, n, k);
  EXPECT_TRUE(all_near(V(yf.begin(), yf.end()), yd, 1e-5));
}

}  // namespace
}  // namespace px::cpu
