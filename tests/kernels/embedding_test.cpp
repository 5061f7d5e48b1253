// Vocabulary-parallel embedding: shards sum to the full lookup; backward against finite differences.
#include <gtest/gtest.h>

#include "engine/backends/cpu/embedding.hpp"
#include "tests/kernels/gradcheck.hpp"

namespace px::cpu {
namespace {

using test::all_near;
using test::numeric_grad;
using test::random_vector;
using V = std::vector<double>;
constexpr std::int64_t kVocab = 10, kH = 3, kPositions = 6;
const std::vector<std::int32_t> kTokens = {3, 9, 0, 3, 7};
const std::vector<std::int32_t> kPos = {0, 1, 2, 3, 5};

TEST(Embedding, ShardsSumToTheFullLookup) {
  const V word = random_vector(kVocab * kH, 1), pos = random_vector(kPositions * kH, 2);
  V full(kTokens.size() * kH);
  embedding_forward<double>(kTokens, kPos, word, 0, pos, full, kH);
  EXPECT_DOUBLE_EQ(full[1 * kH + 2], word[9 * kH + 2] + pos[1 * kH + 2]);
  // Two vocabulary shards of 5 rows; positions are added on one of them only.
  V a(full.size()), b(full.size());
  embedding_forward<double>(kTokens, kPos, std::span<const double>(word).first(5 * kH), 0, pos, a, kH);
  embedding_forward<double>(kTokens, kPos, std::span<const double>(word).subspan(5 * kH), 5, {}, b, kH);
  for (std::size_t i = 0; i < full.size(); ++i) EXPECT_DOUBLE_EQ(a[i] + b[i], full[i]);
}

TEST(Embedding, BackwardMatchesFiniteDifferences) {
  V word = random_vector(kVocab * kH, 3), pos = random_vector(kPositions * kH, 4);
  const V probe = random_vector(kTokens.size() * kH, 5);
  auto loss = [&] {
    V out(kTokens.size() * kH);
    embedding_forward<double>(kTokens, kPos, word, 0, pos, out, kH);
    return test::dot(out, probe);
  };
  V dword(word.size(), 0.0), dpos(pos.size(), 0.0);
  embedding_backward<double>(probe, kTokens, kPos, dword, 0, dpos, kH);
  EXPECT_TRUE(all_near(dword, numeric_grad(word, loss), 1e-8));  // token 3 appears twice: summed
  EXPECT_TRUE(all_near(dpos, numeric_grad(pos, loss), 1e-8));
}

}  // namespace
}  // namespace px::cpu
