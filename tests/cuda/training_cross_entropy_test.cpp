// CUDA vocab-parallel cross-entropy against the fp32 CPU kernels on the same bf16-rounded logits:
// GPT-2's vocabulary (50257) split over 8 tensor-parallel shards of odd and even widths, reduced
// between phases as the collectives would; a Llama-3 shard width (128256 / 8) whose global max
// lies outside the shard; and the fused single-rank forward with in-place backward.
//
// Tolerances. Row maxima and target logits are copies of bf16 values: exact. sum_exp: the GPU sums
// exp2-based fp32 terms (about 1e-6 relative each) in a block tree, the CPU in double, so rtol
// 1e-5. loss = log(sum_exp) + max - target inherits about 1e-6 absolute at values near 11: atol
// 2e-5, rtol 1e-5. dlogits is bf16: one rounding (2^-9 relative) on top of the fp32 error, so
// rtol 2^-8 (one bf16 ulp); atol only where a row has a spike, whose target entry p - 1 cancels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "engine/backends/cpu/cross_entropy.hpp"
#include "engine/backends/cuda/cross_entropy.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px::cuda {
namespace {

using i64 = std::int64_t;
using px::test::close;
using px::test::uniform;

constexpr double kBf16Ulp = 1.0 / 256;

std::vector<std::int32_t> random_targets(i64 rows, i64 vocab, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int32_t> dist(0, static_cast<std::int32_t>(vocab - 1));
  std::vector<std::int32_t> t(static_cast<std::size_t>(rows));
  for (auto& x : t) x = dist(rng);
  return t;
}

// The CPU kernels on the whole vocabulary (one rank), in fp32.
struct Reference {
  std::vector<float> row_max, sum_exp, target_logit, loss, dlogits;
};
Reference cpu_single_rank(const std::vector<float>& logits, const std::vector<std::int32_t>& targets,
                          const std::vector<float>& dloss, i64 rows, i64 cols) {
  const auto r = static_cast<std::size_t>(rows);
  Reference ref{std::vector<float>(r), std::vector<float>(r), std::vector<float>(r), std::vector<float>(r),
                std::vector<float>(logits.size())};
  cpu::cross_entropy_row_max<float>(logits, ref.row_max, rows, cols);
  cpu::cross_entropy_partials<float>(logits, targets, 0, ref.row_max, ref.sum_exp, ref.target_logit, rows, cols);
  cpu::cross_entropy_loss<float>(ref.row_max, ref.sum_exp, ref.target_logit, ref.loss);
  cpu::cross_entropy_backward<float>(logits, targets, 0, ref.row_max, ref.sum_exp, dloss, ref.dlogits, rows, cols);
  return ref;
}

// Columns [begin, begin + width) of a rows x cols matrix.
std::vector<float> columns(const std::vector<float>& m, i64 rows, i64 cols, i64 begin, i64 width) {
  std::vector<float> out;
  out.reserve(static_cast<std::size_t>(rows * width));
  for (i64 r = 0; r < rows; ++r)
    out.insert(out.end(), m.begin() + r * cols + begin, m.begin() + r * cols + begin + width);
  return out;
}

// bf16 matrix on the device at `offset` elements past a 256-byte boundary, so row starts and the
// base itself take every alignment the kernels must handle.
struct OffsetBf16 {
  DeviceBuffer<bf16> buffer;
  std::size_t offset;
  OffsetBf16(const std::vector<float>& host, std::size_t off) : buffer(host.size() + off), offset(off) {
    const std::vector<bf16> b = to_bf16(host);
    PX_CUDA_CHECK(cudaMemcpy(data(), b.data(), b.size() * sizeof(bf16), cudaMemcpyHostToDevice));
  }
  bf16* data() { return buffer.data() + offset; }
  std::vector<float> download(std::size_t n) const {
    std::vector<bf16> b(n);
    PX_CUDA_CHECK(cudaMemcpy(b.data(), buffer.data() + offset, n * sizeof(bf16), cudaMemcpyDeviceToHost));
    return to_float(b);
  }
};

std::vector<float> download(const DeviceBuffer<float>& d) { return d.download(); }

TEST(CudaCrossEntropy, VocabParallelShardsMatchTheCpu) {
  PX_REQUIRE_GPU();
  constexpr i64 kRows = 37, kVocab = 50257, kTp = 8;
  const std::vector<float> logits = round_bf16(uniform(kRows * kVocab, 1, -6.0f, 6.0f));
  const std::vector<std::int32_t> targets = random_targets(kRows, kVocab, 2);
  const std::vector<float> dloss = uniform(kRows, 3, 0.01f, 1.0f);
  const Reference ref = cpu_single_rank(logits, targets, dloss, kRows, kVocab);

  // Widths 6283, 6282, ...: one odd, the rest even but not multiples of 8, each on another offset.
  std::vector<i64> begin(kTp + 1, 0);
  for (i64 s = 0; s < kTp; ++s) begin[s + 1] = begin[s] + kVocab / kTp + (s < kVocab % kTp ? 1 : 0);
  ASSERT_EQ(begin[kTp], kVocab);
  std::vector<OffsetBf16> shard;
  for (i64 s = 0; s < kTp; ++s)
    shard.emplace_back(columns(logits, kRows, kVocab, begin[s], begin[s + 1] - begin[s]),
                       static_cast<std::size_t>(s % 5));
  const DeviceBuffer<std::int32_t> d_targets{std::span<const std::int32_t>(targets)};
  const DeviceBuffer<float> d_dloss{std::span<const float>(dloss)};
  DeviceBuffer<float> d_max(kRows), d_sum(kRows), d_tl(kRows), d_loss(kRows);

  // Phase 1 and the max all-reduce.
  std::vector<float> global_max(kRows, -INFINITY);
  for (i64 s = 0; s < kTp; ++s) {
    const i64 w = begin[s + 1] - begin[s];
    cross_entropy_row_max(shard[s].data(), d_max.data(), kRows, w, nullptr);
    const std::vector<float> m = download(d_max);
    std::vector<float> want(kRows);
    cpu::cross_entropy_row_max<float>(columns(logits, kRows, kVocab, begin[s], w), want, kRows, w);
    EXPECT_EQ(m, want) << "shard " << s;
    for (i64 r = 0; r < kRows; ++r) global_max[r] = std::max(global_max[r], m[r]);
  }
  EXPECT_EQ(global_max, ref.row_max);
  d_max.upload(global_max);

  // Phase 2 and the sum all-reduces (in fp32, shard order, as a ring of fp32 would add).
  std::vector<float> sum_exp(kRows, 0.0f), target_logit(kRows, 0.0f);
  for (i64 s = 0; s < kTp; ++s) {
    cross_entropy_partials(shard[s].data(), d_targets.data(), begin[s], d_max.data(), d_sum.data(), d_tl.data(), kRows,
                           begin[s + 1] - begin[s], nullptr);
    const std::vector<float> a = download(d_sum), b = download(d_tl);
    for (i64 r = 0; r < kRows; ++r) {
      sum_exp[r] += a[r];
      target_logit[r] += b[r];
    }
  }
  EXPECT_TRUE(close(sum_exp, ref.sum_exp, 1e-30, 1e-5));
  EXPECT_EQ(target_logit, ref.target_logit);
  d_sum.upload(sum_exp);
  d_tl.upload(target_logit);

  cross_entropy_loss(d_max.data(), d_sum.data(), d_tl.data(), d_loss.data(), kRows, nullptr);
  EXPECT_TRUE(close(download(d_loss), ref.loss, 2e-5, 1e-5));

  // Backward into a separate buffer whose offset matches the logits' on some shards (the vector
  // path) and not on others (all scalar).
  for (i64 s = 0; s < kTp; ++s) {
    SCOPED_TRACE(::testing::Message() << "shard " << s);
    const i64 w = begin[s + 1] - begin[s];
    OffsetBf16 d_dlogits(std::vector<float>(static_cast<std::size_t>(kRows * w), 7.0f),
                         static_cast<std::size_t>(s % 2));
    cross_entropy_backward(shard[s].data(), d_targets.data(), begin[s], d_max.data(), d_sum.data(), d_dloss.data(),
                           d_dlogits.data(), kRows, w, nullptr);
    EXPECT_TRUE(close(d_dlogits.download(static_cast<std::size_t>(kRows * w)),
                      columns(ref.dlogits, kRows, kVocab, begin[s], w), 1e-12, kBf16Ulp));
  }
  PX_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST(CudaCrossEntropy, ShardStatisticsGivenAGlobalMaxOutsideTheShard) {
  PX_REQUIRE_GPU();
  // Shard 3 of Llama 3's 128256-entry vocabulary over tp = 8: a multiple of 8 wide, 16-byte
  // aligned rows, so this is the vectorised path throughout.
  constexpr i64 kRows = 16, kCols = 128256 / 8, kBegin = 3 * kCols;
  const std::vector<float> logits = round_bf16(uniform(kRows * kCols, 4, -8.0f, 8.0f));
  std::vector<std::int32_t> targets = random_targets(kRows, 128256, 5);
  targets[0] = static_cast<std::int32_t>(kBegin);              // first column of the shard
  targets[1] = static_cast<std::int32_t>(kBegin + kCols - 1);  // last
  targets[2] = static_cast<std::int32_t>(kBegin - 1);          // just outside
  const std::vector<float> dloss = uniform(kRows, 6, 0.01f, 1.0f);

  // Another rank holds the row's largest logit and part of its exponential mass.
  std::vector<float> row_max(kRows), partial(kRows), target_logit(kRows), dlogits(logits.size());
  cpu::cross_entropy_row_max<float>(logits, row_max, kRows, kCols);
  for (float& m : row_max) m += 0.75f;
  cpu::cross_entropy_partials<float>(logits, targets, kBegin, row_max, partial, target_logit, kRows, kCols);
  std::vector<float> sum_exp = partial;
  for (float& s : sum_exp) s *= 1.5f;
  cpu::cross_entropy_backward<float>(logits, targets, kBegin, row_max, sum_exp, dloss, dlogits, kRows, kCols);

  OffsetBf16 d_logits(logits, 0);
  const DeviceBuffer<std::int32_t> d_targets{std::span<const std::int32_t>(targets)};
  const DeviceBuffer<float> d_dloss{std::span<const float>(dloss)};
  DeviceBuffer<float> d_max{std::span<const float>(row_max)}, d_sum(kRows), d_tl(kRows);
  cross_entropy_partials(d_logits.data(), d_targets.data(), kBegin, d_max.data(), d_sum.data(), d_tl.data(), kRows,
                         kCols, nullptr);
  EXPECT_TRUE(close(download(d_sum), partial, 1e-30, 1e-5));
  EXPECT_EQ(download(d_tl), target_logit);
  EXPECT_NE(target_logit[0], 0.0f);
  EXPECT_NE(target_logit[1], 0.0f);
  EXPECT_EQ(target_logit[2], 0.0f);

  d_sum.upload(sum_exp);
  OffsetBf16 d_dlogits(std::vector<float>(logits.size(), 7.0f), 0);
  cross_entropy_backward(d_logits.data(), d_targets.data(), kBegin, d_max.data(), d_sum.data(), d_dloss.data(),
                         d_dlogits.data(), kRows, kCols, nullptr);
  EXPECT_TRUE(close(d_dlogits.download(logits.size()), dlogits, 1e-12, kBf16Ulp));
}

TEST(CudaCrossEntropy, FusedSingleRankForwardAndInPlaceBackward) {
  PX_REQUIRE_GPU();
  constexpr i64 kRows = 37, kCols = 50257;
  std::vector<float> logits = uniform(kRows * kCols, 7, -6.0f, 6.0f);
  std::vector<std::int32_t> targets = random_targets(kRows, kCols, 8);
  // Spikes where the vector body cannot see them (first and last column: the scalar head and
  // tail), one on the target (p ~ 1, loss ~ 0), and one far enough up that most terms underflow.
  logits[0 * kCols + 0] = 30.0f;
  logits[1 * kCols + kCols - 1] = 30.0f;
  logits[2 * kCols + targets[2]] = 40.0f;
  logits[3 * kCols + 12345] = 120.0f;
  logits = round_bf16(logits);
  const std::vector<float> dloss = uniform(kRows, 9, 0.01f, 1.0f);
  const Reference ref = cpu_single_rank(logits, targets, dloss, kRows, kCols);

  OffsetBf16 d_logits(logits, 3);
  const DeviceBuffer<std::int32_t> d_targets{std::span<const std::int32_t>(targets)};
  const DeviceBuffer<float> d_dloss{std::span<const float>(dloss)};
  DeviceBuffer<float> d_max(kRows), d_sum(kRows), d_tl(kRows), d_loss(kRows);
  cross_entropy_forward_fused(d_logits.data(), d_targets.data(), d_max.data(), d_sum.data(), d_tl.data(), d_loss.data(),
                              kRows, kCols, nullptr);
  EXPECT_EQ(download(d_max), ref.row_max);
  EXPECT_EQ(download(d_tl), ref.target_logit);
  EXPECT_TRUE(close(download(d_sum), ref.sum_exp, 1e-30, 1e-5));
  EXPECT_TRUE(close(download(d_loss), ref.loss, 2e-5, 1e-5));

  // Null target_logit is allowed and changes nothing else.
  DeviceBuffer<float> d_loss2(kRows);
  cross_entropy_forward_fused(d_logits.data(), d_targets.data(), d_max.data(), d_sum.data(), nullptr, d_loss2.data(),
                              kRows, kCols, nullptr);
  EXPECT_EQ(download(d_loss2), download(d_loss));

  cross_entropy_backward(d_logits.data(), d_targets.data(), 0, d_max.data(), d_sum.data(), d_dloss.data(),
                         d_logits.data(), kRows, kCols, nullptr);
  // atol: the spiked-target row's p - 1 cancels to ~1e-13, against fp32 rounding of 1 / sum_exp.
  EXPECT_TRUE(close(d_logits.download(logits.size()), ref.dlogits, 1e-7, kBf16Ulp));
}

TEST(CudaCrossEntropy, DeterministicAndEmptyShapes) {
  PX_REQUIRE_GPU();
  constexpr i64 kRows = 9, kCols = 4099;
  const std::vector<float> logits = round_bf16(uniform(kRows * kCols, 10, -3.0f, 3.0f));
  const std::vector<std::int32_t> targets = random_targets(kRows, kCols, 11);
  OffsetBf16 d_logits(logits, 1);
  const DeviceBuffer<std::int32_t> d_targets{std::span<const std::int32_t>(targets)};
  DeviceBuffer<float> d_max(kRows), d_sum(kRows), d_tl(kRows), d_loss(kRows);
  std::vector<float> first;
  for (int run = 0; run < 3; ++run) {
    cross_entropy_row_max(d_logits.data(), d_max.data(), kRows, kCols, nullptr);
    cross_entropy_partials(d_logits.data(), d_targets.data(), 0, d_max.data(), d_sum.data(), d_tl.data(), kRows, kCols,
                           nullptr);
    const std::vector<float> s = download(d_sum);
    if (run == 0) first = s;
    EXPECT_EQ(s, first) << "run " << run;  // bitwise: fixed reduction order
  }
  // Zero rows launch nothing; zero columns give the empty-shard statistics.
  cross_entropy_row_max(d_logits.data(), d_max.data(), 0, kCols, nullptr);
  cross_entropy_row_max(d_logits.data(), d_max.data(), kRows, 0, nullptr);
  EXPECT_EQ(download(d_max), std::vector<float>(kRows, -INFINITY));
  d_max.upload(std::vector<float>(kRows, 1.0f));
  cross_entropy_partials(d_logits.data(), d_targets.data(), 0, d_max.data(), d_sum.data(), d_tl.data(), kRows, 0,
                         nullptr);
  EXPECT_EQ(download(d_sum), std::vector<float>(kRows, 0.0f));
  EXPECT_EQ(download(d_tl), std::vector<float>(kRows, 0.0f));
  PX_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace px::cuda
