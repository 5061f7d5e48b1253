// The bandwidth-bound CUDA kernels (norms, activations, dropout-add, RoPE, embedding) against the
// fp32 CPU kernels on the same bf16-rounded inputs. Shapes cover every launch path: a column count
// of 1, odd counts (scalar packs), multiples of 8 (16-byte packs) on short rows shared by several
// row groups, rows one group caches, rows longer than the register cache, misaligned pointers, and
// more rows than one wave of blocks.
//
// Tolerances. A bf16 result is the device's fp32 value rounded to nearest, an error below 2^-8 of
// its magnitude (8 significant bits); so kernels whose output is bf16 pass at rtol = 2^-8 plus a
// small slack for the fp32-vs-CPU difference of the value before rounding, and an atol for that
// difference where the value cancels to near zero. fp32 outputs (dgamma, dbeta) are sums over rows
// whose order differs from the CPU's, so their tolerance grows with the number of rows. Dropout
// masks and embedding gradients are compared bit for bit: the mask is the CPU's own hash, and the
// embedding backward makes the CPU's additions in the CPU's order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <random>
#include <span>
#include <stdexcept>
#include <vector>

#include "engine/backends/cpu/activation.hpp"
#include "engine/backends/cpu/dropout.hpp"
#include "engine/backends/cpu/embedding.hpp"
#include "engine/backends/cpu/norm.hpp"
#include "engine/backends/cpu/rope.hpp"
#include "engine/backends/cuda/activation.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/backends/cuda/dropout.hpp"
#include "engine/backends/cuda/embedding.hpp"
#include "engine/backends/cuda/norm.hpp"
#include "engine/backends/cuda/rope.hpp"
#include "engine/core/counter_rng.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px::cuda {
namespace {

using i64 = std::int64_t;
using V = std::vector<float>;

constexpr double kRound = 0x1.0p-8;         // bf16 round-to-nearest, relative
constexpr double kOutRtol = kRound + 1e-5;  // plus the fp32 value's own difference from the CPU's
constexpr float kEps = 1e-5f;

// Uniform values already rounded to bf16, so host and device start from identical inputs.
V uniform(std::size_t n, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  V v(n);
  for (auto& x : v) x = dist(rng);
  return round_bf16(v);
}

DeviceBuffer<bf16> to_device(const V& x, std::size_t pad = 0) {
  // `pad` leading elements let a test hand a kernel a misaligned pointer (base + pad).
  V padded(pad, 0.0f);
  padded.insert(padded.end(), x.begin(), x.end());
  const auto b = to_bf16(padded);
  return DeviceBuffer<bf16>(std::span<const bf16>(b));
}
V to_host(const DeviceBuffer<bf16>& d, std::size_t pad = 0) {
  const auto b = d.download();
  V all = to_float(b);
  return V(all.begin() + static_cast<std::ptrdiff_t>(pad), all.end());
}
template <class T>
DeviceBuffer<T> to_device_raw(const std::vector<T>& x) {
  return DeviceBuffer<T>(std::span<const T>(x));
}
void sync() { PX_CUDA_CHECK(cudaDeviceSynchronize()); }

::testing::AssertionResult bitwise_equal(std::span<const float> got, std::span<const float> want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "sizes differ";
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!(got[i] == want[i]))
      return ::testing::AssertionFailure() << "element " << i << ": got " << got[i] << ", want " << want[i];
  return ::testing::AssertionSuccess();
}

struct Shape {
  i64 rows, cols;
  std::size_t pad;  // 1: every tensor misaligned by one element, forcing the scalar path
};
// cols 1 and 7: scalar packs; 64: eight rows share a block; 1600 (GPT-2 1.5B): four rows a block,
// and more rows than a wave; 1001, 4099: odd, the scalar path past its register cache; 12288
// (GPT-3): exactly the backward's cache; 20480: past the 16-byte path's cache.
const Shape kNormShapes[] = {{300, 1, 0},    {300, 7, 0},   {20000, 64, 0},  {200, 1001, 0}, {4096, 1600, 0},
                             {100, 1600, 1}, {33, 4099, 0}, {600, 12288, 0}, {9, 20480, 0}};

std::vector<double> row_means(const V& x, i64 rows, i64 cols, bool centre) {
  std::vector<double> out(static_cast<std::size_t>(rows));
  for (i64 r = 0; r < rows; ++r) {
    double s = 0;
    for (i64 c = 0; c < cols; ++c) s += x[static_cast<std::size_t>(r * cols + c)];
    out[static_cast<std::size_t>(r)] = centre ? s / static_cast<double>(cols) : 0.0;
  }
  return out;
}
V rstds(const V& x, const std::vector<double>& mean, i64 rows, i64 cols) {
  V out(static_cast<std::size_t>(rows));
  for (i64 r = 0; r < rows; ++r) {
    double ss = 0;
    for (i64 c = 0; c < cols; ++c) {
      const double d = x[static_cast<std::size_t>(r * cols + c)] - mean[static_cast<std::size_t>(r)];
      ss += d * d;
    }
    out[static_cast<std::size_t>(r)] = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(cols) + kEps));
  }
  return out;
}

// Rows offset by up to +-3 so the mean matters and the variance pass must centre first.
V norm_input(i64 rows, i64 cols, std::uint64_t seed) {
  V x = uniform(static_cast<std::size_t>(rows * cols), seed, -2.0f, 2.0f);
  for (i64 r = 0; r < rows; ++r)
    for (i64 c = 0; c < cols; ++c) x[static_cast<std::size_t>(r * cols + c)] += static_cast<float>(r % 7 - 3);
  return round_bf16(x);
}

// Forward: y within bf16 rounding (atol 1e-5: fp32 statistics against the CPU's double ones, on
// outputs of order 1); saved mean and rstd within fp32 summation error.
void check_norm_forward(bool layer) {
  for (const Shape& s : kNormShapes) {
    SCOPED_TRACE(::testing::Message() << s.rows << " x " << s.cols << " pad " << s.pad);
    const auto n = static_cast<std::size_t>(s.rows * s.cols), cols = static_cast<std::size_t>(s.cols);
    const V x = norm_input(s.rows, s.cols, 1), g = uniform(cols, 2, 0.5f, 1.5f), b = uniform(cols, 3, -0.5f, 0.5f);
    V want(n);
    if (layer)
      cpu::layernorm_forward<float>(x, g, b, want, s.rows, s.cols, kEps);
    else
      cpu::rmsnorm_forward<float>(x, g, want, s.rows, s.cols, kEps);
    auto d_x = to_device(x, s.pad), d_g = to_device(g, s.pad), d_b = to_device(b, s.pad), d_y = to_device(V(n), s.pad);
    DeviceBuffer<float> mean(static_cast<std::size_t>(s.rows)), rstd(static_cast<std::size_t>(s.rows));
    const std::size_t p = s.pad;
    if (layer)
      layernorm_forward(d_x.data() + p, d_g.data() + p, d_b.data() + p, d_y.data() + p, mean.data(), rstd.data(), s.rows,
                        s.cols, kEps);
    else
      rmsnorm_forward(d_x.data() + p, d_g.data() + p, d_y.data() + p, rstd.data(), s.rows, s.cols, kEps);
    sync();
    EXPECT_TRUE(test::close(to_host(d_y, p), want, 1e-5, kOutRtol));
    const auto m = row_means(x, s.rows, s.cols, layer);
    if (layer) {
      V want_mean(m.begin(), m.end());
      EXPECT_TRUE(test::close(mean.download(), want_mean, 1e-5, 1e-5));
    }
    EXPECT_TRUE(test::close(rstd.download(), rstds(x, m, s.rows, s.cols), 0.0, 1e-5));
  }
}

// Backward, both with the forward's saved statistics and recomputing them. dx: bf16 rounding of
// (old dx + gradient), atol 1e-4 for the fp32 row sums (mean(g), mean(g xhat)) over up to 20480
// columns; dgamma / dbeta: fp32 sums over `rows` terms of order 1 in another order than the CPU's,
// atol 1e-6 per row (well above the random-walk error, far below any wrong term).
void check_norm_backward(bool layer, bool saved) {
  for (const Shape& s : kNormShapes) {
    SCOPED_TRACE(::testing::Message() << s.rows << " x " << s.cols << " pad " << s.pad << " saved " << saved);
    const auto n = static_cast<std::size_t>(s.rows * s.cols), cols = static_cast<std::size_t>(s.cols);
    const V x = norm_input(s.rows, s.cols, 4), g = uniform(cols, 5, 0.5f, 1.5f), b = uniform(cols, 6, -0.5f, 0.5f);
    const V dy = uniform(n, 7), dx0 = uniform(n, 8), dg0 = uniform(cols, 9), db0 = uniform(cols, 10);
    V dx = dx0, dg = dg0, db = db0;
    if (layer)
      cpu::layernorm_backward<float>(dy, x, g, dx, dg, db, s.rows, s.cols, kEps);
    else
      cpu::rmsnorm_backward<float>(dy, x, g, dx, dg, s.rows, s.cols, kEps);

    auto d_x = to_device(x, s.pad), d_g = to_device(g, s.pad), d_b = to_device(b, s.pad), d_dy = to_device(dy, s.pad);
    auto d_dx = to_device(dx0, s.pad), d_y = to_device(V(n), s.pad);
    auto d_dg = to_device_raw(dg0), d_db = to_device_raw(db0);
    DeviceBuffer<float> mean(static_cast<std::size_t>(s.rows)), rstd(static_cast<std::size_t>(s.rows));
    const std::size_t ws_bytes = norm_backward_workspace_bytes(s.rows, s.cols);
    DeviceBuffer<float> ws(ws_bytes / sizeof(float) + 1);
    const std::size_t p = s.pad;
    if (layer) {
      if (saved)
        layernorm_forward(d_x.data() + p, d_g.data() + p, d_b.data() + p, d_y.data() + p, mean.data(), rstd.data(), s.rows,
                          s.cols, kEps);
      layernorm_backward(d_dy.data() + p, d_x.data() + p, d_g.data() + p, saved ? mean.data() : nullptr,
                         saved ? rstd.data() : nullptr, d_dx.data() + p, d_dg.data(), d_db.data(), s.rows, s.cols, kEps,
                         ws.data(), ws.bytes());
    } else {
      if (saved) rmsnorm_forward(d_x.data() + p, d_g.data() + p, d_y.data() + p, rstd.data(), s.rows, s.cols, kEps);
      rmsnorm_backward(d_dy.data() + p, d_x.data() + p, d_g.data() + p, saved ? rstd.data() : nullptr, d_dx.data() + p,
                       d_dg.data(), s.rows, s.cols, kEps, ws.data(), ws.bytes());
    }
    sync();
    EXPECT_TRUE(test::close(to_host(d_dx, p), dx, 1e-4, kOutRtol));
    const double atol = 1e-6 * static_cast<double>(s.rows);
    EXPECT_TRUE(test::close(d_dg.download(), dg, atol, 1e-5));
    if (layer) {
      EXPECT_TRUE(test::close(d_db.download(), db, atol, 1e-5));
    }
  }
}

TEST(CudaNorm, LayerNormForwardMatchesCpu) {
  PX_REQUIRE_GPU();
  check_norm_forward(true);
}

TEST(CudaNorm, RmsNormForwardMatchesCpu) {
  PX_REQUIRE_GPU();
  check_norm_forward(false);
}

TEST(CudaNorm, LayerNormBackwardMatchesCpu) {
  PX_REQUIRE_GPU();
  check_norm_backward(true, false);
  check_norm_backward(true, true);
}

TEST(CudaNorm, RmsNormBackwardMatchesCpu) {
  PX_REQUIRE_GPU();
  check_norm_backward(false, false);
  check_norm_backward(false, true);
}

TEST(CudaNorm, BackwardIsReproducible) {
  PX_REQUIRE_GPU();
  const i64 rows = 4096, cols = 1600;
  const auto n = static_cast<std::size_t>(rows * cols);
  const V x = norm_input(rows, cols, 11), g = uniform(cols, 12, 0.5f, 1.5f), dy = uniform(n, 13);
  auto d_x = to_device(x), d_g = to_device(g), d_dy = to_device(dy);
  DeviceBuffer<float> ws(norm_backward_workspace_bytes(rows, cols) / sizeof(float) + 1);
  std::vector<std::vector<float>> runs;
  for (int run = 0; run < 2; ++run) {
    auto d_dx = to_device(V(n));
    DeviceBuffer<float> dg(cols), db(cols);
    dg.zero();
    db.zero();
    layernorm_backward(d_dy.data(), d_x.data(), d_g.data(), nullptr, nullptr, d_dx.data(), dg.data(), db.data(), rows, cols,
                       kEps, ws.data(), ws.bytes());
    sync();
    runs.push_back(dg.download());
    const V b = db.download();
    runs.back().insert(runs.back().end(), b.begin(), b.end());
  }
  EXPECT_TRUE(bitwise_equal(runs[0], runs[1]));
}

TEST(CudaNorm, RejectsASmallWorkspace) {
  PX_REQUIRE_GPU();
  const i64 rows = 64, cols = 64;
  auto d = to_device(V(static_cast<std::size_t>(rows * cols)));
  DeviceBuffer<float> g(cols), ws(1);
  EXPECT_THROW(
      rmsnorm_backward(d.data(), d.data(), d.data(), nullptr, d.data(), g.data(), rows, cols, kEps, ws.data(), ws.bytes()),
      std::invalid_argument);
}

// Inputs spread to +-6 and a few extremes, where GELU's tails and the logistic's clamp matter.
V activation_input(std::size_t n, std::uint64_t seed) {
  V x = uniform(n, seed, -6.0f, 6.0f);
  const float extremes[] = {-100.0f, -20.0f, -9.5f, 0.0f, 9.5f, 20.0f, 100.0f};
  for (std::size_t i = 0; i < n && i < std::size(extremes); ++i) x[i * 3 % n] = extremes[i];
  return round_bf16(x);
}

// GELU: outputs up to the input's magnitude, fp32 logistic against the CPU's double tanh: atol
// 1e-6 covers the absolute fp32 error where the value is near zero.
TEST(CudaActivation, GeluForwardAndBackwardMatchCpu) {
  PX_REQUIRE_GPU();
  for (const i64 size : {i64{1}, i64{7}, i64{1001}, i64{4099}, i64{8192 * 4 + 5}}) {
    for (const std::size_t pad : {std::size_t{0}, std::size_t{1}}) {
      SCOPED_TRACE(::testing::Message() << "n " << size << " pad " << pad);
      const auto n = static_cast<std::size_t>(size);
      const V x = activation_input(n, 20), dy = uniform(n, 21);
      V y(n), dx(n);
      cpu::gelu_forward<float>(x, y);
      cpu::gelu_backward<float>(dy, x, dx);
      auto d_x = to_device(x, pad), d_dy = to_device(dy, pad), d_y = to_device(V(n), pad), d_dx = to_device(V(n), pad);
      gelu_forward(d_x.data() + pad, d_y.data() + pad, size);
      gelu_backward(d_dy.data() + pad, d_x.data() + pad, d_dx.data() + pad, size);
      sync();
      EXPECT_TRUE(test::close(to_host(d_y, pad), y, 1e-6, kOutRtol));
      EXPECT_TRUE(test::close(to_host(d_dx, pad), dx, 1e-6, kOutRtol));
    }
  }
}

// SwiGLU: outputs up to 36 (|silu(6) * 6|); atol 1e-5 for near-zero results of fp32 arithmetic.
TEST(CudaActivation, SwigluForwardAndBackwardMatchCpu) {
  PX_REQUIRE_GPU();
  const Shape shapes[] = {{50, 1, 0}, {50, 7, 0}, {300, 64, 0}, {40, 1001, 0}, {64, 1600, 0}, {64, 1600, 1}, {8, 12288, 0}};
  for (const Shape& s : shapes) {
    SCOPED_TRACE(::testing::Message() << s.rows << " x " << s.cols << " pad " << s.pad);
    const auto n = static_cast<std::size_t>(s.rows * s.cols);
    const V x = activation_input(2 * n, 22), dy = uniform(n, 23);
    V y(n), dx(2 * n);
    cpu::swiglu_forward<float>(x, y, s.rows, s.cols);
    cpu::swiglu_backward<float>(dy, x, dx, s.rows, s.cols);
    auto d_x = to_device(x, s.pad), d_dy = to_device(dy, s.pad), d_y = to_device(V(n), s.pad);
    auto d_dx = to_device(V(2 * n), s.pad);
    swiglu_forward(d_x.data() + s.pad, d_y.data() + s.pad, s.rows, s.cols);
    swiglu_backward(d_dy.data() + s.pad, d_x.data() + s.pad, d_dx.data() + s.pad, s.rows, s.cols);
    sync();
    EXPECT_TRUE(test::close(to_host(d_y, s.pad), y, 1e-5, kOutRtol));
    EXPECT_TRUE(test::close(to_host(d_dx, s.pad), dx, 1e-5, kOutRtol));
  }
}

std::vector<std::uint64_t> row_keys(i64 rows, std::uint64_t salt) {
  std::vector<std::uint64_t> keys(static_cast<std::size_t>(rows));
  for (i64 r = 0; r < rows; ++r) keys[static_cast<std::size_t>(r)] = px::mix_key(salt, static_cast<std::uint64_t>(r));
  return keys;
}

// Dropout: the mask must equal the CPU's bit for bit; out = residual + x / (1 - p) is rounded once
// to bf16 (atol 1e-6 for fp32 against the CPU's double where the sum cancels).
TEST(CudaDropout, ForwardMaskIsTheCpuMaskBitForBit) {
  PX_REQUIRE_GPU();
  const Shape shapes[] = {{37, 1, 0},     {101, 7, 0},    {64, 1001, 0}, {128, 4099, 0},
                          {256, 1600, 0}, {256, 1600, 1}, {64, 12288, 0}};
  for (const Shape& s : shapes) {
    for (const double p : {0.0, 0.1, 0.5}) {
      for (const bool residual : {true, false}) {
        SCOPED_TRACE(::testing::Message() << s.rows << " x " << s.cols << " pad " << s.pad << " p " << p << " residual "
                                          << residual);
        const auto n = static_cast<std::size_t>(s.rows * s.cols);
        const V x = uniform(n, 30), res = uniform(n, 31);
        const auto keys = row_keys(s.rows, 42);
        const std::uint64_t seed = 7;
        V out(n);
        std::vector<std::uint8_t> mask(n);
        cpu::dropout_add_forward<float>(x, residual ? std::span<const float>(res) : std::span<const float>(), out, mask,
                                        keys, s.cols, p, seed);
        auto d_x = to_device(x, s.pad), d_res = to_device(res, s.pad), d_out = to_device(V(n), s.pad);
        DeviceBuffer<std::uint8_t> d_mask(n + s.pad);
        auto d_keys = to_device_raw(keys);
        dropout_add_forward(d_x.data() + s.pad, residual ? d_res.data() + s.pad : nullptr, d_out.data() + s.pad,
                            d_mask.data() + s.pad, d_keys.data(), s.rows, s.cols, p, seed);
        sync();
        const auto got_mask = d_mask.download();
        ASSERT_TRUE(std::equal(mask.begin(), mask.end(), got_mask.begin() + static_cast<std::ptrdiff_t>(s.pad)));
        EXPECT_TRUE(test::close(to_host(d_out, s.pad), out, 1e-6, kOutRtol));
      }
    }
  }
}

TEST(CudaDropout, BackwardMatchesCpu) {
  PX_REQUIRE_GPU();
  for (const i64 size : {i64{1}, i64{7}, i64{1001}, i64{8192 * 3 + 3}}) {
    for (const std::size_t pad : {std::size_t{0}, std::size_t{1}}) {
      SCOPED_TRACE(::testing::Message() << "n " << size << " pad " << pad);
      const auto n = static_cast<std::size_t>(size);
      const V x = uniform(n, 32), dy = uniform(n, 33);
      const auto keys = row_keys(size, 43);  // one column per row: any layout gives a mask
      V out(n), dx(n);
      std::vector<std::uint8_t> mask(n);
      cpu::dropout_add_forward<float>(x, {}, out, mask, keys, 1, 0.3, 9);
      cpu::dropout_backward<float>(dy, mask, dx, 0.3);
      std::vector<std::uint8_t> padded_mask(pad, 0);
      padded_mask.insert(padded_mask.end(), mask.begin(), mask.end());
      auto d_dy = to_device(dy, pad), d_dx = to_device(V(n), pad);
      auto d_mask = to_device_raw(padded_mask);
      dropout_backward(d_dy.data() + pad, d_mask.data() + pad, d_dx.data() + pad, size, 0.3);
      sync();
      EXPECT_TRUE(test::close(to_host(d_dx, pad), dx, 0.0, kOutRtol));
    }
  }
}

struct RopeShape {
  i64 rows, ld, heads, d;
  std::size_t pad;
};

// RoPE at positions up to 10^5 (angles far beyond 2 pi): rotated values within bf16 rounding,
// atol 1e-5 for fp32 sines and cosines where a rotated value cancels; columns past the rotated
// heads must come back untouched, which close() sees as exact equality.
TEST(CudaRope, ForwardAndBackwardMatchCpu) {
  PX_REQUIRE_GPU();
  const RopeShape shapes[] = {{50, 5 * 128, 4, 128, 0}, {33, 37, 3, 10, 0}, {20, 136, 2, 64, 0},
                              {20, 136, 2, 64, 1},      {7, 2, 1, 2, 0},    {4096, 3 * 64, 2, 64, 0}};
  for (const RopeShape& s : shapes) {
    for (const double theta : {10000.0, 500000.0}) {
      SCOPED_TRACE(::testing::Message() << "rows " << s.rows << " ld " << s.ld << " heads " << s.heads << " d " << s.d
                                        << " pad " << s.pad << " theta " << theta);
      const auto n = static_cast<std::size_t>(s.rows * s.ld);
      const V x = uniform(n, 40);
      std::vector<std::int32_t> positions(static_cast<std::size_t>(s.rows));
      std::mt19937 rng(41);
      for (auto& p : positions) p = static_cast<std::int32_t>(rng() % 100000);
      positions[0] = 0;
      V fwd = x, bwd = x;
      cpu::rope_forward<float>(fwd, s.rows, s.ld, s.heads, s.d, positions, theta);
      cpu::rope_backward<float>(bwd, s.rows, s.ld, s.heads, s.d, positions, theta);
      auto d_pos = to_device_raw(positions);
      auto d_f = to_device(x, s.pad), d_b = to_device(x, s.pad);
      rope_forward(d_f.data() + s.pad, s.rows, s.ld, s.heads, s.d, d_pos.data(), theta);
      rope_backward(d_b.data() + s.pad, s.rows, s.ld, s.heads, s.d, d_pos.data(), theta);
      sync();
      EXPECT_TRUE(test::close(to_host(d_f, s.pad), fwd, 1e-5, kOutRtol));
      EXPECT_TRUE(test::close(to_host(d_b, s.pad), bwd, 1e-5, kOutRtol));
    }
  }
}

struct EmbeddingCase {
  i64 tokens, h, vocab_begin, vocab_rows;
  bool pos;
};

// Tokens drawn from a 100-word vocabulary with one word taking about a third of the batch, so
// rows repeat often and one group is long; positions follow the sequence-major layout (row s b + j
// at position s, b = 4), so every position repeats. The forward is one fp32 add rounded to bf16,
// so it equals the rounded CPU result exactly; the backward equals the CPU's fp32 sums exactly.
TEST(CudaEmbedding, ForwardAndBackwardEqualCpuBitForBit) {
  PX_REQUIRE_GPU();
  const i64 vocab = 100, batch = 4;
  const EmbeddingCase cases[] = {{1, 1, 0, 100, true},      {513, 7, 30, 40, true},     {5000, 64, 30, 40, true},
                                 {5000, 64, 0, 100, false}, {2048, 1600, 50, 50, true}, {300, 1001, 0, 60, true}};
  for (const EmbeddingCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << "tokens " << c.tokens << " h " << c.h << " shard [" << c.vocab_begin << ", "
                                      << c.vocab_begin + c.vocab_rows << ") pos " << c.pos);
    const auto n = static_cast<std::size_t>(c.tokens), h = static_cast<std::size_t>(c.h);
    std::vector<std::int32_t> tokens(n), positions(n);
    std::mt19937 rng(50);
    for (std::size_t t = 0; t < n; ++t) {
      tokens[t] = rng() % 3 == 0 ? 35 : static_cast<std::int32_t>(rng() % vocab);
      positions[t] = static_cast<std::int32_t>(t / batch);
    }
    const i64 n_positions = c.tokens / batch + 1;
    const V word = uniform(static_cast<std::size_t>(c.vocab_rows) * h, 51),
            pos = uniform(static_cast<std::size_t>(n_positions) * h, 52);
    const V dy = uniform(n * h, 53);
    const V dword0 = uniform(word.size(), 54), dpos0 = uniform(pos.size(), 55);
    V out(n * h), dword = dword0, dpos = dpos0;
    const std::span<const float> pos_span = c.pos ? std::span<const float>(pos) : std::span<const float>();
    cpu::embedding_forward<float>(tokens, positions, word, c.vocab_begin, pos_span, out, c.h);
    cpu::embedding_backward<float>(dy, tokens, positions, dword, c.vocab_begin,
                                   c.pos ? std::span<float>(dpos) : std::span<float>(), c.h);

    auto d_tok = to_device_raw(tokens), d_posn = to_device_raw(positions);
    auto d_word = to_device(word), d_pos = to_device(pos), d_out = to_device(V(n * h)), d_dy = to_device(dy);
    auto d_dword = to_device_raw(dword0), d_dpos = to_device_raw(dpos0);
    DeviceBuffer<std::int32_t> ws(embedding_backward_workspace_bytes(c.tokens) / sizeof(std::int32_t));
    embedding_forward(d_tok.data(), d_posn.data(), c.tokens, d_word.data(), c.vocab_begin, c.vocab_rows,
                      c.pos ? d_pos.data() : nullptr, d_out.data(), c.h);
    embedding_backward(d_dy.data(), d_tok.data(), d_posn.data(), c.tokens, d_dword.data(), c.vocab_begin, c.vocab_rows,
                       c.pos ? d_dpos.data() : nullptr, c.h, ws.data(), ws.bytes());
    sync();
    EXPECT_TRUE(bitwise_equal(to_host(d_out), round_bf16(out)));
    EXPECT_TRUE(bitwise_equal(d_dword.download(), dword));
    EXPECT_TRUE(bitwise_equal(d_dpos.download(), c.pos ? dpos : dpos0));
  }
}

}  // namespace
}  // namespace px::cuda
