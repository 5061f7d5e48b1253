// CUDA multi-tensor AdamW and gradient sum of squares against the fp32 CPU kernels: more tensors
// than one launch takes, odd counts (tails shorter than a vector and than a tile), misaligned
// tensors (the scalar path), with and without bf16 working copies, three steps with a host and a
// device gradient scale; the clip coefficient on the device.
//
// Tolerances. The GPU step is fp32, the CPU's double rounded to fp32 each step, so a weight
// differs by a few of its ulps plus about 1e-6 of the update lr * m / sqrt(v): rtol 1e-6, atol 1e-7
// (weights near 0, lr 1e-2). m can cancel (beta1 m against (1 - beta1) g): atol 5e-7 for |g| <= 1
// over three steps, rtol 1e-5; v is a sum of positive terms: rtol 1e-5. The bf16 copy must be
// exactly the round-to-nearest-even of the GPU's own fp32 weight. The sum of squares is exact
// squares summed in double on both sides, only in another order: rtol 1e-10.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "engine/backends/cpu/adamw.hpp"
#include "engine/backends/cuda/adamw.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px::cuda {
namespace {

using i64 = std::int64_t;
using px::test::close;
using px::test::uniform;

// One tensor on both sides: host state for the CPU step, device buffers (`offset` elements into
// their allocation, to misalign them) for the GPU step.
struct Tensor {
  i64 count;
  std::size_t offset, bf16_offset;
  bool with_bf16;
  float grad_magnitude;
  std::vector<float> p, m, v;
  DeviceBuffer<float> dp, dg, dm, dv;
  DeviceBuffer<bf16> db;

  Tensor(i64 n, std::size_t off, std::size_t boff, bool bf, float gmag, std::uint64_t seed)
      : count(n),
        offset(off),
        bf16_offset(boff),
        with_bf16(bf),
        grad_magnitude(gmag),
        p(uniform(static_cast<std::size_t>(n), seed, -1.0f, 1.0f)),
        m(static_cast<std::size_t>(n), 0.0f),
        v(static_cast<std::size_t>(n), 0.0f),
        dp(n + off),
        dg(n + off),
        dm(n + off),
        dv(n + off),
        db(bf ? n + boff : 0) {
    put(dp, p);
    put(dm, m);
    put(dv, v);
  }
  void put(DeviceBuffer<float>& d, const std::vector<float>& h) {
    if (h.empty()) return;
    PX_CUDA_CHECK(cudaMemcpy(d.data() + offset, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  std::vector<float> get(const DeviceBuffer<float>& d) const {
    std::vector<float> h(static_cast<std::size_t>(count));
    if (h.empty()) return h;
    PX_CUDA_CHECK(cudaMemcpy(h.data(), d.data() + offset, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
  }
  std::vector<float> get_bf16() const {
    std::vector<bf16> h(static_cast<std::size_t>(count));
    if (h.empty()) return {};
    PX_CUDA_CHECK(cudaMemcpy(h.data(), db.data() + bf16_offset, h.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    return to_float(h);
  }
  AdamWTensor device() {
    return {dp.data() + offset,
            dg.data() + offset,
            dm.data() + offset,
            dv.data() + offset,
            with_bf16 ? db.data() + bf16_offset : nullptr,
            count};
  }
};

std::vector<Tensor> make_tensors() {
  std::vector<Tensor> t;
  std::uint64_t seed = 100;
  // Counts around the vector (4) and tile (2048) sizes, one large enough for several tiles per
  // block, misaligned fp32 (offset 1) and bf16 (offset 1: 2 bytes, not 8-aligned) tensors.
  struct Spec {
    i64 n;
    std::size_t off, boff;
    bool bf;
    float gmag;
  };
  for (const Spec s : {Spec{1, 0, 0, true, 1.0f}, Spec{3, 0, 0, true, 1.0f}, Spec{2048, 0, 0, true, 1.0f},
                       Spec{2049, 0, 0, false, 1.0f}, Spec{100003, 0, 0, true, 1.0f}, Spec{4097, 1, 0, true, 1.0f},
                       Spec{777, 0, 1, true, 1.0f}, Spec{5, 3, 3, true, 1e-3f}, Spec{0, 0, 0, true, 1.0f}})
    t.emplace_back(s.n, s.off, s.boff, s.bf, s.gmag, seed++);
  // Enough small ones (layer norms, biases) that the list takes several launches.
  for (int i = 0; i < 100; ++i) t.emplace_back(5 + 13 * i, 0, 0, i % 3 != 0, i % 4 == 0 ? 1e-2f : 1.0f, seed++);
  return t;
}

TEST(CudaAdamW, MultiTensorStepsMatchTheCpu) {
  PX_REQUIRE_GPU();
  std::vector<Tensor> tensors = make_tensors();
  const cpu::AdamWConfig cpu_cfg{1e-2, 0.9, 0.95, 1e-8, 0.1};
  const AdamWConfig& cfg = cpu_cfg;
  DeviceBuffer<float> device_scale(1);
  const float kDeviceScale = 0.8f;
  device_scale.upload(std::vector<float>{kDeviceScale});
  std::vector<AdamWTensor> list;
  for (Tensor& t : tensors) list.push_back(t.device());

  for (i64 step = 1; step <= 3; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    AdamWStep s{step, step == 1 ? 1.0 : 0.5, step == 3 ? device_scale.data() : nullptr};
    // The GPU scales by float(grad_scale) * device scalar in fp32; the CPU by that value.
    const double cpu_scale = static_cast<double>(static_cast<float>(s.grad_scale) * (step == 3 ? kDeviceScale : 1.0f));
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      Tensor& t = tensors[i];
      const std::vector<float> g = uniform(t.p.size(), 1000 * step + i, -t.grad_magnitude, t.grad_magnitude);
      t.put(t.dg, g);
      cpu::adamw_step<float>(t.p, g, t.m, t.v, cpu_cfg, step, cpu_scale);
    }
    adamw_step(list, cfg, s, nullptr);
    PX_CUDA_CHECK(cudaDeviceSynchronize());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      SCOPED_TRACE(::testing::Message() << "tensor " << i << " (" << tensors[i].count << " elements)");
      const Tensor& t = tensors[i];
      const std::vector<float> p = t.get(t.dp);
      EXPECT_TRUE(close(p, t.p, 1e-7, 1e-6));
      EXPECT_TRUE(close(t.get(t.dm), t.m, 5e-7, 1e-5));
      EXPECT_TRUE(close(t.get(t.dv), t.v, 1e-12, 1e-5));
      if (t.with_bf16) {
        EXPECT_EQ(t.get_bf16(), round_bf16(p));
      }
    }
  }
  // The single-tensor overload is the one-element list.
  Tensor& big = tensors[4];
  const std::vector<float> before = big.get(big.dp);
  const std::vector<float> g = uniform(big.p.size(), 77, -1.0f, 1.0f);
  big.put(big.dg, g);
  cpu::adamw_step<float>(big.p, g, big.m, big.v, cpu_cfg, 4, 1.0);
  adamw_step(big.device(), cfg, AdamWStep{4, 1.0, nullptr}, nullptr);
  EXPECT_TRUE(close(big.get(big.dp), big.p, 1e-7, 1e-6));
  EXPECT_NE(big.get(big.dp), before);
}

TEST(CudaAdamW, RejectsStepZero) {
  PX_REQUIRE_GPU();
  EXPECT_THROW(adamw_step(std::span<const AdamWTensor>(), AdamWConfig{}, AdamWStep{0, 1.0, nullptr}, nullptr),
               std::invalid_argument);
}

TEST(CudaSumOfSquares, MatchesTheCpuAndIsDeterministic) {
  PX_REQUIRE_GPU();
  std::vector<Tensor> tensors = make_tensors();
  std::vector<GradTensor> list;
  double want = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    Tensor& t = tensors[i];
    const std::vector<float> g = uniform(t.p.size(), 500 + i, -t.grad_magnitude, t.grad_magnitude);
    t.put(t.dg, g);
    want += cpu::sum_of_squares<float>(g);
    list.push_back({t.dg.data() + t.offset, t.count});
  }
  DeviceBuffer<double> out(1), workspace(sum_of_squares_workspace_doubles());
  const double got = sum_of_squares_to_host(list, out.data(), workspace.data(), nullptr);
  EXPECT_NEAR(got, want, 1e-10 * want);
  for (int run = 0; run < 3; ++run)  // bitwise: fixed grid, fixed order
    EXPECT_EQ(sum_of_squares_to_host(list, out.data(), workspace.data(), nullptr), got);
  // One tensor, then none: a stale partial from the multi-launch sum above must not leak in.
  const double want4 = cpu::sum_of_squares<float>(tensors[4].get(tensors[4].dg));
  EXPECT_NEAR(
      sum_of_squares_to_host(std::span<const GradTensor>(list).subspan(4, 1), out.data(), workspace.data(), nullptr),
      want4, 1e-10 * want4);
  EXPECT_EQ(sum_of_squares_to_host(std::span<const GradTensor>(), out.data(), workspace.data(), nullptr), 0.0);
}

TEST(CudaSumOfSquares, ClipCoefficientOnTheDevice) {
  PX_REQUIRE_GPU();
  DeviceBuffer<double> sum_sq(1);
  DeviceBuffer<float> coefficient(1);
  for (const double norm : {0.0, 0.5, 1.0, 5.0, 1e6}) {
    for (const double max_norm : {0.0, 1.0, 2.5}) {
      sum_sq.upload(std::vector<double>{norm * norm});
      clip_coefficient(sum_sq.data(), max_norm, coefficient.data(), nullptr);
      EXPECT_FLOAT_EQ(coefficient.download()[0], static_cast<float>(cpu::clip_coefficient(norm, max_norm)))
          << "norm " << norm << " max_norm " << max_norm;
    }
  }
}

}  // namespace
}  // namespace px::cuda
