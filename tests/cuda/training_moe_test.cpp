// CUDA MoE routing and permutation against the fp32 CPU kernels: expert and slot assignments
// equal the CPU's exactly (capacity drops in token order included) for shapes from Switch-like to
// many-expert, more tokens than one scan chunk and expert counts that are not multiples of a warp,
// fp32 and bf16 router logits, with and without renormalisation; the router backward, and the
// dispatch / combine kernels forward and backward on the vectorised and the scalar row paths.
//
// Logits are the CPU test's separated kind (sorted values per token at least 0.2 apart), so
// probabilities never come within fp32 rounding of a tie and the choice is the CPU's exactly.
// Rounded to bf16, two logits of a token either tie exactly (the same probability bits on both
// sides, so the same lower-index tie-break) or stay at least a bf16 step of the larger apart
// (>= 2^-8 of it, and the larger of two distinct ranks is >= 0.4).
//
// Tolerances. probs and gates: fp32 exp and a reordered sum, a few ulps: rtol 1e-5. The aux loss:
// sums of those in another order, rtol 1e-5. d_logits = p (g - <p, g>) with g O(1): rtol 1e-4,
// atol 1e-6 for the cancellation in g - <p, g>. Dispatch copies, the dispatched gradient's sum
// over a token's rows and d_expert_out (one product) are the CPU's fp32 operations in the CPU's
// order, so exact after the same bf16 rounding. y = sum of gate * row is one bf16 rounding of
// fp32 sums (rtol one bf16 ulp); d_gate is a fp32 dot product over hidden, a tree against a
// sequence: atol 1e-4, rtol 1e-4 for O(1) terms and hidden <= 264.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "engine/backends/cpu/moe.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/backends/cuda/moe.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px::cuda {
namespace {

using i64 = std::int64_t;
using px::test::close;
using px::test::uniform;
using Ints = std::vector<std::int32_t>;

constexpr double kBf16Ulp = 1.0 / 256;

std::vector<float> separated_logits(const MoeShape& s, std::uint64_t seed) {
  const std::vector<float> noise = uniform(static_cast<std::size_t>(s.tokens * s.experts), seed, -0.2f, 0.2f);
  std::mt19937_64 rng(seed);
  std::vector<float> logits(noise.size());
  std::vector<int> rank(static_cast<std::size_t>(s.experts));
  for (i64 t = 0; t < s.tokens; ++t) {
    std::iota(rank.begin(), rank.end(), 0);
    std::shuffle(rank.begin(), rank.end(), rng);
    for (i64 e = 0; e < s.experts; ++e)
      logits[t * s.experts + e] = 0.6f * static_cast<float>(rank[e]) + noise[t * s.experts + e];
  }
  return logits;
}


std::int64_t dropped(const Ints& expert) { return std::count(expert.begin(), expert.end(), -1); }

// Bitwise equality naming the first difference (EXPECT_EQ would print every element).
template <class T>
::testing::AssertionResult same(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes " << got.size() << " vs " << want.size();
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!(got[i] == want[i]))
      return ::testing::AssertionFailure() << "element " << i << ": got " << got[i] << ", want " << want[i];
  return ::testing::AssertionSuccess();
}

struct Routing {
  std::vector<float> probs, gate;
  Ints expert, slot;
  float aux = 0;
};

Routing cpu_route(const std::vector<float>& logits, const MoeShape& s, bool renormalize, float coeff) {
  Routing r{std::vector<float>(logits.size()), std::vector<float>(static_cast<std::size_t>(s.tokens * s.topk)),
            Ints(static_cast<std::size_t>(s.tokens * s.topk)), Ints(static_cast<std::size_t>(s.tokens * s.topk))};
  r.aux = cpu::router_forward<float>(logits, r.probs, r.expert, r.slot, r.gate, s, renormalize, coeff);
  return r;
}

// The GPU router on logits of type TL (float or bf16), its outputs downloaded.
template <class TL>
Routing gpu_route(const std::vector<float>& logits, const MoeShape& s, bool renormalize, float coeff) {
  const auto n = static_cast<std::size_t>(s.tokens * s.topk);
  DeviceBuffer<float> probs(logits.size()), gate(n), aux(1);
  DeviceBuffer<std::int32_t> expert(n), slot(n);
  DeviceBuffer<unsigned char> workspace(router_workspace_bytes(s));
  if constexpr (std::is_same_v<TL, float>) {
    const DeviceBuffer<float> d{std::span<const float>(logits)};
    router_forward(d.data(), probs.data(), expert.data(), slot.data(), gate.data(), aux.data(), s, renormalize, coeff,
                   workspace.data(), nullptr);
    PX_CUDA_CHECK(cudaDeviceSynchronize());
  } else {
    const std::vector<bf16> b = to_bf16(logits);
    const DeviceBuffer<bf16> d{std::span<const bf16>(b)};
    router_forward(d.data(), probs.data(), expert.data(), slot.data(), gate.data(), aux.data(), s, renormalize, coeff,
                   workspace.data(), nullptr);
    PX_CUDA_CHECK(cudaDeviceSynchronize());
  }
  return {probs.download(), gate.download(), expert.download(), slot.download(), aux.download()[0]};
}

struct Case {
  MoeShape shape;
  bool renormalize;
};

// Drops in every case (capacity below the mean load); tokens past one 256-thread scan chunk;
// experts below, at and above a warp's 32 lanes.
const Case kCases[] = {
    {{.tokens = 37, .experts = 8, .topk = 2, .capacity = 7}, false},
    {{.tokens = 37, .experts = 8, .topk = 2, .capacity = 7}, true},
    {{.tokens = 1000, .experts = 64, .topk = 8, .capacity = 100}, true},
    {{.tokens = 300, .experts = 5, .topk = 3, .capacity = 150}, false},
    {{.tokens = 513, .experts = 40, .topk = 4, .capacity = 40}, true},
    {{.tokens = 64, .experts = 32, .topk = 1, .capacity = 1}, false},
};

std::string describe(const Case& c) {
  return "tokens " + std::to_string(c.shape.tokens) + " experts " + std::to_string(c.shape.experts) + " topk " +
         std::to_string(c.shape.topk) + " capacity " + std::to_string(c.shape.capacity) +
         (c.renormalize ? " renormalized" : "");
}

TEST(CudaMoeRouter, ForwardMatchesTheCpuExactlyInAssignments) {
  PX_REQUIRE_GPU();
  std::uint64_t seed = 20;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const float coeff = 0.01f;
    const std::vector<float> logits = separated_logits(c.shape, seed++);
    const Routing want = cpu_route(logits, c.shape, c.renormalize, coeff);
    ASSERT_GT(dropped(want.expert), 0);
    const Routing got = gpu_route<float>(logits, c.shape, c.renormalize, coeff);
    EXPECT_TRUE(same(got.expert, want.expert));
    EXPECT_TRUE(same(got.slot, want.slot));
    EXPECT_TRUE(close(got.probs, want.probs, 1e-9, 1e-5));
    EXPECT_TRUE(close(got.gate, want.gate, 1e-9, 1e-5));
    EXPECT_TRUE(close(std::vector<float>{got.aux}, std::vector<float>{want.aux}, 1e-9, 1e-5));

    // bf16 logits: the CPU routes their fp32 values.
    const std::vector<float> rounded = round_bf16(logits);
    const Routing want16 = cpu_route(rounded, c.shape, c.renormalize, coeff);
    const Routing got16 = gpu_route<bf16>(rounded, c.shape, c.renormalize, coeff);
    EXPECT_TRUE(same(got16.expert, want16.expert));
    EXPECT_TRUE(same(got16.slot, want16.slot));
    EXPECT_TRUE(close(got16.probs, want16.probs, 1e-9, 1e-5));
    EXPECT_TRUE(close(got16.gate, want16.gate, 1e-9, 1e-5));
    EXPECT_TRUE(close(std::vector<float>{got16.aux}, std::vector<float>{want16.aux}, 1e-9, 1e-5));
  }
}

TEST(CudaMoeRouter, TiesGoToTheLowerExpert) {
  PX_REQUIRE_GPU();
  // Exactly tied logits give bit-identical probabilities on both sides: the CPU test's case.
  const MoeShape s{.tokens = 3, .experts = 4, .topk = 2, .capacity = 3};
  const std::vector<float> logits = {0, 0, 0, 0, 1, 2, 2, 0, 2, 1, 2, 2};
  const Routing got = gpu_route<float>(logits, s, false, 0.0f);
  EXPECT_TRUE(same(got.expert, Ints{0, 1, 1, 2, 0, 2}));
  EXPECT_TRUE(same(got.slot, cpu_route(logits, s, false, 0.0f).slot));
}

TEST(CudaMoeRouter, BackwardMatchesTheCpu) {
  PX_REQUIRE_GPU();
  std::uint64_t seed = 40;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const MoeShape& s = c.shape;
    const float coeff = 0.3f;
    const std::vector<float> logits = separated_logits(s, seed++);
    // The CPU runs on the GPU forward's own probs and routing, so only the backward is compared.
    const Routing fwd = gpu_route<float>(logits, s, c.renormalize, coeff);
    const std::vector<float> d_gate = uniform(fwd.gate.size(), seed++, -1.0f, 1.0f);
    std::vector<float> want(fwd.probs.size());
    cpu::router_backward<float>(d_gate, fwd.probs, fwd.expert, want, s, c.renormalize, coeff);

    const DeviceBuffer<float> dd_gate{std::span<const float>(d_gate)}, probs{std::span<const float>(fwd.probs)};
    const DeviceBuffer<std::int32_t> expert{std::span<const std::int32_t>(fwd.expert)};
    DeviceBuffer<float> d_logits(fwd.probs.size());
    DeviceBuffer<unsigned char> workspace(router_workspace_bytes(s));
    router_backward(dd_gate.data(), probs.data(), expert.data(), d_logits.data(), s, c.renormalize, coeff,
                    workspace.data(), nullptr);
    EXPECT_TRUE(close(d_logits.download(), want, 1e-6, 1e-4));
  }
}

// Device copies of one routing, with its dispatch map.
struct DeviceRouting {
  DeviceBuffer<std::int32_t> expert, slot, map;
  DeviceBuffer<float> gate;
  DeviceRouting(const Routing& r, const MoeShape& s)
      : expert{std::span<const std::int32_t>(r.expert)},
        slot{std::span<const std::int32_t>(r.slot)},
        map(static_cast<std::size_t>(s.experts * s.capacity)),
        gate{std::span<const float>(r.gate)} {
    dispatch_map(expert.data(), slot.data(), map.data(), s, nullptr);
  }
};

std::vector<float> download_bf16(const DeviceBuffer<bf16>& d) { return to_float(d.download()); }

TEST(CudaMoePermute, ForwardAndBackwardMatchTheCpu) {
  PX_REQUIRE_GPU();
  const MoeShape s{.tokens = 37, .experts = 8, .topk = 2, .capacity = 7};
  const Routing r = gpu_route<float>(separated_logits(s, 60), s, true, 0.0f);
  ASSERT_GT(dropped(r.expert), 0);
  const DeviceRouting dr(r, s);

  Ints map(static_cast<std::size_t>(s.experts * s.capacity), -1);
  for (i64 i = 0; i < s.tokens * s.topk; ++i)
    if (r.expert[i] >= 0) map[r.expert[i] * s.capacity + r.slot[i]] = static_cast<std::int32_t>(i);
  EXPECT_TRUE(same(dr.map.download(), map));
  ASSERT_GT(std::count(map.begin(), map.end(), -1), 0);  // empty rows to zero

  // 264: rows of whole 16-byte vectors; 75: every row misaligned, the scalar path.
  for (const i64 h : {i64{264}, i64{75}}) {
    SCOPED_TRACE(::testing::Message() << "hidden " << h);
    const auto rows = static_cast<std::size_t>(s.experts * s.capacity * h),
               toks = static_cast<std::size_t>(s.tokens * h);
    const std::vector<float> x = round_bf16(uniform(toks, 61, -1.0f, 1.0f));
    const std::vector<float> out = round_bf16(uniform(rows, 62, -1.0f, 1.0f));
    const std::vector<float> dy = round_bf16(uniform(toks, 63, -1.0f, 1.0f));
    const std::vector<float> d_disp = round_bf16(uniform(rows, 64, -1.0f, 1.0f));
    const std::vector<bf16> x16 = to_bf16(x), out16 = to_bf16(out), dy16 = to_bf16(dy), d_disp16 = to_bf16(d_disp);
    const DeviceBuffer<bf16> d_x_in{std::span<const bf16>(x16)}, d_out_in{std::span<const bf16>(out16)},
        d_dy{std::span<const bf16>(dy16)}, d_ddisp{std::span<const bf16>(d_disp16)};

    std::vector<float> dispatched(rows), d_x(toks), y(toks), d_expert_out(rows), d_gate(r.gate.size());
    cpu::permute_forward<float>(x, r.expert, r.slot, dispatched, s, h);
    cpu::permute_backward<float>(d_disp, r.expert, r.slot, d_x, s, h);
    cpu::unpermute_forward<float>(out, r.expert, r.slot, r.gate, y, s, h);
    cpu::unpermute_backward<float>(dy, out, r.expert, r.slot, r.gate, d_expert_out, d_gate, s, h);

    DeviceBuffer<bf16> g_disp(rows), g_dx(toks), g_y(toks), g_dout(rows);
    DeviceBuffer<float> g_dgate(r.gate.size());
    // Poison the outputs: every element must be written, empty rows and dropped gates included.
    PX_CUDA_CHECK(cudaMemset(g_disp.data(), 0x7f, g_disp.bytes()));
    PX_CUDA_CHECK(cudaMemset(g_dout.data(), 0x7f, g_dout.bytes()));
    PX_CUDA_CHECK(cudaMemset(g_dgate.data(), 0x7f, g_dgate.bytes()));
    permute_forward(d_x_in.data(), dr.map.data(), g_disp.data(), s, h, nullptr);
    permute_backward(d_ddisp.data(), dr.expert.data(), dr.slot.data(), g_dx.data(), s, h, nullptr);
    unpermute_forward(d_out_in.data(), dr.expert.data(), dr.slot.data(), dr.gate.data(), g_y.data(), s, h, nullptr);
    unpermute_backward(d_dy.data(), d_out_in.data(), dr.gate.data(), dr.map.data(), g_dout.data(), g_dgate.data(), s, h,
                       nullptr);
    PX_CUDA_CHECK(cudaDeviceSynchronize());

    EXPECT_TRUE(same(download_bf16(g_disp), dispatched));
    EXPECT_TRUE(same(download_bf16(g_dx), round_bf16(d_x)));
    EXPECT_TRUE(close(download_bf16(g_y), y, 1e-6, kBf16Ulp));
    EXPECT_TRUE(same(download_bf16(g_dout), round_bf16(d_expert_out)));
    EXPECT_TRUE(close(g_dgate.download(), d_gate, 1e-4, 1e-4));
  }
}

TEST(CudaMoePermute, ZeroCapacityDropsEverything) {
  PX_REQUIRE_GPU();
  const MoeShape s{.tokens = 5, .experts = 4, .topk = 2, .capacity = 0};
  const i64 h = 16;
  const Routing r = gpu_route<float>(separated_logits(s, 70), s, false, 0.0f);
  EXPECT_TRUE(same(r.expert, Ints(10, -1)));
  EXPECT_TRUE(same(r.slot, Ints(10, -1)));
  EXPECT_TRUE(same(r.gate, std::vector<float>(10, 0.0f)));
  const DeviceRouting dr(r, s);
  const std::vector<bf16> dy = to_bf16(uniform(static_cast<std::size_t>(s.tokens * h), 71, -1.0f, 1.0f));
  const DeviceBuffer<bf16> d_dy{std::span<const bf16>(dy)}, none;
  DeviceBuffer<bf16> y(static_cast<std::size_t>(s.tokens * h)), d_x(static_cast<std::size_t>(s.tokens * h)), d_out;
  DeviceBuffer<float> d_gate(10);
  PX_CUDA_CHECK(cudaMemset(d_gate.data(), 0x7f, d_gate.bytes()));
  unpermute_forward(none.data(), dr.expert.data(), dr.slot.data(), dr.gate.data(), y.data(), s, h, nullptr);
  permute_backward(none.data(), dr.expert.data(), dr.slot.data(), d_x.data(), s, h, nullptr);
  unpermute_backward(d_dy.data(), none.data(), dr.gate.data(), dr.map.data(), d_out.data(), d_gate.data(), s, h,
                     nullptr);
  PX_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(same(download_bf16(y), std::vector<float>(y.size(), 0.0f)));
  EXPECT_TRUE(same(download_bf16(d_x), std::vector<float>(d_x.size(), 0.0f)));
  EXPECT_TRUE(same(d_gate.download(), std::vector<float>(10, 0.0f)));
}

}  // namespace
}  // namespace px::cuda
