// Counter-based dropout: rate, determinism, shard independence, and its backward.
#include <gtest/gtest.h>

#include "engine/backends/cpu/dropout.hpp"
#include "tests/kernels/gradcheck.hpp"

namespace px::cpu {
namespace {

using test::all_near;
using test::random_vector;
using V = std::vector<double>;

TEST(Dropout, DropsAtTheRequestedRate) {
  const std::int64_t rows = 200, cols = 500;
  std::vector<std::uint64_t> keys(rows);
  for (std::int64_t r = 0; r < rows; ++r) keys[static_cast<std::size_t>(r)] = mix_key(42, static_cast<std::uint64_t>(r));
  V x(rows * cols, 1.0), out(x.size());
  std::vector<std::uint8_t> mask(x.size());
  dropout_add_forward<double>(x, {}, out, mask, keys, cols, 0.1, 7);
  double kept = 0;
  for (auto m : mask) kept += m;
  EXPECT_NEAR(kept / static_cast<double>(mask.size()), 0.9, 0.003);  // 100,000 draws: 3.5 sigma
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_DOUBLE_EQ(out[i], mask[i] ? 1.0 / 0.9 : 0.0);
}

TEST(Dropout, RowsDrawTheSameBitsWhateverShardHoldsThem) {
  const std::int64_t cols = 16;
  const std::vector<std::uint64_t> keys = {11, 12, 13, 14};
  const V x = random_vector(4 * cols, 1), res = random_vector(4 * cols, 2);
  V full(x.size()), lower(2 * cols);
  std::vector<std::uint8_t> mf(x.size()), ml(2 * cols);
  dropout_add_forward<double>(x, res, full, mf, keys, cols, 0.5, 3);
  dropout_add_forward<double>(std::span<const double>(x).subspan(2 * cols), std::span<const double>(res).subspan(2 * cols), lower,
                              ml, std::span<const std::uint64_t>(keys).subspan(2), cols, 0.5, 3);
  for (std::int64_t i = 0; i < 2 * cols; ++i) {
    EXPECT_EQ(ml[static_cast<std::size_t>(i)], mf[static_cast<std::size_t>(2 * cols + i)]);
    EXPECT_DOUBLE_EQ(lower[static_cast<std::size_t>(i)], full[static_cast<std::size_t>(2 * cols + i)]);
  }
  std::vector<std::uint8_t> other(x.size());
  dropout_add_forward<double>(x, res, full, other, keys, cols, 0.5, 4);
  EXPECT_NE(other, mf) << "another seed draws another mask";
}

TEST(Dropout, IntegerThresholdDecidesAsTheDoubleComparison) {
  // The CUDA kernel decides with dropped_below(dropout_threshold(p)); it must drop exactly what
  // dropped() drops, including at rates whose p 2^53 is an integer and at the extremes.
  const double rates[] = {0.0, 0x1.0p-53, 0.1, 0.25, 0.5, 1.0 / 3.0, 0.9, 1.0 - 0x1.0p-53};
  for (const double p : rates) {
    const std::uint64_t t = px::dropout_threshold(p);
    for (std::uint64_t key = 0; key < 64; ++key) {
      const std::uint64_t stream = px::dropout_row_stream(5, key);
      for (std::int64_t col = 0; col < 256; ++col)
        ASSERT_EQ(px::dropped_below(stream, col, t), dropped(5, key, col, p)) << "p " << p << " key " << key << " col " << col;
    }
  }
  // Bits just either side of the threshold, where a rounding slip would show.
  for (const double p : rates) {
    const std::uint64_t t = px::dropout_threshold(p);
    for (std::uint64_t u : {t - 1, t, t + 1}) {
      if (u >= (std::uint64_t{1} << 53)) continue;
      EXPECT_EQ(u < t, static_cast<double>(u) * 0x1.0p-53 < p) << "p " << p << " u " << u;
    }
  }
}

TEST(Dropout, BackwardIsTheMaskedScaledGradient) {
  const std::int64_t cols = 8;
  const std::vector<std::uint64_t> keys = {1, 2, 3};
  V x = random_vector(3 * cols, 3);
  const V probe = random_vector(x.size(), 4);
  std::vector<std::uint8_t> mask(x.size());
  auto loss = [&] {
    V out(x.size());
    dropout_add_forward<double>(x, {}, out, mask, keys, cols, 0.25, 9);
    return test::dot(out, probe);
  };
  const V num = test::numeric_grad(x, loss);
  V dx(x.size());
  dropout_backward<double>(probe, mask, dx, 0.25);
  EXPECT_TRUE(all_near(dx, num, 1e-8));
}

}  // namespace
}  // namespace px::cpu
