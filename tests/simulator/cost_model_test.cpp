// The GEMM curve against its closed forms: whole tiles in whole waves reach the asymptote times the
// pipeline fill, one tile past a wave costs a second wave, padding and short K cost what they waste,
// a batch's tiles share the waves, too few tiles split K, attention is never faster than its
// matmuls, and GEMMs the curve cannot cost fall back to the flat efficiency; GPU specs read and
// check its fields. Then the dataset GPUs' curves against published GEMMs they were not derived from.
#include <gtest/gtest.h>

#include <cmath>

#include "engine/core/error.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "simulator/cost_model.hpp"

namespace px::sim {
namespace {

// An A100-like GPU whose measurement is one wave of whole 256x128 tiles, and whose memory is fast
// enough that no test shape is memory-bound.
GpuSpec test_gpu() {
  GpuSpec g;
  g.name = "test-gpu";
  g.peak_bf16_tflops = g.peak_fp16_tflops = 312;
  g.peak_fp32_tflops = 19.5;
  g.hbm_gib = 80;
  g.hbm_bandwidth_gbs = 1e9;
  g.sms = 108;
  g.gemm_measured = {270, 256 * 12, 128 * 9, 8192};  // 108 tiles of 256x128
  return g;
}

// One tile shape and no split-K: the closed forms of tile and wave quantization alone.
CostModelOptions one_tile() {
  CostModelOptions o;
  o.gemm_tiles = {{256, 128}};
  o.gemm_split_k = false;
  return o;
}

Op gemm(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t batch = 1, DType dtype = DType::BF16) {
  Op op;
  op.kind = OpKind::Gemm;
  op.dtype = dtype;
  op.m = m;
  op.n = n;
  op.k = k;
  op.batch = batch;
  op.flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) * static_cast<double>(batch);
  op.bytes_read = 2 * (m * k + k * n) * batch;
  op.bytes_written = 2 * m * n * batch;
  return op;
}

double fill(double k) { return k / (k + CostModelOptions{}.gemm_fill_k); }

TEST(GemmCurve, WholeTilesInWholeWavesReachTheAsymptote) {
  const CostModel c(test_gpu(), NodeSpec{}, one_tile());
  // The measurement's shape has no padding and no idle SM: only its fill is divided out.
  EXPECT_NEAR(c.gemm_asymptote(), 270.0 / 312.0 / fill(8192), 1e-12);
  EXPECT_NEAR(c.gemm_efficiency(256 * 12, 128 * 9, 8192), 270.0 / 312.0, 1e-12);
  // Three whole waves with K long enough for the fill to vanish: the asymptote.
  const std::int64_t k = std::int64_t{1} << 24;
  EXPECT_NEAR(c.gemm_efficiency(256 * 27, 128 * 12, k), c.gemm_asymptote() * fill(static_cast<double>(k)), 1e-12);
  EXPECT_NEAR(c.gemm_efficiency(256 * 27, 128 * 12, k), c.gemm_asymptote(), 1e-5);
}

TEST(GemmCurve, OneTilePastAFullWaveCostsASecondWave) {
  const CostModel c(test_gpu(), NodeSpec{}, one_tile());
  const OpCost full = c.cost(gemm(256 * 108, 128, 4096));  // 108 tiles: one wave
  const OpCost over = c.cost(gemm(256 * 109, 128, 4096));  // 109 tiles: two waves, the second 1/108 busy
  EXPECT_EQ(full.model, "gemm-curve");
  const double launch = CostModelOptions{}.launch_overhead_s;
  EXPECT_NEAR((over.seconds - launch) / (full.seconds - launch), 2.0, 1e-12);
  EXPECT_NEAR(c.gemm_efficiency(256 * 109, 128, 4096) / c.gemm_efficiency(256 * 108, 128, 4096), 109.0 / 216.0, 1e-12);
  // With the smaller tile to choose from, the spill is cheaper than a second full wave, never dearer.
  const CostModel any(test_gpu(), NodeSpec{});
  const double ratio = (any.cost(gemm(256 * 109, 128, 4096)).seconds - launch) / (any.cost(gemm(256 * 108, 128, 4096)).seconds - launch);
  EXPECT_GT(ratio, 1.0);
  EXPECT_LT(ratio, 2.0);
}

TEST(GemmCurve, PaddingAndShortKCostWhatTheyWaste) {
  const CostModel c(test_gpu(), NodeSpec{}, one_tile());
  // 257 rows need two 256-row tiles (the rest of the wave idle either way).
  EXPECT_NEAR(c.gemm_efficiency(257, 128, 8192) / c.gemm_efficiency(512, 128, 8192), 257.0 / 512.0, 1e-12);
  // Short K pays the pipeline's fill and drain: per FLOP, K = 128 is about twice as dear as long K.
  const double k128 = c.gemm_efficiency(256 * 12, 128 * 9, 128);
  const double k768 = c.gemm_efficiency(256 * 12, 128 * 9, 768);
  const double k8192 = c.gemm_efficiency(256 * 12, 128 * 9, 8192);
  EXPECT_NEAR(k128 / k8192, fill(128) / fill(8192), 1e-12);
  EXPECT_NEAR(k128 / k8192, 0.5 / fill(8192), 1e-12);
  EXPECT_LT(k128, k768);
  EXPECT_LT(k768, k8192);
}

TEST(GemmCurve, ABatchsTilesShareTheWaves) {
  const CostModel c(test_gpu(), NodeSpec{}, one_tile());
  // 108 experts of one tile each fill one wave, as one GEMM of 108 tiles does.
  EXPECT_NEAR(c.gemm_efficiency(256, 128, 4096, 108), c.gemm_efficiency(256 * 108, 128, 4096), 1e-12);
  EXPECT_NEAR(c.gemm_efficiency(256 * 54, 128, 4096, 2), c.gemm_efficiency(256 * 108, 128, 4096), 1e-12);
  // One expert alone keeps 107 SMs idle.
  EXPECT_NEAR(c.gemm_efficiency(256, 128, 4096, 1) / c.gemm_efficiency(256, 128, 4096, 108), 1.0 / 108, 1e-12);
}

TEST(GemmCurve, TooFewTilesForAWaveSplitK) {
  CostModelOptions split = one_tile();
  split.gemm_split_k = true;
  const CostModel c(test_gpu(), NodeSpec{}, split);
  const CostModel whole(test_gpu(), NodeSpec{}, one_tile());
  // One tile's 16,384 K slices spread over all 108 SMs, each paying one fill (the partials' traffic
  // is all but nil on this GPU's memory).
  const std::int64_t k = std::int64_t{1} << 20;
  const double kk = static_cast<double>(k);
  const double per_sm = std::ceil(16384.0 / 108) * 64;
  EXPECT_NEAR(c.gemm_efficiency(256, 128, k), c.gemm_asymptote() * kk / (108 * (per_sm + CostModelOptions{}.gemm_fill_k)), 1e-6);
  EXPECT_NEAR(whole.gemm_efficiency(256, 128, k), c.gemm_asymptote() * fill(kk) / 108, 1e-12);
  // One slice of K cannot be split.
  EXPECT_DOUBLE_EQ(c.gemm_efficiency(256, 128, 64), whole.gemm_efficiency(256, 128, 64));
  // A wave's worth of tiles or more is never split.
  EXPECT_DOUBLE_EQ(c.gemm_efficiency(256 * 109, 128, k), whole.gemm_efficiency(256 * 109, 128, k));
}

TEST(GemmCurve, AttentionIsNeverFasterThanItsMatmuls) {
  const CostModel c(test_gpu(), NodeSpec{});
  const double peak = 312e12;
  Op att;
  att.kind = OpKind::AttentionCore;
  att.dtype = DType::BF16;
  // One head of 128 queries: one tile per GEMM, 107 SMs idle; far below the flat 50%.
  att.m = 128, att.n = 128, att.k = 128, att.batch = 1;
  att.flops = 4.0 * 128 * 128 * 128;  // q k^T and p v
  const OpCost small = c.cost(att);
  EXPECT_EQ(small.model, "gemm-curve");
  const double one = att.flops / 2;
  const double expected = one / (peak * c.gemm_efficiency(128, 128, 128)) + one / (peak * c.gemm_efficiency(128, 128, 128));
  EXPECT_NEAR(small.seconds - CostModelOptions{}.launch_overhead_s, expected, 1e-15);
  // Backward: four matmuls, one of the scores' shape (queries x keys over the head dim), three of the values'.
  att.m = 2048, att.n = 2048, att.k = 128, att.batch = 1;
  att.flops = 2.0 * 4.0 * 2048 * 2048 * 128;
  const double bwd_one = att.flops / 4;
  const double bwd = bwd_one / (peak * c.gemm_efficiency(2048, 2048, 128)) + 3 * bwd_one / (peak * c.gemm_efficiency(2048, 128, 2048));
  EXPECT_NEAR(c.cost(att).seconds - CostModelOptions{}.launch_overhead_s, std::max(bwd, att.flops / (peak * 0.5)), 1e-15);
  // Many heads of long sequences: the fused kernel's stated efficiency is the slower, so it holds.
  att.batch = 64;
  att.flops = 4.0 * 64 * 2048 * 2048 * 128;
  const OpCost big = c.cost(att);
  EXPECT_EQ(big.model, "roofline-compute");
  EXPECT_NEAR(big.seconds - CostModelOptions{}.launch_overhead_s, att.flops / (peak * 0.5), 1e-15);
}

TEST(GemmCurve, UnfusedAttentionAddsItsScoreTrafficToItsMatmuls) {
  // Separate kernels run one after another: the batched GEMMs' time plus the score passes' bytes
  // at the memory efficiency, not the larger of the two.
  GpuSpec gpu = test_gpu();
  gpu.hbm_bandwidth_gbs = 2000;
  const CostModel c(gpu, NodeSpec{});
  Op att;
  att.kind = OpKind::AttentionCore;
  att.variant = Variant::AttentionUnfused;
  att.dtype = DType::BF16;
  att.m = 2048, att.n = 2048, att.k = 128, att.batch = 32;
  att.flops = 4.0 * 32 * 2048 * 2048 * 128;
  att.bytes_read = (3 * 2 + 0) * std::int64_t{32} * 2048 * 2048;
  att.bytes_written = (3 * 2 + 1) * std::int64_t{32} * 2048 * 2048;
  const double gemms = att.flops / 2 / (312e12 * c.gemm_efficiency(2048, 2048, 128, 32)) +
                       att.flops / 2 / (312e12 * c.gemm_efficiency(2048, 128, 2048, 32));
  const double memory = static_cast<double>(att.bytes_read + att.bytes_written) / (2000e9 * CostModelOptions{}.memory_efficiency);
  const OpCost cost = c.cost(att);
  EXPECT_EQ(cost.model, "gemm-curve+memory");
  EXPECT_NEAR(cost.seconds - CostModelOptions{}.launch_overhead_s, gemms + memory, 1e-12);
  EXPECT_GT(memory, 0.5 * gemms);  // at these shapes the passes are no rounding error
}

TEST(GemmCurve, FallsBackToTheFlatEfficiencyWhereItCannotApply) {
  const double launch = CostModelOptions{}.launch_overhead_s;
  const Op op = gemm(4096, 4096, 4096);
  // A GPU spec without SMs or without a measurement.
  GpuSpec no_sms = test_gpu();
  no_sms.sms = 0;
  GpuSpec no_measurement = test_gpu();
  no_measurement.gemm_measured = {};
  for (const GpuSpec& g : {no_sms, no_measurement}) {
    const CostModel c(g, NodeSpec{});
    EXPECT_EQ(c.gemm_asymptote(), 0.0);
    EXPECT_EQ(c.cost(op).model, "roofline-compute");
    EXPECT_NEAR(c.cost(op).seconds, launch + op.flops / (312e12 * 0.70), 1e-15);
  }
  const CostModel c(test_gpu(), NodeSpec{});
  EXPECT_EQ(c.cost(op).model, "gemm-curve");
  // An op without a shape, and fp32 (CUDA cores, not the measured tensor-core path).
  Op shapeless = op;
  shapeless.m = 0;
  EXPECT_EQ(c.cost(shapeless).model, "roofline-compute");
  EXPECT_NEAR(c.cost(shapeless).seconds, launch + op.flops / (312e12 * 0.70), 1e-15);
  const Op fp32 = gemm(4096, 4096, 4096, 1, DType::F32);
  EXPECT_EQ(c.cost(fp32).model, "roofline-compute");
  EXPECT_NEAR(c.cost(fp32).seconds, launch + op.flops / (19.5e12 * 0.70), 1e-15);
  // A memory-bound GEMM stays on the bandwidth roofline: eight rows against an 8192^2 weight, its
  // 64 tiles split over the SMs, stream the weight at HBM speed.
  GpuSpec slow_memory = test_gpu();
  slow_memory.hbm_bandwidth_gbs = 2039;
  EXPECT_EQ(CostModel(slow_memory, NodeSpec{}).cost(gemm(8, 8192, 8192)).model, "roofline-memory");
}

TEST(GemmCurve, GpuSpecsReadAndCheckTheCurvesFields) {
  const std::string base =
      "name: g\nsource: s\npeak_bf16_tflops: 312\npeak_fp16_tflops: 312\npeak_fp8_tflops: 0\n"
      "peak_fp32_tflops: 19.5\nhbm_gib: 80\nhbm_bandwidth_gbs: 2039\nnvlink_bandwidth_gbs: 300\n";
  const GpuSpec without = parse_gpu_yaml(base, "gpu.yaml");  // both optional
  EXPECT_EQ(without.sms, 0);
  EXPECT_EQ(without.gemm_measured.tflops, 0.0);
  validate_gpu(without);
  const GpuSpec with = parse_gpu_yaml(base + "sms: 108\ngemm_measured: {tflops: 271.2, m: 1024, n: 10240, k: 5120}\n", "gpu.yaml");
  EXPECT_EQ(with.sms, 108);
  EXPECT_EQ(with.gemm_measured.tflops, 271.2);
  EXPECT_EQ(with.gemm_measured.n, 10240);
  validate_gpu(with);
  // A rate above the dense peak is a sparsity or fp8 figure; a shape is part of the measurement.
  EXPECT_THROW(validate_gpu(parse_gpu_yaml(base + "gemm_measured: {tflops: 624, m: 1, n: 1, k: 1}\n", "gpu.yaml")), Error);
  EXPECT_THROW(parse_gpu_yaml(base + "gemm_measured: {tflops: 271.2}\n", "gpu.yaml"), Error);
  EXPECT_THROW(validate_gpu(parse_gpu_yaml(base + "sms: -1\n", "gpu.yaml")), Error);
}

// The dataset GPUs' curves, each derived from one published measurement, against others.
TEST(GemmCurve, DatasetGpusMatchPublishedGemmsTheyWereNotDerivedFrom) {
  const SpecCatalog cat(PX_DATASETS_DIR);
  const auto tflops = [](const GpuSpec& g, std::int64_t m, std::int64_t n, std::int64_t k) {
    return CostModel(g, NodeSpec{}).gemm_efficiency(m, n, k) * g.peak_bf16_tflops;
  };
  const GpuSpec a100 = cat.gpu("a100-sxm-80gb");
  const GpuSpec h100 = cat.gpu("h100-sxm");
  ASSERT_EQ(a100.sms, 108);
  ASSERT_EQ(h100.sms, 132);
  ASSERT_EQ(cat.gpu("h200-sxm").sms, 132);
  // Each reproduces its own measurement.
  EXPECT_NEAR(tflops(a100, 1024, 10240, 5120), 271.2, 1e-9);
  EXPECT_NEAR(tflops(h100, 2048, 2048, 13312), 794.5, 1e-9);
  // H100 bf16 8192^3, measured with PyTorch on this project's H100 machine: 770-800 TFLOP/s
  // (/work/shared/REFERENCE.md).
  EXPECT_GE(tflops(h100, 8192, 8192, 8192), 770);
  EXPECT_LE(tflops(h100, 8192, 8192, 8192), 800);
  // The same table's earlier best shapes (CUDA 12.1, L2 not flushed): A100 267.9 at 6912x2048x16384,
  // H100 792.1 at 6144x2816x17920; the curve is 4% above both.
  EXPECT_NEAR(tflops(a100, 6912, 2048, 16384) / 267.9, 1.0, 0.05);
  EXPECT_NEAR(tflops(h100, 6144, 2816, 17920) / 792.1, 1.0, 0.05);
}

}  // namespace
}  // namespace px::sim
