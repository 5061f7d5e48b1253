// GELU and SwiGLU: values at known points and backward against finite differences.
#include <gtest/gtest.h>

#include <cmath>

#include "engine/backends/cpu/activation.hpp"
#include "tests/kernels/gradcheck.hpp"

namespace px::cpu {
namespace {

using test::all_near;
using test::numeric_grad;
using test::random_vector;
using V = std::vector<double>;

TEST(Activation, GeluKnownValues) {
  V x = {0.0, 1.0, -1.0, 3.0}, y(4);
  gelu_forward<double>(x, y);
  EXPECT_DOUBLE_EQ(y[0], 0.0);
  EXPECT_NEAR(y[1], 0.8411919906082768, 1e-12);  // tanh form at 1 (GPT-2's gelu)
  EXPECT_NEAR(y[2], -0.15880800939172324, 1e-12);
  EXPECT_NEAR(y[3], 2.9963626079182270, 1e-12);
}

TEST(Activation, GeluBackwardMatchesFiniteDifferences) {
  V x = random_vector(20, 1, -3, 3);
  const V probe = random_vector(20, 2);
  auto loss = [&] {
    V y(x.size());
    gelu_forward<double>(x, y);
    return test::dot(y, probe);
  };
  V dx(x.size());
  gelu_backward<double>(probe, x, dx);
  EXPECT_TRUE(all_near(dx, numeric_grad(x, loss), 1e-8));
}

TEST(Activation, SwigluForwardAndBackward) {
  const std::int64_t rows = 3, cols = 4;
  V x = random_vector(rows * 2 * cols, 3, -3, 3), y(rows * cols);
  swiglu_forward<double>(x, y, rows, cols);
  const double g = x[8 + 1], u = x[8 + 4 + 1];  // row 1, column 1
  EXPECT_NEAR(y[4 + 1], g / (1 + std::exp(-g)) * u, 1e-14);
  const V probe = random_vector(rows * cols, 4);
  auto loss = [&] {
    V out(rows * cols);
    swiglu_forward<double>(x, out, rows, cols);
    return test::dot(out, probe);
  };
  V dx(x.size());
  swiglu_backward<double>(probe, x, dx, rows, cols);
  EXPECT_TRUE(all_near(dx, numeric_grad(x, loss), 1e-8));
}

}  // namespace
}  // namespace px::cpu
