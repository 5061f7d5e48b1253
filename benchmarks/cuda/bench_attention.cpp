// Fused causal attention throughput in TFLOP/s at the shapes the plans produce: GPT-2 124M and
// 1.5B (12 and 25 heads of 64), a GPT-3 175B tensor-parallel-8 shard (12 heads of 128) and a
// Llama-3 70B tp8 shard (8 query heads sharing 1 key/value head of 128), forward and backward.
//
// FLOPs counted are the causal half of the dense products, the convention of the flash-attention
// papers: forward 2 products (q k^T, P v) of 2 * s * s * d each per (sequence, head), halved by the
// mask, = 2 * 2 * b * heads * s * s * d / 2; backward 5 products (q k^T recomputed, P^T dout,
// dout v^T, dS k, dS^T q) = 2.5x the forward. The yardstick is the GPU's dense bf16 peak (H100 and
// H200 SXM: 989 TFLOP/s, reached only by wgmma; these kernels issue WMMA, i.e. mma.sync).
// Times are cudaEvent pairs around each call (manual time); the backward includes its delta pass.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "engine/backends/cuda/attention.hpp"
#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/device_buffer.hpp"

namespace {

using px::cuda::bf16;
using px::cuda::DeviceBuffer;

struct Shape {
  std::int64_t b, heads, groups, d, s;
};

double forward_flops(const Shape& x) {
  return 2.0 * 2.0 * double(x.b * x.heads) * double(x.s) * double(x.s) * double(x.d) / 2.0;
}

DeviceBuffer<bf16> random_device(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(gen);
  const auto h = px::cuda::to_bf16(x);
  return DeviceBuffer<bf16>(std::span<const bf16>(h));
}

void run(benchmark::State& state, const Shape& x, bool backward) {
  if (px::cuda::device_count() == 0) {
    state.SkipWithError("no CUDA device on this machine");
    return;
  }
  const std::int64_t rows = x.s * x.b, ld = (x.heads + 2 * x.groups) * x.d, hd = x.heads * x.d;
  auto qkv = random_device(static_cast<std::size_t>(rows * ld), 1);
  auto dout = random_device(static_cast<std::size_t>(rows * hd), 2);
  DeviceBuffer<float> out(static_cast<std::size_t>(rows * hd)), lse(static_cast<std::size_t>(x.b * x.heads * x.s));
  DeviceBuffer<float> delta(lse.size()), dqkv(static_cast<std::size_t>(rows * ld));
  dqkv.zero();
  const px::cuda::AttentionShape sh{x.b, x.heads, x.groups, x.d, x.s, x.s, 0, 0};
  const px::cuda::AttentionInputs in{qkv.data(), qkv.data() + hd, qkv.data() + (x.heads + x.groups) * x.d, ld, ld, ld};
  const px::cuda::AttentionGrads grads{dqkv.data(), dqkv.data() + hd, dqkv.data() + (x.heads + x.groups) * x.d,
                                       ld, ld, ld};
  const auto call = [&] {
    if (backward) {
      px::cuda::attention_backward_delta(sh, out.data(), dout.data(), delta.data());
      px::cuda::attention_backward(sh, in, lse.data(), delta.data(), dout.data(), grads);
    } else {
      px::cuda::attention_forward(sh, in, out.data(), lse.data(), true);
    }
  };
  px::cuda::attention_forward(sh, in, out.data(), lse.data(), true);  // the out and lse the backward reads
  call();                                                               // warm-up
  PX_CUDA_CHECK(cudaDeviceSynchronize());

  cudaEvent_t start = nullptr, stop = nullptr;
  PX_CUDA_CHECK(cudaEventCreate(&start));
  PX_CUDA_CHECK(cudaEventCreate(&stop));
  for (auto _ : state) {
    PX_CUDA_CHECK(cudaEventRecord(start));
    call();
    PX_CUDA_CHECK(cudaEventRecord(stop));
    PX_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    PX_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(double(ms) / 1e3);
  }
  PX_CUDA_CHECK(cudaEventDestroy(start));
  PX_CUDA_CHECK(cudaEventDestroy(stop));
  const double flops = forward_flops(x) * (backward ? 2.5 : 1.0);
  state.counters["TFLOP/s"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
}

constexpr Shape kGpt2Small{8, 12, 12, 64, 1024};
constexpr Shape kGpt2Xl{8, 25, 25, 64, 1024};
constexpr Shape kGpt3Tp8{4, 12, 12, 128, 2048};
constexpr Shape kLlama3_70bTp8{1, 8, 1, 128, 8192};

}  // namespace

BENCHMARK_CAPTURE(run, gpt2_124m_forward, kGpt2Small, false)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(run, gpt2_124m_backward, kGpt2Small, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(run, gpt2_1_5b_forward, kGpt2Xl, false)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(run, gpt2_1_5b_backward, kGpt2Xl, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(run, gpt3_175b_tp8_forward, kGpt3Tp8, false)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(run, gpt3_175b_tp8_backward, kGpt3Tp8, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(run, llama3_70b_tp8_forward, kLlama3_70bTp8, false)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(run, llama3_70b_tp8_backward, kLlama3_70bTp8, true)->UseManualTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
