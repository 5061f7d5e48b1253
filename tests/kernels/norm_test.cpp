// LayerNorm and RMSNorm: forward against the definition, backward against finite differences.
#include <gtest/gtest.h>

#include <cmath>

#include "engine/backends/cpu/norm.hpp"
#include "tests/kernels/gradcheck.hpp"

namespace px::cpu {
namespace {

using test::all_near;
using test::numeric_grad;
using test::random_vector;
using V = std::vector<double>;
constexpr std::int64_t kRows = 3, kCols = 8;
constexpr double kEps = 1e-5;

TEST(Norm, LayerNormRowsHaveZeroMeanUnitVariance) {
  V x = random_vector(kRows * kCols, 1, -3, 5), y(x.size()), one(kCols, 1.0), zero(kCols, 0.0);
  layernorm_forward<double>(x, one, zero, y, kRows, kCols, 0.0);
  for (std::int64_t r = 0; r < kRows; ++r) {
    double mean = 0, sq = 0;
    for (std::int64_t c = 0; c < kCols; ++c) mean += y[static_cast<std::size_t>(r * kCols + c)];
    for (std::int64_t c = 0; c < kCols; ++c) sq += y[static_cast<std::size_t>(r * kCols + c)] * y[static_cast<std::size_t>(r * kCols + c)];
    EXPECT_NEAR(mean / kCols, 0.0, 1e-12);
    EXPECT_NEAR(sq / kCols, 1.0, 1e-12);
  }
}

TEST(Norm, LayerNormBackwardMatchesFiniteDifferences) {
  V x = random_vector(kRows * kCols, 2), g = random_vector(kCols, 3, 0.5, 1.5), b = random_vector(kCols, 4);
  const V probe = random_vector(x.size(), 5);
  auto loss = [&] {
    V y(x.size());
    layernorm_forward<double>(x, g, b, y, kRows, kCols, kEps);
    return test::dot(y, probe);
  };
  const V residual = random_vector(x.size(), 6);
  V dx = residual, dg(kCols, 0.0), db(kCols, 0.0);
  layernorm_backward<double>(probe, x, g, dx, dg, db, kRows, kCols, kEps);
  V num = numeric_grad(x, loss);
  for (std::size_t i = 0; i < num.size(); ++i) num[i] += residual[i];  // dx adds to what is there
  EXPECT_TRUE(all_near(dx, num, 1e-7));
  EXPECT_TRUE(all_near(dg, numeric_grad(g, loss), 1e-7));
  EXPECT_TRUE(all_near(db, numeric_grad(b, loss), 1e-7));
}

TEST(Norm, RmsNormForwardAndBackward) {
  V x = random_vector(kRows * kCols, 7), g = random_vector(kCols, 8, 0.5, 1.5), y(x.size());
  rmsnorm_forward<double>(x, g, y, kRows, kCols, kEps);
  double ss = 0;
  for (std::int64_t c = 0; c < kCols; ++c) ss += x[static_cast<std::size_t>(c)] * x[static_cast<std::size_t>(c)];
  EXPECT_NEAR(y[1], x[1] / std::sqrt(ss / kCols + kEps) * g[1], 1e-14);
  const V probe = random_vector(x.size(), 9);
  auto loss = [&] {
    V out(x.size());
    rmsnorm_forward<double>(x, g, out, kRows, kCols, kEps);
    return test::dot(out, probe);
  };
  V dx(x.size(), 0.0), dg(kCols, 0.0);
  rmsnorm_backward<double>(probe, x, g, dx, dg, kRows, kCols, kEps);
  EXPECT_TRUE(all_near(dx, numeric_grad(x, loss), 1e-7));
  EXPECT_TRUE(all_near(dg, numeric_grad(g, loss), 1e-7));
}

TEST(Norm, FloatAgreesWithDouble) {
  V x = random_vector(kRows * 512, 10, -4, 4), g = random_vector(512, 11), b = random_vector(512, 12), y(x.size());
  std::vector<float> xf(x.begin(), x.end()), gf(g.begin(), g.end()), bf(b.begin(), b.end()), yf(x.size());
  layernorm_forward<double>(x, g, b, y, kRows, 512, kEps);
  layernorm_forward<float>(xf, gf, bf, yf, kRows, 512, float(kEps));
  EXPECT_TRUE(all_near(V(yf.begin(), yf.end()), y, 1e-5));
}

}  // namespace
}  // namespace px::cpu
