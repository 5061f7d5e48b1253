// bench_cuda_training: the bandwidth-bound training kernels against the copy engine's yardstick.
// Cross-entropy on 8192 rows x 50304 (GPT-2's padded vocabulary, 8 x 1024 tokens): the fused
// single-rank forward, the three-phase forward (row max, partials, loss: two reads of the logits)
// and the backward (one read, one write). AdamW over the tensors of GPT-2 124M and 1.5B (every
// weight, bias and norm, one multi-tensor call: fp32 p, g, m, v read, p, m, v and the bf16 copy
// written, 30 bytes per parameter) and the gradient sum of squares of the same tensors.
//
// Each iteration times, with CUDA events, the kernel and then a cudaMemcpyAsync device to device
// moving the same bytes (a copy of half the kernel's traffic: it reads and writes that much), so
// both see the same clocks and temperature. GB/s counts bytes read plus bytes written, for both.
// The iteration time is the kernel's (UseManualTime); counters: GB/s, copy_GB/s and vs_copy =
// kernel GB/s / copy GB/s (the goal is >= 0.8). Without a GPU every benchmark reports the error
// and measures nothing.
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "engine/backends/cuda/adamw.hpp"
#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/cross_entropy.hpp"
#include "engine/backends/cuda/device_buffer.hpp"

namespace {

using px::cuda::bf16;
using px::cuda::DeviceBuffer;
using i64 = std::int64_t;

bool require_gpu(benchmark::State& state) {
  if (px::cuda::device_count() > 0) return true;
  state.SkipWithError("no CUDA device on this machine");
  return false;
}

// Times one kernel and its yardstick copy per iteration and reports the counters.
class Timer {
 public:
  Timer() {
    PX_CUDA_CHECK(cudaEventCreate(&start_));
    PX_CUDA_CHECK(cudaEventCreate(&mid_));
    PX_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  ~Timer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(mid_);
    (void)cudaEventDestroy(stop_);
  }

  // bytes: the kernel's traffic; copy_dst / copy_src: bytes / 2 each, not overlapping.
  template <class Kernel>
  void run(benchmark::State& state, double bytes, void* copy_dst, const void* copy_src, Kernel&& kernel) {
    const auto copy_bytes = static_cast<std::size_t>(bytes / 2);
    kernel();  // warm-up: first-launch costs and clocks out of the measurement
    PX_CUDA_CHECK(cudaMemcpyAsync(copy_dst, copy_src, copy_bytes, cudaMemcpyDeviceToDevice, nullptr));
    PX_CUDA_CHECK(cudaDeviceSynchronize());
    double kernel_s = 0, copy_s = 0;
    for (auto _ : state) {
      PX_CUDA_CHECK(cudaEventRecord(start_, nullptr));
      kernel();
      PX_CUDA_CHECK(cudaEventRecord(mid_, nullptr));
      PX_CUDA_CHECK(cudaMemcpyAsync(copy_dst, copy_src, copy_bytes, cudaMemcpyDeviceToDevice, nullptr));
      PX_CUDA_CHECK(cudaEventRecord(stop_, nullptr));
      PX_CUDA_CHECK(cudaEventSynchronize(stop_));
      float k_ms = 0, c_ms = 0;
      PX_CUDA_CHECK(cudaEventElapsedTime(&k_ms, start_, mid_));
      PX_CUDA_CHECK(cudaEventElapsedTime(&c_ms, mid_, stop_));
      state.SetIterationTime(k_ms * 1e-3);
      kernel_s += k_ms * 1e-3;
      copy_s += c_ms * 1e-3;
    }
    const auto n = static_cast<double>(state.iterations());
    const double kernel_gbps = bytes * n / kernel_s * 1e-9,
                 copy_gbps = 2.0 * static_cast<double>(copy_bytes) * n / copy_s * 1e-9;
    state.counters["GB/s"] = kernel_gbps;
    state.counters["copy_GB/s"] = copy_gbps;
    state.counters["vs_copy"] = kernel_gbps / copy_gbps;
    state.SetBytesProcessed(static_cast<i64>(bytes * n));
  }

 private:
  cudaEvent_t start_ = nullptr, mid_ = nullptr, stop_ = nullptr;
};

// ---- cross-entropy ----------------------------------------------------------------------------

constexpr i64 kRows = 8192, kVocab = 50304;

struct CrossEntropyData {
  DeviceBuffer<bf16> logits{static_cast<std::size_t>(kRows * kVocab)},
      dlogits{static_cast<std::size_t>(kRows * kVocab)};
  DeviceBuffer<std::int32_t> targets{static_cast<std::size_t>(kRows)};
  DeviceBuffer<float> row_max{static_cast<std::size_t>(kRows)}, sum_exp{static_cast<std::size_t>(kRows)},
      target_logit{static_cast<std::size_t>(kRows)}, loss{static_cast<std::size_t>(kRows)},
      dloss{static_cast<std::size_t>(kRows)};
  CrossEntropyData() {
    // Byte patterns, not random data: the kernels have no value-dependent work worth measuring,
    // and filling 800 MB from the host would dominate the run. 0x3c3c is bf16 0.0115.
    PX_CUDA_CHECK(cudaMemset(logits.data(), 0x3c, logits.bytes()));
    targets.zero();
    PX_CUDA_CHECK(cudaMemset(dloss.data(), 0x3c, dloss.bytes()));
    px::cuda::cross_entropy_forward_fused(logits.data(), targets.data(), row_max.data(), sum_exp.data(),
                                          target_logit.data(), loss.data(), kRows, kVocab, nullptr);
  }
  double logit_bytes() const { return static_cast<double>(logits.bytes()); }
};

void BM_CrossEntropyFusedForward(benchmark::State& state) {
  if (!require_gpu(state)) return;
  CrossEntropyData d;
  Timer timer;
  timer.run(state, d.logit_bytes(), d.dlogits.data(), d.logits.data(), [&] {
    px::cuda::cross_entropy_forward_fused(d.logits.data(), d.targets.data(), d.row_max.data(), d.sum_exp.data(),
                                          d.target_logit.data(), d.loss.data(), kRows, kVocab, nullptr);
  });
}

void BM_CrossEntropyThreePhaseForward(benchmark::State& state) {
  if (!require_gpu(state)) return;
  CrossEntropyData d;
  Timer timer;
  timer.run(state, 2 * d.logit_bytes(), d.dlogits.data(), d.logits.data(), [&] {
    px::cuda::cross_entropy_row_max(d.logits.data(), d.row_max.data(), kRows, kVocab, nullptr);
    px::cuda::cross_entropy_partials(d.logits.data(), d.targets.data(), 0, d.row_max.data(), d.sum_exp.data(),
                                     d.target_logit.data(), kRows, kVocab, nullptr);
    px::cuda::cross_entropy_loss(d.row_max.data(), d.sum_exp.data(), d.target_logit.data(), d.loss.data(), kRows,
                                 nullptr);
  });
}

void BM_CrossEntropyBackward(benchmark::State& state) {
  if (!require_gpu(state)) return;
  CrossEntropyData d;
  Timer timer;
  timer.run(state, 2 * d.logit_bytes(), d.dlogits.data(), d.logits.data(), [&] {
    px::cuda::cross_entropy_backward(d.logits.data(), d.targets.data(), 0, d.row_max.data(), d.sum_exp.data(),
                                     d.dloss.data(), d.dlogits.data(), kRows, kVocab, nullptr);
  });
}

// ---- AdamW and the gradient norm --------------------------------------------------------------

// Parameter counts of GPT-2's tensors (tied embedding, vocab 50257, 1024 positions).
std::vector<i64> gpt2_tensors(i64 h, i64 layers) {
  std::vector<i64> t = {50257 * h, 1024 * h};
  for (i64 l = 0; l < layers; ++l)
    for (const i64 n : {h, h, h * 3 * h, 3 * h, h * h, h, h, h, h * 4 * h, 4 * h, 4 * h * h, h}) t.push_back(n);
  t.push_back(h);
  t.push_back(h);
  return t;
}

// All tensors' state carved from one arena, each 16-byte aligned. The arena is 30 bytes per
// parameter (more than the 18 the state needs) so the yardstick copy of 15 bytes per parameter
// has a source and a destination half inside it (the 1.5B model's 47 GB fit an 80 GB H100, twice
// the state would not). The copy overwrites part of v and the bf16 copy with zeros, which is what
// they hold: all-zero state is a fixed point of the step.
struct AdamWData {
  std::vector<i64> counts;
  i64 params = 0;
  DeviceBuffer<std::byte> arena;
  std::vector<px::cuda::AdamWTensor> tensors;
  std::vector<px::cuda::GradTensor> grads;

  static i64 total(const std::vector<i64>& c) {
    i64 n = 0;
    for (const i64 x : c) n += (x + 3) / 4 * 4;
    return n;
  }
  explicit AdamWData(std::vector<i64> c)
      : counts(std::move(c)), params(total(counts)), arena(static_cast<std::size_t>(30 * params)) {
    // Zeros are a fixed point of the step (m = v = 0, p stays 0): no denormals, no drift.
    arena.zero();
    std::byte* base = arena.data();
    auto take = [&](i64 bytes_per_param) {
      std::byte* p = base;
      base += bytes_per_param * params;
      return p;
    };
    auto* p = reinterpret_cast<float*>(take(4));
    auto* g = reinterpret_cast<float*>(take(4));
    auto* m = reinterpret_cast<float*>(take(4));
    auto* v = reinterpret_cast<float*>(take(4));
    auto* b = reinterpret_cast<bf16*>(take(2));
    i64 at = 0;
    for (const i64 n : counts) {
      tensors.push_back({p + at, g + at, m + at, v + at, b + at, n});
      grads.push_back({g + at, n});
      at += (n + 3) / 4 * 4;
    }
  }
  std::byte* copy_src() { return arena.data(); }
  std::byte* copy_dst() { return arena.data() + 15 * params; }
};

void BM_AdamW(benchmark::State& state, i64 h, i64 layers) {
  if (!require_gpu(state)) return;
  AdamWData d(gpt2_tensors(h, layers));
  const px::cuda::AdamWConfig cfg{};
  i64 step = 1;
  Timer timer;
  timer.run(state, 30.0 * static_cast<double>(d.params), d.copy_dst(), d.copy_src(), [&] {
    px::cuda::adamw_step(d.tensors, cfg, px::cuda::AdamWStep{step++, 1.0, nullptr}, nullptr);
  });
  state.counters["params"] = static_cast<double>(d.params);
  state.counters["tensors"] = static_cast<double>(d.tensors.size());
}

void BM_SumOfSquares(benchmark::State& state, i64 h, i64 layers) {
  if (!require_gpu(state)) return;
  AdamWData d(gpt2_tensors(h, layers));
  DeviceBuffer<double> out(1), workspace(px::cuda::sum_of_squares_workspace_doubles());
  Timer timer;
  timer.run(state, 4.0 * static_cast<double>(d.params), d.copy_dst(), d.copy_src(),
            [&] { px::cuda::sum_of_squares(d.grads, out.data(), workspace.data(), nullptr); });
  state.counters["params"] = static_cast<double>(d.params);
}

BENCHMARK(BM_CrossEntropyFusedForward)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CrossEntropyThreePhaseForward)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CrossEntropyBackward)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_AdamW, gpt2_124m, 768, 12)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_AdamW, gpt2_1_5b, 1600, 48)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_SumOfSquares, gpt2_124m, 768, 12)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_SumOfSquares, gpt2_1_5b, 1600, 48)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
