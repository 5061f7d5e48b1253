// AdamW against a hand-computed step and torch.optim.AdamW's update rule, and clipping.
#include <gtest/gtest.h>

#include <cmath>

#include "engine/backends/cpu/adamw.hpp"

namespace px::cpu {
namespace {

TEST(AdamW, FirstStepMovesEachWeightByAboutLr) {
  // At step 1, bias-corrected m / sqrt(v) is sign(g), so every weight moves lr (plus decay).
  std::vector<double> p = {1.0, -2.0, 0.5}, g = {0.3, -4.0, 1e-3}, m(3, 0.0), v(3, 0.0);
  const AdamWConfig cfg{0.01, 0.9, 0.95, 1e-12, 0.1};
  adamw_step<double>(p, g, m, v, cfg, 1, 1.0);
  EXPECT_NEAR(p[0], 1.0 * (1 - 0.001) - 0.01, 1e-9);
  EXPECT_NEAR(p[1], -2.0 * (1 - 0.001) + 0.01, 1e-9);
  EXPECT_NEAR(p[2], 0.5 * (1 - 0.001) - 0.01, 1e-6);
  EXPECT_NEAR(m[1], -0.4, 1e-12);
  EXPECT_NEAR(v[1], 0.05 * 16.0, 1e-12);
}

TEST(AdamW, SecondStepFollowsTheBiasCorrectedMoments) {
  std::vector<double> p = {0.7}, m = {0.0}, v = {0.0};
  const AdamWConfig cfg{1e-3, 0.9, 0.999, 1e-8, 0.01};
  const double g1 = 0.5, g2 = -0.2;
  adamw_step<double>(p, std::vector<double>{g1}, m, v, cfg, 1, 1.0);
  const double p1 = p[0];
  adamw_step<double>(p, std::vector<double>{g2}, m, v, cfg, 2, 1.0);
  const double m2 = 0.9 * (0.1 * g1) + 0.1 * g2, v2 = 0.999 * (0.001 * g1 * g1) + 0.001 * g2 * g2;
  const double expect = p1 * (1 - 1e-5) - 1e-3 * (m2 / (1 - 0.81)) / (std::sqrt(v2 / (1 - 0.998001)) + 1e-8);
  EXPECT_NEAR(p[0], expect, 1e-12);
}

TEST(AdamW, ClippingScalesToTheMaximumNorm) {
  const std::vector<float> g = {3.0f, 4.0f};
  const double norm = std::sqrt(sum_of_squares<float>(g));
  EXPECT_DOUBLE_EQ(norm, 5.0);
  EXPECT_NEAR(clip_coefficient(norm, 1.0), 1.0 / (5.0 + 1e-6), 1e-15);
  EXPECT_EQ(clip_coefficient(norm, 10.0), 1.0);
  EXPECT_EQ(clip_coefficient(norm, 0.0), 1.0);
  // A clipped step equals the step on pre-scaled gradients.
  std::vector<double> a = {1.0, 1.0}, b = a, ma(2, 0.0), va(2, 0.0), mb(2, 0.0), vb(2, 0.0);
  const AdamWConfig cfg{};
  const double c = clip_coefficient(norm, 1.0);
  adamw_step<double>(a, std::vector<double>{3.0, 4.0}, ma, va, cfg, 1, c);
  adamw_step<double>(b, std::vector<double>{3.0 * c, 4.0 * c}, mb, vb, cfg, 1, 1.0);
  EXPECT_DOUBLE_EQ(a[0], b[0]);
  EXPECT_DOUBLE_EQ(ma[1], mb[1]);
}

}  // namespace
}  // namespace px::cpu
