// bench_cuda_bandwidth: the bandwidth-bound kernels of parallax_cuda_elementwise (LayerNorm,
// RMSNorm, GELU, SwiGLU, dropout-add, RoPE, embedding; forward and backward) against the
// yardstick of a device-to-device copy moving the same bytes. Sizes: 8192 token rows (8 x 1024 or
// 4 x 2048) at GPT-2 1.5B's hidden size 1600 and GPT-3 175B's 12288 (its tensor-parallel shards
// of the MLP and attention heads where a kernel sees a shard).
//
// Traffic is the bytes a kernel must move at least (every input read once, every output written
// once; small per-column vectors and per-row statistics included), and a copy of half that many
// bytes reads and writes the same total. Each iteration flushes L2 (a memset over twice its size,
// untimed: at 1600 columns a whole tensor would otherwise stay cached between launches and flatter
// both sides), then times the kernel and, after another flush, the copy, with CUDA events, so both
// see the same clocks. The iteration time is the kernel's (UseManualTime); counters: GB/s,
// copy_GB/s and of_copy = kernel / copy (the goal is >= 0.8). Without a GPU every benchmark
// reports the error and measures nothing.
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "engine/backends/cuda/activation.hpp"
#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/backends/cuda/dropout.hpp"
#include "engine/backends/cuda/embedding.hpp"
#include "engine/backends/cuda/norm.hpp"
#include "engine/backends/cuda/rope.hpp"

namespace {

using px::cuda::bf16;
using px::cuda::DeviceBuffer;
using i64 = std::int64_t;

constexpr float kEps = 1e-5f;

bool require_gpu(benchmark::State& state) {
  if (px::cuda::device_count() > 0) return true;
  state.SkipWithError("no CUDA device on this machine");
  return false;
}

// A device tensor of n elements with arbitrary finite contents (a byte pattern: the kernels'
// speed does not depend on the values, and filling 200 MB from the host would dominate setup).
template <class T>
DeviceBuffer<T> filled(std::size_t n, int byte = 0x3c) {
  DeviceBuffer<T> b(n);
  if (n > 0) PX_CUDA_CHECK(cudaMemset(b.data(), byte, b.bytes()));
  return b;
}

class Bench {
 public:
  Bench() {
    int device = 0, l2 = 0;
    PX_CUDA_CHECK(cudaGetDevice(&device));
    PX_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    flush_ = DeviceBuffer<unsigned char>(2 * static_cast<std::size_t>(l2));
    PX_CUDA_CHECK(cudaEventCreate(&start_));
    PX_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;
  ~Bench() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }

  // bytes: the kernel's traffic. Runs the benchmark loop and sets the counters.
  void run(benchmark::State& state, double bytes, const std::function<void()>& kernel) {
    const auto half = static_cast<std::size_t>(bytes / 2);
    DeviceBuffer<unsigned char> src = filled<unsigned char>(half), dst(half);
    const auto copy = [&] {
      PX_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), half, cudaMemcpyDeviceToDevice, nullptr));
    };
    kernel();  // warm-up: first-launch costs out of the measurement
    copy();
    PX_CUDA_CHECK(cudaDeviceSynchronize());
    double kernel_s = 0, copy_s = 0;
    for (auto _ : state) {
      const double k = timed(kernel);
      copy_s += timed(copy);
      state.SetIterationTime(k);
      kernel_s += k;
    }
    const auto n = static_cast<double>(state.iterations());
    const double gbps = bytes * n / kernel_s * 1e-9, copy_gbps = 2.0 * static_cast<double>(half) * n / copy_s * 1e-9;
    state.SetBytesProcessed(static_cast<std::int64_t>(bytes * n));
    state.counters["GB/s"] = gbps;
    state.counters["copy_GB/s"] = copy_gbps;
    state.counters["of_copy"] = gbps / copy_gbps;
  }

 private:
  template <class F>
  double timed(const F& f) {
    PX_CUDA_CHECK(cudaMemsetAsync(flush_.data(), ++flushes_ & 0xff, flush_.bytes(), nullptr));
    PX_CUDA_CHECK(cudaEventRecord(start_, nullptr));
    f();
    PX_CUDA_CHECK(cudaEventRecord(stop_, nullptr));
    PX_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    PX_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e-3;
  }

  DeviceBuffer<unsigned char> flush_;
  int flushes_ = 0;
  cudaEvent_t start_{}, stop_{};
};

// Runs body(state) unless there is no GPU; a CUDA error becomes the benchmark's error.
template <class Body>
void guarded(benchmark::State& state, Body&& body) {
  if (!require_gpu(state)) return;
  try {
    body();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

double dbl(i64 v) { return static_cast<double>(v); }
i64 rows_of(const benchmark::State& s) { return s.range(0); }
i64 cols_of(const benchmark::State& s) { return s.range(1); }
std::size_t elems(const benchmark::State& s) { return static_cast<std::size_t>(rows_of(s) * cols_of(s)); }

void BM_LayerNormForward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 rows = rows_of(state), cols = cols_of(state);
    auto x = filled<bf16>(elems(state)), y = filled<bf16>(elems(state)), g = filled<bf16>(cols), b = filled<bf16>(cols);
    auto mean = filled<float>(rows, 0), rstd = filled<float>(rows, 0);
    Bench bench;
    bench.run(state, 4.0 * dbl(rows * cols) + 4.0 * dbl(cols) + 8.0 * dbl(rows), [&] {
      px::cuda::layernorm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), rows, cols, kEps);
    });
  });
}

// With the forward's saved statistics, as training runs it: dy, x and dx read, dx written.
void BM_LayerNormBackward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 rows = rows_of(state), cols = cols_of(state);
    auto dy = filled<bf16>(elems(state)), x = filled<bf16>(elems(state)), dx = filled<bf16>(elems(state), 0);
    auto g = filled<bf16>(cols);
    auto dg = filled<float>(cols, 0), db = filled<float>(cols, 0);
    auto mean = filled<float>(rows, 0), rstd = filled<float>(rows, 0);
    DeviceBuffer<unsigned char> ws(px::cuda::norm_backward_workspace_bytes(rows, cols));
    Bench bench;
    bench.run(state, 8.0 * dbl(rows * cols) + 18.0 * dbl(cols) + 8.0 * dbl(rows), [&] {
      px::cuda::layernorm_backward(dy.data(), x.data(), g.data(), mean.data(), rstd.data(), dx.data(), dg.data(), db.data(),
                                   rows, cols, kEps, ws.data(), ws.bytes());
    });
  });
}

void BM_RmsNormForward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 rows = rows_of(state), cols = cols_of(state);
    auto x = filled<bf16>(elems(state)), y = filled<bf16>(elems(state)), g = filled<bf16>(cols);
    auto rstd = filled<float>(rows, 0);
    Bench bench;
    bench.run(state, 4.0 * dbl(rows * cols) + 2.0 * dbl(cols) + 4.0 * dbl(rows),
              [&] { px::cuda::rmsnorm_forward(x.data(), g.data(), y.data(), rstd.data(), rows, cols, kEps); });
  });
}

void BM_RmsNormBackward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 rows = rows_of(state), cols = cols_of(state);
    auto dy = filled<bf16>(elems(state)), x = filled<bf16>(elems(state)), dx = filled<bf16>(elems(state), 0);
    auto g = filled<bf16>(cols);
    auto dg = filled<float>(cols, 0), rstd = filled<float>(rows, 0);
    DeviceBuffer<unsigned char> ws(px::cuda::norm_backward_workspace_bytes(rows, cols));
    Bench bench;
    bench.run(state, 8.0 * dbl(rows * cols) + 10.0 * dbl(cols) + 4.0 * dbl(rows), [&] {
      px::cuda::rmsnorm_backward(dy.data(), x.data(), g.data(), rstd.data(), dx.data(), dg.data(), rows, cols, kEps,
                                 ws.data(), ws.bytes());
    });
  });
}

void BM_GeluForward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 n = rows_of(state) * cols_of(state);
    auto x = filled<bf16>(elems(state)), y = filled<bf16>(elems(state));
    Bench bench;
    bench.run(state, 4.0 * static_cast<double>(n), [&] { px::cuda::gelu_forward(x.data(), y.data(), n); });
  });
}

void BM_GeluBackward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 n = rows_of(state) * cols_of(state);
    auto dy = filled<bf16>(elems(state)), x = filled<bf16>(elems(state)), dx = filled<bf16>(elems(state));
    Bench bench;
    bench.run(state, 6.0 * static_cast<double>(n), [&] { px::cuda::gelu_backward(dy.data(), x.data(), dx.data(), n); });
  });
}

// rows x cols outputs from rows x 2 cols inputs.
void BM_SwigluForward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 rows = rows_of(state), cols = cols_of(state);
    auto x = filled<bf16>(2 * elems(state)), y = filled<bf16>(elems(state));
    Bench bench;
    bench.run(state, 6.0 * dbl(rows * cols), [&] { px::cuda::swiglu_forward(x.data(), y.data(), rows, cols); });
  });
}

void BM_SwigluBackward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 rows = rows_of(state), cols = cols_of(state);
    auto dy = filled<bf16>(elems(state)), x = filled<bf16>(2 * elems(state)), dx = filled<bf16>(2 * elems(state));
    Bench bench;
    bench.run(state, 10.0 * dbl(rows * cols),
              [&] { px::cuda::swiglu_backward(dy.data(), x.data(), dx.data(), rows, cols); });
  });
}

std::vector<std::uint64_t> keys_for(i64 rows) {
  std::vector<std::uint64_t> k(static_cast<std::size_t>(rows));
  for (i64 r = 0; r < rows; ++r) k[static_cast<std::size_t>(r)] = static_cast<std::uint64_t>(r) * 0x9e3779b97f4a7c15ULL;
  return k;
}

// x and residual read, out and the byte mask written (7 bytes an element).
void BM_DropoutAddForward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 rows = rows_of(state), cols = cols_of(state);
    auto x = filled<bf16>(elems(state)), res = filled<bf16>(elems(state)), out = filled<bf16>(elems(state));
    auto mask = filled<std::uint8_t>(elems(state), 0);
    const auto host_keys = keys_for(rows);
    DeviceBuffer<std::uint64_t> keys{std::span<const std::uint64_t>(host_keys)};
    Bench bench;
    bench.run(state, 7.0 * dbl(rows * cols) + 8.0 * dbl(rows), [&] {
      px::cuda::dropout_add_forward(x.data(), res.data(), out.data(), mask.data(), keys.data(), rows, cols, 0.1, 1234);
    });
  });
}

void BM_DropoutBackward(benchmark::State& state) {
  guarded(state, [&] {
    const i64 n = rows_of(state) * cols_of(state);
    auto dy = filled<bf16>(elems(state)), dx = filled<bf16>(elems(state));
    auto mask = filled<std::uint8_t>(elems(state), 1);
    Bench bench;
    bench.run(state, 5.0 * static_cast<double>(n),
              [&] { px::cuda::dropout_backward(dy.data(), mask.data(), dx.data(), n, 0.1); });
  });
}

// Q and K heads of a packed qkv row rotated in place: range(1) is the model's hidden size; GPT-2
// 1.5B: 25 heads of 64, unsharded; GPT-3: 96 heads of 128 over tensor-parallel 8, 12 a rank.
void BM_Rope(benchmark::State& state) {
  guarded(state, [&] {
    const i64 rows = rows_of(state), hidden = cols_of(state);
    const i64 d = hidden == 1600 ? 64 : 128, heads = hidden == 1600 ? 25 : 12;
    const i64 ld = 3 * heads * d;
    auto x = filled<bf16>(static_cast<std::size_t>(rows * ld));
    std::vector<std::int32_t> host_pos(static_cast<std::size_t>(rows));
    for (i64 r = 0; r < rows; ++r) host_pos[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(r / 4);
    DeviceBuffer<std::int32_t> pos{std::span<const std::int32_t>(host_pos)};
    Bench bench;
    bench.run(state, 8.0 * dbl(rows * heads * d) + 4.0 * dbl(rows),
              [&] { px::cuda::rope_forward(x.data(), rows, ld, 2 * heads, d, pos.data(), 10000.0); });
  });
}

// 8192 tokens drawn uniformly from a 50304-word vocabulary, learned positions (sequence-major, 4
// sequences). GPT-2 1.5B (hidden 1600) holds the whole table; the GPT-3 case (12288) is one of 8
// vocabulary shards.
struct EmbeddingSetup {
  i64 tokens, h, vocab_begin, vocab_rows, positions;
  std::vector<std::int32_t> host_tokens, host_positions;
  i64 in_shard = 0, unique_rows = 0, unique_positions = 0;

  explicit EmbeddingSetup(const benchmark::State& state)
      : tokens(rows_of(state)),
        h(cols_of(state)),
        vocab_begin(0),
        vocab_rows(h == 1600 ? 50304 : 50304 / 8),
        positions(tokens / 4) {
    std::mt19937 rng(7);
    std::set<std::int32_t> rows, pos;
    for (i64 t = 0; t < tokens; ++t) {
      const auto tok = static_cast<std::int32_t>(rng() % 50304);
      const auto p = static_cast<std::int32_t>(t / 4);
      host_tokens.push_back(tok);
      host_positions.push_back(p);
      if (tok >= vocab_begin && tok < vocab_begin + vocab_rows) {
        ++in_shard;
        rows.insert(tok);
      }
      pos.insert(p);
    }
    unique_rows = static_cast<i64>(rows.size());
    unique_positions = static_cast<i64>(pos.size());
  }
};

void BM_EmbeddingForward(benchmark::State& state) {
  guarded(state, [&] {
    const EmbeddingSetup e(state);
    DeviceBuffer<std::int32_t> tok{std::span<const std::int32_t>(e.host_tokens)},
        posn{std::span<const std::int32_t>(e.host_positions)};
    auto word = filled<bf16>(static_cast<std::size_t>(e.vocab_rows * e.h)),
         pos = filled<bf16>(static_cast<std::size_t>(e.positions * e.h));
    auto out = filled<bf16>(static_cast<std::size_t>(e.tokens * e.h));
    Bench bench;
    // out written, the shard's rows and every position row read, once per token.
    bench.run(state, 2.0 * static_cast<double>((2 * e.tokens + e.in_shard) * e.h) + 8.0 * static_cast<double>(e.tokens),
              [&] {
                px::cuda::embedding_forward(tok.data(), posn.data(), e.tokens, word.data(), e.vocab_begin, e.vocab_rows,
                                            pos.data(), out.data(), e.h);
              });
  });
}

void BM_EmbeddingBackward(benchmark::State& state) {
  guarded(state, [&] {
    const EmbeddingSetup e(state);
    DeviceBuffer<std::int32_t> tok{std::span<const std::int32_t>(e.host_tokens)},
        posn{std::span<const std::int32_t>(e.host_positions)};
    auto dy = filled<bf16>(static_cast<std::size_t>(e.tokens * e.h));
    auto dword = filled<float>(static_cast<std::size_t>(e.vocab_rows * e.h), 0),
         dpos = filled<float>(static_cast<std::size_t>(e.positions * e.h), 0);
    DeviceBuffer<unsigned char> ws(px::cuda::embedding_backward_workspace_bytes(e.tokens));
    Bench bench;
    // dy read by the word pass (shard tokens) and the position pass (all); each touched fp32
    // gradient row read and written once.
    const double bytes = 2.0 * static_cast<double>((e.in_shard + e.tokens) * e.h) +
                         8.0 * static_cast<double>((e.unique_rows + e.unique_positions) * e.h) +
                         8.0 * static_cast<double>(e.tokens);
    bench.run(state, bytes, [&] {
      px::cuda::embedding_backward(dy.data(), tok.data(), posn.data(), e.tokens, dword.data(), e.vocab_begin, e.vocab_rows,
                                   dpos.data(), e.h, ws.data(), ws.bytes());
    });
  });
}

void sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"rows", "cols"})->Args({8192, 1600})->Args({8192, 12288})->UseManualTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(BM_LayerNormForward)->Apply(sizes);
BENCHMARK(BM_LayerNormBackward)->Apply(sizes);
BENCHMARK(BM_RmsNormForward)->Apply(sizes);
BENCHMARK(BM_RmsNormBackward)->Apply(sizes);
BENCHMARK(BM_GeluForward)->Apply(sizes);
BENCHMARK(BM_GeluBackward)->Apply(sizes);
BENCHMARK(BM_SwigluForward)->Apply(sizes);
BENCHMARK(BM_SwigluBackward)->Apply(sizes);
BENCHMARK(BM_DropoutAddForward)->Apply(sizes);
BENCHMARK(BM_DropoutBackward)->Apply(sizes);
BENCHMARK(BM_Rope)->Apply(sizes);
BENCHMARK(BM_EmbeddingForward)->Apply(sizes);
BENCHMARK(BM_EmbeddingBackward)->Apply(sizes);

BENCHMARK_MAIN();
