// The cuBLASLt GEMMs (engine/backends/cuda/gemm.hpp) against the CPU kernels run in fp32 on the same
// bf16-rounded inputs: general GEMMs with every transpose and padded leading dimensions, strided
// batches, the three linear-layer GEMMs with their accumulate paths, the fused bias / GELU epilogue
// and its unfused fallback, the grouped expert GEMMs, the plan cache, and one large shape.
//
// Tolerances. Inputs are bf16, so every product is exact in fp32 and the CPU reference differs from
// the exact result only by its own fp32 summation error. The GPU result differs from the reference by
//   (1) rounding the output to bf16: round to nearest with 8 significant bits, at most 2^-8 of the
//       value; this is rtol for bf16 outputs; an fp32 output has none;
//   (2) a different fp32 summation order, on tensor cores that truncate while aligning addends: an
//       error of order 2^-23 per accumulation step relative to the running sum, i.e. a small
//       fraction of the typical output size sqrt(k) |a|max |b|max (uniform inputs: the sum of k
//       products of random sign). Relative to a value that cancels to near zero it is not small,
//       so it is an atol: 2^-12 sqrt(k) |a|max |b|max for bf16 outputs, where (1) dominates anyway,
//       and 2^-14 sqrt(k) |a|max |b|max (with rtol 2^-14) for fp32 outputs, still >10x the
//       estimate for the k of these tests.
// A layout or transpose mistake gives errors of the order of the values themselves, far outside.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "engine/backends/cpu/activation.hpp"
#include "engine/backends/cpu/gemm.hpp"
#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/backends/cuda/gemm.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px::cuda {
namespace {

using i64 = std::int64_t;
using Vec = std::vector<float>;

std::size_t sz(i64 v) { return static_cast<std::size_t>(v); }

// Uniform in [-1, 1) and rounded to bf16, so the CPU reads exactly what the GPU reads.
Vec random_bf16(i64 count, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Vec v(sz(count));
  for (float& x : v) x = dist(rng);
  return round_bf16(v);
}
Vec random_f32(i64 count, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Vec v(sz(count));
  for (float& x : v) x = dist(rng);
  return v;
}

DeviceBuffer<bf16> to_device_bf16(const Vec& v) {
  const std::vector<bf16> b = to_bf16(v);
  return DeviceBuffer<bf16>(std::span<const bf16>(b));
}
DeviceBuffer<float> to_device_f32(const Vec& v) { return DeviceBuffer<float>(std::span<const float>(v)); }

// Device output filled with NaN bytes (0xFFFF is a bf16 NaN, 0xFFFFFFFF an fp32 one), so an
// overwrite that reads its output, or an element nobody writes, shows.
template <class T>
DeviceBuffer<T> nan_buffer(i64 count) {
  DeviceBuffer<T> b(sz(count));
  PX_CUDA_CHECK(cudaMemset(b.data(), 0xFF, b.bytes()));
  return b;
}

Vec to_host(const DeviceBuffer<bf16>& d) {
  PX_CUDA_CHECK(cudaDeviceSynchronize());  // surfaces a kernel's execution error here, with its call
  const std::vector<bf16> h = d.download();
  return to_float(h);
}
Vec to_host(const DeviceBuffer<float>& d) {
  PX_CUDA_CHECK(cudaDeviceSynchronize());
  return d.download();
}

double amax(const Vec& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::abs(double(x)));
  return m;
}

struct Tol {
  double atol, rtol;
};
// See the file comment: (1) output rounding, (2) summation order, for a sum of k products.
Tol bf16_tol(i64 k, double amax_a, double amax_b) {
  return {std::ldexp(std::sqrt(double(std::max<i64>(k, 1))) * amax_a * amax_b, -12), std::ldexp(1.0, -8)};
}
Tol f32_tol(i64 k, double amax_a, double amax_b) {
  return {std::ldexp(std::sqrt(double(std::max<i64>(k, 1))) * amax_a * amax_b, -14), std::ldexp(1.0, -14)};
}
::testing::AssertionResult close(const Vec& got, const Vec& want, Tol t) { return test::close(got, want, t.atol, t.rtol); }

// ---------------------------------------------------------------------------------------------

constexpr i64 kM = 37, kN = 53, kK = 29;

// Stored rows x cols of op(X) = [rows x cols] row-major with leading dimension ld.
i64 stored_rows(bool trans, i64 rows, i64 cols) { return trans ? cols : rows; }
i64 stored_cols(bool trans, i64 rows, i64 cols) { return trans ? rows : cols; }

template <class C>
void check_general_gemm(bool ta, bool tb) {
  const i64 m = kM, n = kN, k = kK;
  const float alpha = 1.5f, beta = -0.5f;
  // Padded leading dimensions: an ld mistake reads or writes the padding.
  const i64 lda = stored_cols(ta, m, k) + 3, ldb = stored_cols(tb, k, n) + 5, ldc = n + 2;
  const Vec a = random_bf16(stored_rows(ta, m, k) * lda, 1), b = random_bf16(stored_rows(tb, k, n) * ldb, 2);
  Vec c = std::is_same_v<C, bf16> ? random_bf16(m * ldc, 3) : random_f32(m * ldc, 3);

  GemmContext ctx;
  const DeviceBuffer<bf16> da = to_device_bf16(a), db = to_device_bf16(b);
  DeviceBuffer<C> dc = [&] {
    if constexpr (std::is_same_v<C, bf16>)
      return to_device_bf16(c);
    else
      return to_device_f32(c);
  }();
  gemm(ctx, ta, tb, m, n, k, alpha, da.data(), lda, db.data(), ldb, beta, dc.data(), ldc);
  const Vec got = to_host(dc);

  cpu::gemm<float>(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);  // padding untouched
  const Tol t = std::is_same_v<C, bf16> ? bf16_tol(k, alpha, 1.0) : f32_tol(k, alpha, 1.0);
  EXPECT_TRUE(close(got, c, t)) << "trans_a " << ta << " trans_b " << tb;
}

TEST(CudaGemm, GemmEveryTransposeBf16Output) {
  PX_REQUIRE_GPU();
  for (bool ta : {false, true})
    for (bool tb : {false, true}) check_general_gemm<bf16>(ta, tb);
}

TEST(CudaGemm, GemmEveryTransposeFp32Output) {
  PX_REQUIRE_GPU();
  for (bool ta : {false, true})
    for (bool tb : {false, true}) check_general_gemm<float>(ta, tb);
}

TEST(CudaGemm, GemmBetaZeroOverwritesAndKZeroScales) {
  PX_REQUIRE_GPU();
  const i64 m = kM, n = kN, k = kK;
  const Vec a = random_bf16(m * k, 4), b = random_bf16(k * n, 5);
  GemmContext ctx;
  const DeviceBuffer<bf16> da = to_device_bf16(a), db = to_device_bf16(b);
  // beta == 0 must not read C: it holds NaNs.
  DeviceBuffer<bf16> dc = nan_buffer<bf16>(m * n);
  gemm(ctx, false, false, m, n, k, 1.0f, da.data(), k, db.data(), n, 0.0f, dc.data(), n);
  Vec want(sz(m * n));
  cpu::gemm<float>(false, false, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, want.data(), n);
  EXPECT_TRUE(close(to_host(dc), want, bf16_tol(k, 1, 1)));

  // k == 0: C = beta C exactly, and beta == 0 clears even NaNs.
  const Vec c0 = random_f32(m * n, 6);
  DeviceBuffer<float> dcf = to_device_f32(c0);
  gemm(ctx, false, false, m, n, 0, 1.0f, da.data(), 1, db.data(), n, 0.25f, dcf.data(), n);
  Vec scaled = c0;
  for (float& v : scaled) v *= 0.25f;
  EXPECT_TRUE(close(to_host(dcf), scaled, {1e-30, 0}));  // exact
  DeviceBuffer<float> dnan = nan_buffer<float>(m * n);
  gemm(ctx, false, false, m, n, 0, 1.0f, da.data(), 1, db.data(), n, 0.0f, dnan.data(), n);
  EXPECT_TRUE(close(to_host(dnan), Vec(sz(m * n), 0.0f), {1e-30, 0}));
}

TEST(CudaGemm, StridedBatchedGemm) {
  PX_REQUIRE_GPU();
  const i64 m = kM, n = kN, k = kK, batch = 3;
  for (auto [ta, tb] : {std::pair{false, false}, std::pair{false, true}, std::pair{true, false}}) {
    const i64 lda = stored_cols(ta, m, k), ldb = stored_cols(tb, k, n), ldc = n;
    // Strides larger than a matrix (with a gap of odd size) catch a stride taken as a matrix size.
    const i64 sa = stored_rows(ta, m, k) * lda + 7, sb = stored_rows(tb, k, n) * ldb + 3, sc = m * ldc + 5;
    const Vec a = random_bf16(batch * sa, 7), b = random_bf16(batch * sb, 8);
    Vec c_bf = random_bf16(batch * sc, 9);
    Vec c_f = random_f32(batch * sc, 10);
    GemmContext ctx;
    const DeviceBuffer<bf16> da = to_device_bf16(a), db = to_device_bf16(b);
    DeviceBuffer<bf16> dc_bf = to_device_bf16(c_bf);
    DeviceBuffer<float> dc_f = to_device_f32(c_f);
    gemm_strided_batched(ctx, ta, tb, m, n, k, 1.0f, da.data(), lda, sa, db.data(), ldb, sb, 1.0f, dc_bf.data(), ldc, sc, batch);
    gemm_strided_batched(ctx, ta, tb, m, n, k, 2.0f, da.data(), lda, sa, db.data(), ldb, sb, 0.5f, dc_f.data(), ldc, sc, batch);
    for (i64 e = 0; e < batch; ++e) {
      cpu::gemm<float>(ta, tb, m, n, k, 1.0f, a.data() + e * sa, lda, b.data() + e * sb, ldb, 1.0f, c_bf.data() + e * sc, ldc);
      cpu::gemm<float>(ta, tb, m, n, k, 2.0f, a.data() + e * sa, lda, b.data() + e * sb, ldb, 0.5f, c_f.data() + e * sc, ldc);
    }
    EXPECT_TRUE(close(to_host(dc_bf), c_bf, bf16_tol(k, 1, 1))) << "trans_a " << ta << " trans_b " << tb;
    EXPECT_TRUE(close(to_host(dc_f), c_f, f32_tol(k, 2, 1))) << "trans_a " << ta << " trans_b " << tb;
  }
}

TEST(CudaGemm, GemmOnPointersOffTheAllocationAlignment) {
  PX_REQUIRE_GPU();
  // Operands one or three elements into their allocations (2- and 6-byte aligned), as views into a
  // packed tensor can be: the plan must tell cuBLASLt's heuristic (which assumes 256 bytes).
  const i64 m = kM, n = kN, k = kK, oa = 1, ob = 3, oc = 1;
  const Vec a = random_bf16(oa + m * k, 60), b = random_bf16(ob + k * n, 61);
  Vec c = random_f32(oc + m * n, 62);
  GemmContext ctx;
  const DeviceBuffer<bf16> da = to_device_bf16(a), db = to_device_bf16(b);
  DeviceBuffer<float> dc = to_device_f32(c);
  DeviceBuffer<bf16> dc_bf = nan_buffer<bf16>(oc + m * n);
  gemm(ctx, false, false, m, n, k, 1.0f, da.data() + oa, k, db.data() + ob, n, 1.0f, dc.data() + oc, n);
  gemm(ctx, false, false, m, n, k, 1.0f, da.data() + oa, k, db.data() + ob, n, 0.0f, dc_bf.data() + oc, n);
  Vec want_bf(sz(m * n));
  cpu::gemm<float>(false, false, m, n, k, 1.0f, a.data() + oa, k, b.data() + ob, n, 0.0f, want_bf.data(), n);
  cpu::gemm<float>(false, false, m, n, k, 1.0f, a.data() + oa, k, b.data() + ob, n, 1.0f, c.data() + oc, n);
  EXPECT_TRUE(close(to_host(dc), c, f32_tol(k, 1, 1)));
  Vec got_bf = to_host(dc_bf);
  got_bf.erase(got_bf.begin(), got_bf.begin() + oc);
  EXPECT_TRUE(close(got_bf, want_bf, bf16_tol(k, 1, 1)));
}

// ---------------------------------------------------------------------------------------------

TEST(CudaGemm, LinearForwardWithAndWithoutBias) {
  PX_REQUIRE_GPU();
  const i64 m = kM, n = kN, k = kK;
  const Vec x = random_bf16(m * k, 11), w = random_bf16(k * n, 12), bias = random_bf16(n, 13);
  const DeviceBuffer<bf16> dx = to_device_bf16(x), dw = to_device_bf16(w), db = to_device_bf16(bias);
  for (bool fuse : {true, false}) {
    GemmContext ctx(nullptr, {.fuse_epilogues = fuse});
    for (bool with_bias : {false, true}) {
      DeviceBuffer<bf16> dy = nan_buffer<bf16>(m * n);
      linear_forward(ctx, dx.data(), dw.data(), with_bias ? db.data() : nullptr, dy.data(), m, n, k);
      Vec want(sz(m * n));
      cpu::linear_forward<float>(x, w, with_bias ? std::span<const float>(bias) : std::span<const float>(), want, m, n, k);
      EXPECT_TRUE(close(to_host(dy), want, bf16_tol(k, 1, 1))) << "fuse " << fuse << " bias " << with_bias;
    }
  }
}

// y and the saved pre-activation of act(x w + b) against the CPU's linear_forward + gelu_forward.
void check_gelu_forward(bool fuse, i64 n, bool with_bias, bool save) {
  const i64 m = kM, k = kK;
  const Vec x = random_bf16(m * k, 14), w = random_bf16(k * n, 15), bias = random_bf16(n, 16);
  GemmContext ctx(nullptr, {.fuse_epilogues = fuse});
  const DeviceBuffer<bf16> dx = to_device_bf16(x), dw = to_device_bf16(w), db = to_device_bf16(bias);
  DeviceBuffer<bf16> dy = nan_buffer<bf16>(m * n), dpre = nan_buffer<bf16>(m * n);
  linear_forward(ctx, dx.data(), dw.data(), with_bias ? db.data() : nullptr, dy.data(), m, n, k, Activation::Gelu,
                 save ? dpre.data() : nullptr);

  Vec pre(sz(m * n)), want(sz(m * n));
  cpu::linear_forward<float>(x, w, with_bias ? std::span<const float>(bias) : std::span<const float>(), pre, m, n, k);
  cpu::gelu_forward<float>(pre, want);
  const std::string what = "fuse " + std::to_string(fuse) + " n " + std::to_string(n) + " bias " + std::to_string(with_bias) +
                           " save " + std::to_string(save);
  // The pre-activation is a GEMM output like any other (the bias adds exactly representable values).
  const Tol pre_tol = bf16_tol(k, 1, 1);
  if (save) {
    EXPECT_TRUE(close(to_host(dpre), pre, pre_tol)) << what;
  }
  // gelu(v + d) - gelu(v) for the pre-activation's error d: |gelu'| <= 1.13 and, for v > 0,
  // v gelu'(v) / gelu(v) < 1.3, so d's relative part (2^-8 on the unfused path, where GELU reads the
  // bf16 pre-activation) stays under 1.3 2^-8 relative for v > 0 and under |v gelu'(v)| 2^-8 <
  // 0.2 2^-8 absolute for v < 0. Plus y's own rounding (2^-8) and, should the epilogue use a fast
  // tanh (relative error 2^-11), 0.5 |v| 2^-11 absolute.
  const Tol y_tol{1.2 * pre_tol.atol + std::ldexp(0.25, -8) + std::ldexp(amax(pre), -11), 2.5 * std::ldexp(1.0, -8)};
  EXPECT_TRUE(close(to_host(dy), want, y_tol)) << what;

  const GemmStats s = ctx.stats();
  // cuBLASLt's aux buffer needs a leading dimension divisible by 8; otherwise the unfused path runs.
  const bool expect_fused = fuse && (!save || n % 8 == 0);
  EXPECT_EQ(s.fused_epilogues, expect_fused ? 1u : 0u) << what << " (cuBLASLt declined the fused epilogue?)";
  EXPECT_EQ(s.fused_epilogues + s.unfused_epilogues, 1u) << what;
}

TEST(CudaGemm, LinearForwardGeluEpilogue) {
  PX_REQUIRE_GPU();
  for (bool fuse : {true, false})
    for (i64 n : {i64{56}, kN})
      for (bool with_bias : {true, false})
        for (bool save : {true, false}) check_gelu_forward(fuse, n, with_bias, save);
}

TEST(CudaGemm, LinearBackwardInputOverwritesOrAccumulates) {
  PX_REQUIRE_GPU();
  const i64 m = kM, n = kN, k = kK;
  const Vec dy = random_bf16(m * n, 17), w = random_bf16(k * n, 18), dx0 = random_bf16(m * k, 19);
  GemmContext ctx;
  const DeviceBuffer<bf16> ddy = to_device_bf16(dy), dw = to_device_bf16(w);
  // The reduction is over n, the layer's outputs.
  DeviceBuffer<bf16> ddx = nan_buffer<bf16>(m * k);
  linear_backward_input(ctx, ddy.data(), dw.data(), ddx.data(), m, n, k);
  Vec want(sz(m * k));
  cpu::linear_backward_input<float>(dy, w, want, m, n, k);
  EXPECT_TRUE(close(to_host(ddx), want, bf16_tol(n, 1, 1)));

  DeviceBuffer<bf16> dacc = to_device_bf16(dx0);
  linear_backward_input(ctx, ddy.data(), dw.data(), dacc.data(), m, n, k, true);
  Vec acc = dx0;
  cpu::linear_backward_input<float>(dy, w, acc, m, n, k, true);
  EXPECT_TRUE(close(to_host(dacc), acc, bf16_tol(n, 1, 1)));
}

void check_backward_weight(i64 m, i64 n, i64 k, std::uint64_t seed) {
  const Vec x = random_bf16(m * k, seed), dy = random_bf16(m * n, seed + 1);
  Vec dw = random_f32(k * n, seed + 2), dbias = random_f32(n, seed + 3);
  GemmContext ctx;
  const DeviceBuffer<bf16> dx = to_device_bf16(x), ddy = to_device_bf16(dy);
  DeviceBuffer<float> ddw = to_device_f32(dw), ddb = to_device_f32(dbias);
  // Twice, as two micro-batches accumulate into one gradient.
  for (int step = 0; step < 2; ++step) {
    linear_backward_weight(ctx, dx.data(), ddy.data(), ddw.data(), ddb.data(), m, n, k);
    cpu::linear_backward_weight<float>(x, dy, dw, dbias, m, n, k);
  }
  // The reduction is over m, the tokens; twice over.
  EXPECT_TRUE(close(to_host(ddw), dw, f32_tol(2 * m, 1, 1))) << "m " << m << " n " << n << " k " << k;
  EXPECT_TRUE(close(to_host(ddb), dbias, f32_tol(2 * m, 1, 1))) << "m " << m << " n " << n << " k " << k;
}

TEST(CudaGemm, LinearBackwardWeightAccumulatesInFp32) {
  PX_REQUIRE_GPU();
  check_backward_weight(kM, kN, kK, 20);
  // Enough rows that the bias-gradient sums split into row chunks added by a second kernel.
  check_backward_weight(3000, 70, kK, 24);
}

TEST(CudaGemm, GroupedExpertsStridedBatched) {
  PX_REQUIRE_GPU();
  // E experts of `slots` rows each, stored back to back, weights and biases stacked.
  const i64 E = 3, slots = kM, n = 56, k = kK;
  const Vec x = random_bf16(E * slots * k, 30), w = random_bf16(E * k * n, 31), bias = random_bf16(E * n, 32);
  const Vec dy = random_bf16(E * slots * n, 33);
  Vec dw = random_f32(E * k * n, 34), dbias = random_f32(E * n, 35);
  GemmContext ctx;
  const DeviceBuffer<bf16> dx_in = to_device_bf16(x), dw_in = to_device_bf16(w), db_in = to_device_bf16(bias);
  const DeviceBuffer<bf16> ddy = to_device_bf16(dy);
  DeviceBuffer<bf16> dy_out = nan_buffer<bf16>(E * slots * n), dpre = nan_buffer<bf16>(E * slots * n);
  DeviceBuffer<bf16> ddx = nan_buffer<bf16>(E * slots * k);
  DeviceBuffer<float> ddw = to_device_f32(dw), ddb = to_device_f32(dbias);
  linear_forward_batched(ctx, dx_in.data(), dw_in.data(), db_in.data(), dy_out.data(), slots, n, k, E, Activation::Gelu,
                         dpre.data());
  linear_backward_input_batched(ctx, ddy.data(), dw_in.data(), ddx.data(), slots, n, k, E);
  linear_backward_weight_batched(ctx, dx_in.data(), ddy.data(), ddw.data(), ddb.data(), slots, n, k, E);

  Vec pre(sz(E * slots * n)), y(sz(E * slots * n)), dx(sz(E * slots * k));
  const auto part = [](auto& v, i64 e, i64 size) { return std::span(v).subspan(sz(e * size), sz(size)); };
  for (i64 e = 0; e < E; ++e) {
    cpu::linear_forward<float>(part(x, e, slots * k), part(w, e, k * n), part(bias, e, n), part(pre, e, slots * n), slots, n, k);
    cpu::linear_backward_input<float>(part(dy, e, slots * n), part(w, e, k * n), part(dx, e, slots * k), slots, n, k);
    cpu::linear_backward_weight<float>(part(x, e, slots * k), part(dy, e, slots * n), part(dw, e, k * n), part(dbias, e, n), slots,
                                       n, k);
  }
  cpu::gelu_forward<float>(pre, y);
  const Tol pre_tol = bf16_tol(k, 1, 1);
  EXPECT_TRUE(close(to_host(dpre), pre, pre_tol));
  EXPECT_TRUE(close(to_host(dy_out), y, {1.2 * pre_tol.atol + std::ldexp(0.25, -8) + std::ldexp(amax(pre), -11),
                                         2.5 * std::ldexp(1.0, -8)}));
  EXPECT_TRUE(close(to_host(ddx), dx, bf16_tol(n, 1, 1)));
  EXPECT_TRUE(close(to_host(ddw), dw, f32_tol(slots, 1, 1)));
  EXPECT_TRUE(close(to_host(ddb), dbias, f32_tol(slots, 1, 1)));
}

TEST(CudaGemm, PlanCacheRunsTheHeuristicOncePerShape) {
  PX_REQUIRE_GPU();
  const i64 m = 64, n = 128, k = 96;
  const Vec x = random_bf16(m * k, 40), w = random_bf16(k * n, 41), bias = random_bf16(n, 42);
  GemmContext ctx;
  const DeviceBuffer<bf16> dx = to_device_bf16(x), dw = to_device_bf16(w), db = to_device_bf16(bias);
  // Fresh allocations each time: other addresses, the same (256-byte) alignment, so the same plans.
  GemmStats first;
  for (int i = 0; i < 3; ++i) {
    DeviceBuffer<bf16> dy(sz(m * n)), dgrad(sz(m * k));
    linear_forward(ctx, dx.data(), dw.data(), db.data(), dy.data(), m, n, k);
    linear_backward_input(ctx, dy.data(), dw.data(), dgrad.data(), m, n, k);
    PX_CUDA_CHECK(cudaDeviceSynchronize());  // before the buffers go
    if (i == 0) first = ctx.stats();
  }
  const GemmStats s = ctx.stats();
  EXPECT_GE(first.heuristic_calls, 2u);  // forward (fused, or declined and then plain) and backward
  EXPECT_EQ(s.heuristic_calls, first.heuristic_calls);
  EXPECT_EQ(s.plans, first.plans);
}

TEST(CudaGemm, LargeLinearForwardAndWeightGradient) {
  PX_REQUIRE_GPU();
  GemmContext ctx;
  {
    const i64 m = 2048, n = 4096, k = 1024;
    const Vec x = random_bf16(m * k, 50), w = random_bf16(k * n, 51), bias = random_bf16(n, 52);
    const DeviceBuffer<bf16> dx = to_device_bf16(x), dw = to_device_bf16(w), db = to_device_bf16(bias);
    DeviceBuffer<bf16> dy = nan_buffer<bf16>(m * n);
    linear_forward(ctx, dx.data(), dw.data(), db.data(), dy.data(), m, n, k);
    Vec want(sz(m * n));
    cpu::linear_forward<float>(x, w, bias, want, m, n, k);
    EXPECT_TRUE(close(to_host(dy), want, bf16_tol(k, 1, 1)));
  }
  {
    // A long reduction (over 4096 tokens) into fp32, where split-k algorithms are candidates.
    const i64 m = 4096, n = 512, k = 256;
    const Vec x = random_bf16(m * k, 53), dy = random_bf16(m * n, 54);
    Vec dw = random_f32(k * n, 55), dbias(sz(n), 0.0f);
    const DeviceBuffer<bf16> dx = to_device_bf16(x), ddy = to_device_bf16(dy);
    DeviceBuffer<float> ddw = to_device_f32(dw), ddb = to_device_f32(dbias);
    linear_backward_weight(ctx, dx.data(), ddy.data(), ddw.data(), ddb.data(), m, n, k);
    cpu::linear_backward_weight<float>(x, dy, dw, dbias, m, n, k);
    EXPECT_TRUE(close(to_host(ddw), dw, f32_tol(m, 1, 1)));
    EXPECT_TRUE(close(to_host(ddb), dbias, f32_tol(m, 1, 1)));
  }
  EXPECT_EQ(ctx.stats().low_precision_reductions, 0u);
}

}  // namespace
}  // namespace px::cuda
