// Vocabulary-parallel cross entropy: shards reduced as the tensor-parallel collectives reduce
// them give the single-shard loss; the gradient matches finite differences of the loss.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "engine/backends/cpu/cross_entropy.hpp"
#include "tests/kernels/gradcheck.hpp"

namespace px::cpu {
namespace {

using test::all_near;
using test::numeric_grad;
using test::random_vector;
using V = std::vector<double>;
constexpr std::int64_t kRows = 4, kVocab = 12;
const std::vector<std::int32_t> kTargets = {0, 11, 5, 6};

V losses(const V& logits) {
  V mx(kRows), se(kRows), tl(kRows), loss(kRows);
  cross_entropy_row_max<double>(logits, mx, kRows, kVocab);
  cross_entropy_partials<double>(logits, kTargets, 0, mx, se, tl, kRows, kVocab);
  cross_entropy_loss<double>(mx, se, tl, loss);
  return loss;
}

TEST(CrossEntropy, MatchesLogSoftmax) {
  const V logits = random_vector(kRows * kVocab, 1, -20, 20);
  const V loss = losses(logits);
  for (std::int64_t r = 0; r < kRows; ++r) {
    double z = 0;
    for (std::int64_t c = 0; c < kVocab; ++c) z += std::exp(logits[static_cast<std::size_t>(r * kVocab + c)]);
    EXPECT_NEAR(loss[static_cast<std::size_t>(r)], std::log(z) - logits[static_cast<std::size_t>(r * kVocab + kTargets[r])], 1e-12);
  }
}

TEST(CrossEntropy, VocabularyShardsReduceToTheFullLoss) {
  const V logits = random_vector(kRows * kVocab, 2, -5, 5);
  const std::int64_t half = kVocab / 2;
  std::vector<V> shard(2);
  for (int s = 0; s < 2; ++s)
    for (std::int64_t r = 0; r < kRows; ++r)
      for (std::int64_t c = 0; c < half; ++c) shard[s].push_back(logits[static_cast<std::size_t>(r * kVocab + s * half + c)]);
  // max-reduce the row maxima, then sum-reduce the partial sums and target logits
  V m0(kRows), m1(kRows), mx(kRows);
  cross_entropy_row_max<double>(shard[0], m0, kRows, half);
  cross_entropy_row_max<double>(shard[1], m1, kRows, half);
  for (std::size_t r = 0; r < mx.size(); ++r) mx[r] = std::max(m0[r], m1[r]);
  V se(kRows, 0.0), tl(kRows, 0.0), loss(kRows);
  std::vector<V> dl(2, V(kRows * half));
  for (int s = 0; s < 2; ++s) {
    V a(kRows), b(kRows);
    cross_entropy_partials<double>(shard[s], kTargets, s * half, mx, a, b, kRows, half);
    for (std::size_t r = 0; r < se.size(); ++r) {
      se[r] += a[r];
      tl[r] += b[r];
    }
  }
  cross_entropy_loss<double>(mx, se, tl, loss);
  EXPECT_TRUE(all_near(loss, losses(logits), 1e-12));
  // Gradients per shard equal the matching columns of the full gradient.
  const V ones(kRows, 1.0);
  V full_mx(kRows), full_se(kRows), full_tl(kRows), full_d(kRows * kVocab);
  cross_entropy_row_max<double>(logits, full_mx, kRows, kVocab);
  cross_entropy_partials<double>(logits, kTargets, 0, full_mx, full_se, full_tl, kRows, kVocab);
  cross_entropy_backward<double>(logits, kTargets, 0, full_mx, full_se, ones, full_d, kRows, kVocab);
  for (int s = 0; s < 2; ++s) {
    cross_entropy_backward<double>(shard[s], kTargets, s * half, mx, se, ones, dl[s], kRows, half);
    for (std::int64_t r = 0; r < kRows; ++r)
      for (std::int64_t c = 0; c < half; ++c)
        EXPECT_NEAR(dl[s][static_cast<std::size_t>(r * half + c)], full_d[static_cast<std::size_t>(r * kVocab + s * half + c)], 1e-14);
  }
}

TEST(CrossEntropy, BackwardMatchesFiniteDifferences) {
  V logits = random_vector(kRows * kVocab, 3, -3, 3);
  const V weight = {0.25, 0.5, 1.0, 2.0};  // per-row loss scale (1 / tokens in training)
  auto loss = [&] { return test::dot(losses(logits), weight); };
  V mx(kRows), se(kRows), tl(kRows), d(logits.size());
  cross_entropy_row_max<double>(logits, mx, kRows, kVocab);
  cross_entropy_partials<double>(logits, kTargets, 0, mx, se, tl, kRows, kVocab);
  cross_entropy_backward<double>(logits, kTargets, 0, mx, se, weight, d, kRows, kVocab);
  EXPECT_TRUE(all_near(d, numeric_grad(logits, loss), 1e-8));
}

}  // namespace
}  // namespace px::cpu
