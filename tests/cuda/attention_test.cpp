// Fused GPU attention against the CPU reference (px::cpu::attention_*, fp32 on the bf16-rounded
// inputs the GPU reads): one block for MHA, GQA and MQA, 1 to 3 sequences, lengths that are not a
// multiple of the tile, every head-dim path; packed and padded strided views; key/value blocks
// folded in sequence as ring attention does, with global positions, fully masked blocks and the
// bf16 copy of the final out; and the backward adding onto gradients already there.
//
// Tolerances. q, k, v, dout are exact bf16 on both sides and every product accumulates in fp32,
// so the differences come from the two places the GPU rounds an fp32 value to bf16 for a tensor
// core operand: P before P v and P^T dout, and dS before dS k and dS^T q, each 2^-9 relative.
// - out: sum_t bf16(p_t) v_t / sum_t p_t is off by at most 2^-9 max|v| = 3.9e-3 for |v| <= 2;
//   atol 5e-3.
// - lse: fp32 throughout (scores, max, sum); atol 1e-4 on values of a few units.
// - dq, dk, dv: sums over up to 1024 rounded terms of both signs, whose errors grow like a random
//   walk while single elements can cancel to near zero, so the bound is on the scale of the
//   gradient: atol 1e-2 max|grad|, rtol 1e-2; a host emulation of these kernels peaked at a
//   quarter of that over every case here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

#include "engine/backends/cpu/attention.hpp"
#include "engine/backends/cuda/attention.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px {
namespace {

using cuda::bf16;
using cuda::DeviceBuffer;

constexpr double kOutAtol = 5e-3, kLseAtol = 1e-4, kGradRel = 1e-2;

// One micro-batch of packed rows, row s * b + j = [Q | K | V] of position s of sequence j.
struct Case {
  std::int64_t b, heads, groups, d, s;
  std::int64_t ld() const { return (heads + 2 * groups) * d; }
  std::int64_t k_col() const { return heads * d; }
  std::int64_t v_col() const { return (heads + groups) * d; }
  std::size_t qkv_size() const { return static_cast<std::size_t>(s * b * ld()); }
  std::size_t out_size(std::int64_t sq) const { return static_cast<std::size_t>(sq * b * heads * d); }
  std::size_t lse_size(std::int64_t sq) const { return static_cast<std::size_t>(b * heads * sq); }
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << "b " << c.b << ", heads " << c.heads << ", groups " << c.groups << ", d " << c.d << ", s " << c.s;
}

const Case kCases[] = {
    {1, 8, 8, 64, 1},   {2, 8, 2, 64, 17},   {3, 8, 1, 32, 100}, {1, 8, 2, 80, 257}, {2, 8, 8, 128, 100},
    {1, 8, 1, 128, 257}, {2, 8, 2, 32, 257}, {3, 8, 8, 80, 17},  {2, 8, 2, 48, 65},  {1, 4, 2, 256, 70},
    {1, 2, 1, 200, 40},  {1, 4, 2, 128, 1024},
};

// Uniform in [lo, hi], rounded to bf16: the values a bf16 tensor holds, used by both sides.
std::vector<float> random_bf16(std::size_t n, unsigned seed, float lo, float hi) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(gen);
  return cuda::round_bf16(x);
}

std::vector<float> columns(std::span<const float> m, std::int64_t rows, std::int64_t ld, std::int64_t c0,
                           std::int64_t n) {
  std::vector<float> out;
  out.reserve(static_cast<std::size_t>(rows * n));
  for (std::int64_t r = 0; r < rows; ++r)
    out.insert(out.end(), m.begin() + r * ld + c0, m.begin() + r * ld + c0 + n);
  return out;
}

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

// dq, dk and dv of packed fp32 [dQ | dK | dV] rows, each against the reference within the scale
// of what the backward added to the initial values.
void expect_grads_close(const Case& c, std::span<const float> got, std::span<const float> want,
                        std::span<const float> init) {
  const std::int64_t rows = c.s * c.b;
  const std::pair<std::int64_t, std::int64_t> parts[] = {
      {0, c.heads * c.d}, {c.k_col(), c.groups * c.d}, {c.v_col(), c.groups * c.d}};
  const char* names[] = {"dq", "dk", "dv"};
  for (int p = 0; p < 3; ++p) {
    const auto g = columns(got, rows, c.ld(), parts[p].first, parts[p].second);
    const auto w = columns(want, rows, c.ld(), parts[p].first, parts[p].second);
    const auto i = columns(init, rows, c.ld(), parts[p].first, parts[p].second);
    const double scale = max_abs_diff(w, i);
    EXPECT_TRUE(test::close(g, w, kGradRel * scale + 1e-6, kGradRel)) << names[p];
  }
}

// lse within kLseAtol, where a query that sees no key must get exactly -inf on both sides.
::testing::AssertionResult lse_close(std::span<const float> got, std::span<const float> want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "sizes differ";
  std::vector<float> g(got.begin(), got.end()), w(want.begin(), want.end());
  for (std::size_t i = 0; i < w.size(); ++i) {
    if (std::isinf(w[i]) != std::isinf(g[i]))
      return ::testing::AssertionFailure() << "lse element " << i << ": got " << g[i] << ", want " << w[i];
    if (std::isinf(w[i]) && w[i] == g[i]) g[i] = w[i] = 0.0f;
  }
  return test::close(g, w, kLseAtol, 0);
}

// Bit-for-bit: the bf16 copy of out is out rounded to nearest even.
::testing::AssertionResult is_rounding_of(std::span<const bf16> got, std::span<const float> out) {
  return test::close(cuda::to_float(got), cuda::round_bf16(out), 1e-30, 0);
}

cpu::AttentionShape cpu_shape(const Case& c, std::int64_t q0, std::int64_t sq, std::int64_t k0, std::int64_t sk) {
  return {c.b, c.heads, c.groups, c.d, sq, sk, q0, k0};
}
cuda::AttentionShape gpu_shape(const Case& c, std::int64_t q0, std::int64_t sq, std::int64_t k0, std::int64_t sk) {
  return {c.b, c.heads, c.groups, c.d, sq, sk, q0, k0};
}

// Views of the packed rows: queries from position q0, keys and values from position k0.
template <class T>
cpu::QkvView<T> cpu_view(const Case& c, std::span<T> qkv, std::int64_t q0, std::int64_t k0) {
  const auto at = [&](std::int64_t pos, std::int64_t col) { return qkv.subspan(pos * c.b * c.ld() + col); };
  return {at(q0, 0), at(k0, c.k_col()), at(k0, c.v_col()), c.ld(), c.ld(), c.ld()};
}
cuda::AttentionInputs gpu_view(const Case& c, const bf16* qkv, std::int64_t q0, std::int64_t k0) {
  const auto at = [&](std::int64_t pos, std::int64_t col) { return qkv + pos * c.b * c.ld() + col; };
  return {at(q0, 0), at(k0, c.k_col()), at(k0, c.v_col()), c.ld(), c.ld(), c.ld()};
}
cuda::AttentionGrads gpu_grads(const Case& c, float* dqkv, std::int64_t q0, std::int64_t k0) {
  const auto at = [&](std::int64_t pos, std::int64_t col) { return dqkv + pos * c.b * c.ld() + col; };
  return {at(q0, 0), at(k0, c.k_col()), at(k0, c.v_col()), c.ld(), c.ld(), c.ld()};
}

TEST(CudaAttention, ForwardMatchesCpu) {
  PX_REQUIRE_GPU();
  for (const Case& c : kCases) {
    SCOPED_TRACE(testing::Message() << c);
    const auto qkv = random_bf16(c.qkv_size(), 1, -2.0f, 2.0f);
    std::vector<float> out(c.out_size(c.s)), lse(c.lse_size(c.s));
    cpu::attention_forward<float>(cpu_shape(c, 0, c.s, 0, c.s), cpu_view(c, std::span<const float>(qkv), 0, 0), out,
                                  lse, true);

    const auto qkv_h = cuda::to_bf16(qkv);
    DeviceBuffer<bf16> d_qkv{std::span<const bf16>(qkv_h)};
    DeviceBuffer<float> d_out(out.size()), d_lse(lse.size());
    DeviceBuffer<bf16> d_out16(out.size());
    cuda::attention_forward(gpu_shape(c, 0, c.s, 0, c.s), gpu_view(c, d_qkv.data(), 0, 0), d_out.data(),
                            d_lse.data(), true, d_out16.data());
    PX_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = d_out.download();
    EXPECT_TRUE(test::close(got, out, kOutAtol, 0)) << "out";
    EXPECT_TRUE(lse_close(d_lse.download(), lse)) << "lse";
    EXPECT_TRUE(is_rounding_of(d_out16.download(), got)) << "out_bf16";
  }
}

TEST(CudaAttention, BackwardMatchesCpuAndAccumulates) {
  PX_REQUIRE_GPU();
  for (const Case& c : kCases) {
    SCOPED_TRACE(testing::Message() << c);
    const auto qkv = random_bf16(c.qkv_size(), 2, -2.0f, 2.0f);
    const auto dout = random_bf16(c.out_size(c.s), 3, -1.0f, 1.0f);
    const auto init = random_bf16(c.qkv_size(), 4, -1.0f, 1.0f);  // gradients already there
    const auto sh = cpu_shape(c, 0, c.s, 0, c.s);
    const auto x = cpu_view(c, std::span<const float>(qkv), 0, 0);
    std::vector<float> out(c.out_size(c.s)), lse(c.lse_size(c.s)), dqkv = init;
    cpu::attention_forward<float>(sh, x, out, lse, true);
    cpu::attention_backward<float>(sh, x, out, lse, dout, cpu_view(c, std::span<float>(dqkv), 0, 0));

    // The GPU backward starts from the reference out and lse, so only its own error is measured.
    const auto qkv_h = cuda::to_bf16(qkv), dout_h = cuda::to_bf16(dout);
    DeviceBuffer<bf16> d_qkv{std::span<const bf16>(qkv_h)}, d_dout{std::span<const bf16>(dout_h)};
    DeviceBuffer<float> d_out{std::span<const float>(out)}, d_lse{std::span<const float>(lse)};
    DeviceBuffer<float> d_delta(lse.size()), d_dqkv{std::span<const float>(init)};
    const auto gsh = gpu_shape(c, 0, c.s, 0, c.s);
    cuda::attention_backward_delta(gsh, d_out.data(), d_dout.data(), d_delta.data());
    cuda::attention_backward(gsh, gpu_view(c, d_qkv.data(), 0, 0), d_lse.data(), d_delta.data(), d_dout.data(),
                             gpu_grads(c, d_dqkv.data(), 0, 0));
    PX_CUDA_CHECK(cudaDeviceSynchronize());
    expect_grads_close(c, d_dqkv.download(), dqkv, init);
  }
}

// q, k and v in three buffers whose rows are 3 elements longer than needed: no 16-byte rows, so
// every head dim takes the element-wise path, against the same reference.
TEST(CudaAttention, UnalignedStridedViewsMatchCpu) {
  PX_REQUIRE_GPU();
  for (const Case& c : {Case{2, 8, 2, 64, 100}, Case{1, 8, 8, 128, 70}, Case{3, 8, 1, 32, 33}}) {
    SCOPED_TRACE(testing::Message() << c);
    const std::int64_t rows = c.s * c.b, hd = c.heads * c.d, gd = c.groups * c.d;
    const std::int64_t ldq = hd + 3, ldkv = gd + 3;
    const auto q = random_bf16(static_cast<std::size_t>(rows * ldq), 5, -2.0f, 2.0f);
    const auto k = random_bf16(static_cast<std::size_t>(rows * ldkv), 6, -2.0f, 2.0f);
    const auto v = random_bf16(static_cast<std::size_t>(rows * ldkv), 7, -2.0f, 2.0f);
    const auto dout = random_bf16(c.out_size(c.s), 8, -1.0f, 1.0f);
    const auto sh = cpu_shape(c, 0, c.s, 0, c.s);
    const cpu::QkvView<const float> x{q, k, v, ldq, ldkv, ldkv};
    std::vector<float> out(c.out_size(c.s)), lse(c.lse_size(c.s));
    std::vector<float> dq(q.size(), 0.0f), dk(k.size(), 0.0f), dv(v.size(), 0.0f);
    cpu::attention_forward<float>(sh, x, out, lse, true);
    cpu::attention_backward<float>(sh, x, out, lse, dout, cpu::QkvView<float>{dq, dk, dv, ldq, ldkv, ldkv});

    const auto q_h = cuda::to_bf16(q), k_h = cuda::to_bf16(k), v_h = cuda::to_bf16(v), dout_h = cuda::to_bf16(dout);
    DeviceBuffer<bf16> d_q{std::span<const bf16>(q_h)}, d_k{std::span<const bf16>(k_h)},
        d_v{std::span<const bf16>(v_h)}, d_dout{std::span<const bf16>(dout_h)};
    DeviceBuffer<float> d_out(out.size()), d_lse(lse.size()), d_delta(lse.size());
    DeviceBuffer<float> d_dq(dq.size()), d_dk(dk.size()), d_dv(dv.size());
    d_dq.zero();
    d_dk.zero();
    d_dv.zero();
    const auto gsh = gpu_shape(c, 0, c.s, 0, c.s);
    const cuda::AttentionInputs gx{d_q.data(), d_k.data(), d_v.data(), ldq, ldkv, ldkv};
    cuda::attention_forward(gsh, gx, d_out.data(), d_lse.data(), true);
    PX_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(test::close(d_out.download(), out, kOutAtol, 0)) << "out";
    EXPECT_TRUE(lse_close(d_lse.download(), lse)) << "lse";

    d_out.upload(out);
    d_lse.upload(lse);
    cuda::attention_backward_delta(gsh, d_out.data(), d_dout.data(), d_delta.data());
    cuda::attention_backward(gsh, gx, d_lse.data(), d_delta.data(), d_dout.data(),
                             {d_dq.data(), d_dk.data(), d_dv.data(), ldq, ldkv, ldkv});
    PX_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> zq(dq.size(), 0.0f), zkv(dk.size(), 0.0f);
    EXPECT_TRUE(test::close(d_dq.download(), dq, kGradRel * max_abs_diff(dq, zq) + 1e-6, kGradRel)) << "dq";
    EXPECT_TRUE(test::close(d_dk.download(), dk, kGradRel * max_abs_diff(dk, zkv) + 1e-6, kGradRel)) << "dk";
    EXPECT_TRUE(test::close(d_dv.download(), dv, kGradRel * max_abs_diff(dv, zkv) + 1e-6, kGradRel)) << "dv";
  }
}

// A query block [q0, q0 + sq) and the key/value blocks [k0, k0 + sk) folded into it, in order.
struct Fold {
  std::int64_t q0, sq;
  std::vector<std::pair<std::int64_t, std::int64_t>> blocks;
};

// Context-parallel ring attention and other block folds, on GPU and CPU alike: per query block,
// forward over its key/value blocks (`first` on the first, the bf16 copy of out on the last),
// delta once from the final out, then the backward of every block adding into the packed
// gradient rows of its queries and keys.
TEST(CudaAttention, KeyValueBlocksFoldLikeCpu) {
  PX_REQUIRE_GPU();
  struct Scenario {
    const char* name;
    Case c;
    std::vector<Fold> folds;
  };
  const Scenario scenarios[] = {
      // Two ranks, own block first, then the other one: rank 0's second block is after all of its
      // queries (fully masked, not first: out and lse must stay as they are).
      {"ring", {2, 8, 2, 64, 100}, {{0, 40, {{0, 40}, {40, 60}}}, {40, 60, {{40, 60}, {0, 40}}}}},
      // Reversed order: rank 0 starts from the fully masked block (first: out 0, lse -inf).
      {"ring reversed", {1, 8, 1, 128, 150}, {{0, 70, {{70, 80}, {0, 70}}}, {70, 80, {{0, 70}, {70, 80}}}}},
      // Three uneven ranks, MHA, d 80 (element-wise path).
      {"ring of three",
       {3, 8, 8, 80, 90},
       {{0, 17, {{0, 17}, {17, 50}, {67, 23}}},
        {17, 50, {{17, 50}, {0, 17}, {67, 23}}},
        {67, 23, {{67, 23}, {17, 50}, {0, 17}}}}},
      // Blocks at arbitrary global positions, partly visible, unaligned to any tile.
      {"offsets", {2, 8, 2, 32, 120}, {{30, 70, {{50, 45}, {0, 50}}}, {100, 17, {{0, 80}, {95, 25}}}}},
      // A query block that sees nothing at all: out 0, lse -inf, no gradient.
      {"nothing visible", {1, 8, 2, 64, 80}, {{0, 17, {{17, 50}}}}},
  };
  for (const Scenario& sc : scenarios) {
    SCOPED_TRACE(sc.name);
    const Case& c = sc.c;
    const std::int64_t hd = c.heads * c.d;
    const auto qkv = random_bf16(c.qkv_size(), 9, -2.0f, 2.0f);
    const auto dout_all = random_bf16(c.out_size(c.s), 10, -1.0f, 1.0f);
    const auto init = random_bf16(c.qkv_size(), 11, -1.0f, 1.0f);
    std::vector<float> dqkv = init;
    const auto qkv_h = cuda::to_bf16(qkv), dout_h = cuda::to_bf16(dout_all);
    DeviceBuffer<bf16> d_qkv{std::span<const bf16>(qkv_h)}, d_dout_all{std::span<const bf16>(dout_h)};
    DeviceBuffer<float> d_dqkv{std::span<const float>(init)};

    for (const Fold& f : sc.folds) {
      SCOPED_TRACE(testing::Message() << "queries from " << f.q0);
      const std::span<const float> dout = std::span<const float>(dout_all).subspan(f.q0 * c.b * hd, c.out_size(f.sq));
      const bf16* d_dout = d_dout_all.data() + f.q0 * c.b * hd;
      std::vector<float> out(c.out_size(f.sq)), lse(c.lse_size(f.sq));
      DeviceBuffer<float> d_out(out.size()), d_lse(lse.size()), d_delta(lse.size());
      DeviceBuffer<bf16> d_out16(out.size());
      for (std::size_t n = 0; n < f.blocks.size(); ++n) {
        const auto [k0, sk] = f.blocks[n];
        const bool first = n == 0, last = n + 1 == f.blocks.size();
        cpu::attention_forward<float>(cpu_shape(c, f.q0, f.sq, k0, sk),
                                      cpu_view(c, std::span<const float>(qkv), f.q0, k0), out, lse, first);
        cuda::attention_forward(gpu_shape(c, f.q0, f.sq, k0, sk), gpu_view(c, d_qkv.data(), f.q0, k0), d_out.data(),
                                d_lse.data(), first, last ? d_out16.data() : nullptr);
        PX_CUDA_CHECK(cudaDeviceSynchronize());
        SCOPED_TRACE(testing::Message() << "after the block from " << k0);
        const auto got = d_out.download();
        EXPECT_TRUE(test::close(got, out, kOutAtol, 0)) << "out";
        EXPECT_TRUE(lse_close(d_lse.download(), lse)) << "lse";
        if (last) {
          EXPECT_TRUE(is_rounding_of(d_out16.download(), got)) << "out_bf16";
        }
      }

      d_out.upload(out);
      d_lse.upload(lse);
      cuda::attention_backward_delta(gpu_shape(c, f.q0, f.sq, 0, 0), d_out.data(), d_dout, d_delta.data());
      for (const auto& [k0, sk] : f.blocks) {
        cpu::attention_backward<float>(cpu_shape(c, f.q0, f.sq, k0, sk),
                                       cpu_view(c, std::span<const float>(qkv), f.q0, k0), out, lse, dout,
                                       cpu_view(c, std::span<float>(dqkv), f.q0, k0));
        cuda::attention_backward(gpu_shape(c, f.q0, f.sq, k0, sk), gpu_view(c, d_qkv.data(), f.q0, k0), d_lse.data(),
                                 d_delta.data(), d_dout, gpu_grads(c, d_dqkv.data(), f.q0, k0));
      }
    }
    PX_CUDA_CHECK(cudaDeviceSynchronize());
    expect_grads_close(c, d_dqkv.download(), dqkv, init);
  }
}

TEST(CudaAttention, RejectsBadShapes) {
  PX_REQUIRE_GPU();
  DeviceBuffer<bf16> qkv(3 * 64);
  DeviceBuffer<float> out(64), lse(1);
  const cuda::AttentionInputs x{qkv.data(), qkv.data() + 64, qkv.data() + 128, 192, 192, 192};
  EXPECT_THROW(cuda::attention_forward({1, 1, 1, 300, 1, 1, 0, 0}, x, out.data(), lse.data(), true),
               std::invalid_argument);
  EXPECT_THROW(cuda::attention_forward({1, 3, 2, 64, 1, 1, 0, 0}, x, out.data(), lse.data(), true),
               std::invalid_argument);
  EXPECT_THROW(cuda::attention_forward({1, 1, 1, 64, 1, 1, 0, 0}, {x.q, x.k, x.v, 32, 192, 192}, out.data(),
                                       lse.data(), true),
               std::invalid_argument);
}

}  // namespace
}  // namespace px
