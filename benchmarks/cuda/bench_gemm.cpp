// bench_cuda_gemm: the linear-layer GEMMs of GPT-2 124M, GPT-2 1.5B and a GPT-3 175B tensor-parallel
// shard (tp 8) on px::cuda (cuBLASLt, with its fused bias / GELU epilogue, fp32 weight-gradient
// accumulation and bias-gradient sums), each timed side by side with a plain cublasGemmEx of the same
// shape and transposes (bf16 in, fp32 compute, no epilogue): the yardstick a fused layer should
// match or beat. Every benchmark runs forward, input gradient or weight gradient of one layer on
// 8 x 1024 tokens (GPT-3: 4 x 2048); the 175B shard holds 3h/8 of qkv and 4h/8 of fc1 (column
// parallel, with bias) and the matching rows of proj and fc2 (row parallel: Megatron adds their
// bias after the all-reduce, so none here). GPT-2's output layer is the tied [vocab x h] embedding
// (y = x w^T). vocab is padded to 50304.
//
// Times come from CUDA events around both sides in the same iteration, interleaved so clocks and
// temperature treat them alike; the iteration time is ours (UseManualTime). Counters: TFLOP/s of
// both (medians over the iterations of a repetition) and vs_cublas = cuBLAS time / our time (> 1:
// faster than plain cuBLAS), reported as mean / median / stddev over 3 repetitions.
// Without a GPU every benchmark reports the error and measures nothing.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/backends/cuda/gemm.hpp"
#include "engine/core/stats.hpp"

namespace {

using px::cuda::bf16;
using px::cuda::DeviceBuffer;
using i64 = std::int64_t;

std::size_t sz(i64 v) { return static_cast<std::size_t>(v); }

struct Layer {
  std::string model, name;
  i64 tokens, in, out;
  bool bias = true;
  bool gelu = false;
  bool tied = false;  // weight stored [out x in]: y = x w^T
};

enum class Pass { Forward, InputGrad, WeightGrad };
const char* pass_name(Pass p) { return p == Pass::Forward ? "forward" : p == Pass::InputGrad ? "input_grad" : "weight_grad"; }

std::vector<Layer> layers() {
  std::vector<Layer> out;
  const auto gpt2 = [&](const std::string& model, i64 h) {
    const i64 t = 8 * 1024;
    out.push_back({model, "qkv", t, h, 3 * h});
    out.push_back({model, "proj", t, h, h});
    out.push_back({model, "fc1", t, h, 4 * h, true, true});
    out.push_back({model, "fc2", t, 4 * h, h});
    out.push_back({model, "lm_head", t, h, 50304, false, false, true});
  };
  gpt2("gpt2_124m", 768);
  gpt2("gpt2_1.5b", 1600);
  const i64 h = 12288, tp = 8, t = 4 * 2048;
  out.push_back({"gpt3_175b_tp8", "qkv", t, h, 3 * h / tp});
  out.push_back({"gpt3_175b_tp8", "proj", t, h / tp, h, false});
  out.push_back({"gpt3_175b_tp8", "fc1", t, h, 4 * h / tp, true, true});
  out.push_back({"gpt3_175b_tp8", "fc2", t, 4 * h / tp, h, false});
  return out;
}

// The device-wide objects, made once a device is known to exist.
struct Gpu {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  DeviceBuffer<std::byte> cublas_workspace{px::cuda::kGemmWorkspaceBytes};
  std::unique_ptr<px::cuda::GemmContext> ctx;
  cudaEvent_t start = nullptr, mid = nullptr, stop = nullptr;

  Gpu() {
    PX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    PX_CUDA_CHECK(cublasCreate(&cublas));
    PX_CUDA_CHECK(cublasSetStream(cublas, stream));
    // The same workspace size cuBLASLt gets, so the yardstick is not starved of split-k.
    PX_CUDA_CHECK(cublasSetWorkspace(cublas, cublas_workspace.data(), cublas_workspace.bytes()));
    ctx = std::make_unique<px::cuda::GemmContext>(stream);
    PX_CUDA_CHECK(cudaEventCreate(&start));
    PX_CUDA_CHECK(cudaEventCreate(&mid));
    PX_CUDA_CHECK(cudaEventCreate(&stop));
  }
  Gpu(const Gpu&) = delete;
  Gpu& operator=(const Gpu&) = delete;
  ~Gpu() {
    (void)cudaEventDestroy(stop);
    (void)cudaEventDestroy(mid);
    (void)cudaEventDestroy(start);
    ctx.reset();
    (void)cublasDestroy(cublas);
    (void)cudaStreamDestroy(stream);
  }
};
Gpu* gpu = nullptr;

// Random bf16 in [-1, 1) (zeros would flatter the power budget and so the clocks), tiled from one
// host pool so filling a GiB takes no host time to speak of.
template <class T>
DeviceBuffer<T> random_buffer(i64 count) {
  static const std::vector<T> pool = [] {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    std::vector<float> v(1 << 20);
    for (float& x : v) x = dist(rng);
    if constexpr (std::is_same_v<T, float>)
      return v;
    else
      return px::cuda::to_bf16(v);
  }();
  DeviceBuffer<T> b(sz(count));
  for (std::size_t at = 0; at < b.size(); at += pool.size())
    PX_CUDA_CHECK(cudaMemcpy(b.data() + at, pool.data(), std::min(pool.size(), b.size() - at) * sizeof(T), cudaMemcpyHostToDevice));
  return b;
}

void run(benchmark::State& state, const Layer& L, Pass pass) {
  if (!gpu) {
    state.SkipWithError("no CUDA device on this machine");
    return;
  }
  const i64 m = L.tokens, n = L.out, k = L.in;
  const double flops = 2.0 * double(m) * double(n) * double(k);
  DeviceBuffer<bf16> x = random_buffer<bf16>(m * k), w = random_buffer<bf16>(k * n), y = random_buffer<bf16>(m * n);
  DeviceBuffer<bf16> bias = random_buffer<bf16>(n), pre(L.gelu ? sz(m * n) : 0);
  DeviceBuffer<float> dw = random_buffer<float>(k * n), dbias = random_buffer<float>(n);
  // Forward: x -> y. Input gradient: y (as dy) -> x (as dx). Weight gradient: x, y (as dy) -> dw.
  px::cuda::GemmContext& ctx = *gpu->ctx;
  const float one = 1.0f, zero = 0.0f;

  const auto ours = [&] {
    switch (pass) {
      case Pass::Forward:
        if (L.tied)
          px::cuda::gemm(ctx, false, true, m, n, k, 1.0f, x.data(), k, w.data(), k, 0.0f, y.data(), n);
        else
          px::cuda::linear_forward(ctx, x.data(), w.data(), L.bias ? bias.data() : nullptr, y.data(), m, n, k,
                                   L.gelu ? px::cuda::Activation::Gelu : px::cuda::Activation::None, L.gelu ? pre.data() : nullptr);
        break;
      case Pass::InputGrad:
        if (L.tied)
          px::cuda::gemm(ctx, false, false, m, k, n, 1.0f, y.data(), n, w.data(), k, 0.0f, x.data(), k);
        else
          px::cuda::linear_backward_input(ctx, y.data(), w.data(), x.data(), m, n, k);
        break;
      case Pass::WeightGrad:
        if (L.tied)
          px::cuda::gemm(ctx, true, false, n, k, m, 1.0f, y.data(), n, x.data(), k, 1.0f, dw.data(), k);
        else
          px::cuda::linear_backward_weight(ctx, x.data(), y.data(), dw.data(), L.bias ? dbias.data() : nullptr, m, n, k);
        break;
    }
  };
  // The same products in cuBLAS's column-major terms (see gemm.cu: a row-major matrix is its
  // column-major transpose, so C = A B is handed over as C^T = B^T A^T).
  const auto cublas = [&] {
    const auto ex = [&](cublasOperation_t ta, cublasOperation_t tb, i64 M, i64 N, i64 K, const bf16* a, i64 lda, const bf16* b,
                        i64 ldb, const float* beta, void* c, cudaDataType_t ct, i64 ldc) {
      PX_CUDA_CHECK(cublasGemmEx(gpu->cublas, ta, tb, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), &one, a,
                                 CUDA_R_16BF, static_cast<int>(lda), b, CUDA_R_16BF, static_cast<int>(ldb), beta, c, ct,
                                 static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    constexpr auto N_ = CUBLAS_OP_N, T_ = CUBLAS_OP_T;
    switch (pass) {
      case Pass::Forward:  // y^T[n x m] = op(w)^T x^T
        if (L.tied)
          ex(T_, N_, n, m, k, w.data(), k, x.data(), k, &zero, y.data(), CUDA_R_16BF, n);
        else
          ex(N_, N_, n, m, k, w.data(), n, x.data(), k, &zero, y.data(), CUDA_R_16BF, n);
        break;
      case Pass::InputGrad:  // dx^T[k x m]
        if (L.tied)
          ex(N_, N_, k, m, n, w.data(), k, y.data(), n, &zero, x.data(), CUDA_R_16BF, k);
        else
          ex(T_, N_, k, m, n, w.data(), n, y.data(), n, &zero, x.data(), CUDA_R_16BF, k);
        break;
      case Pass::WeightGrad:  // dw^T += ..., fp32
        if (L.tied)
          ex(N_, T_, k, n, m, x.data(), k, y.data(), n, &one, dw.data(), CUDA_R_32F, k);
        else
          ex(N_, T_, n, k, m, y.data(), n, x.data(), k, &one, dw.data(), CUDA_R_32F, n);
        break;
    }
  };

  // Enough calls per timed span (about 0.5 ms at 500 TFLOP/s) that event resolution does not matter.
  const int calls = static_cast<int>(std::clamp(std::ceil(0.5e-3 * 5e14 / flops), 1.0, 50.0));
  ours();  // plans and heuristics outside the timing
  cublas();
  PX_CUDA_CHECK(cudaStreamSynchronize(gpu->stream));

  std::vector<double> ours_s, cublas_s;
  for (auto _ : state) {
    PX_CUDA_CHECK(cudaEventRecord(gpu->start, gpu->stream));
    for (int i = 0; i < calls; ++i) ours();
    PX_CUDA_CHECK(cudaEventRecord(gpu->mid, gpu->stream));
    for (int i = 0; i < calls; ++i) cublas();
    PX_CUDA_CHECK(cudaEventRecord(gpu->stop, gpu->stream));
    PX_CUDA_CHECK(cudaEventSynchronize(gpu->stop));
    float a_ms = 0, b_ms = 0;
    PX_CUDA_CHECK(cudaEventElapsedTime(&a_ms, gpu->start, gpu->mid));
    PX_CUDA_CHECK(cudaEventElapsedTime(&b_ms, gpu->mid, gpu->stop));
    ours_s.push_back(double(a_ms) * 1e-3 / calls);
    cublas_s.push_back(double(b_ms) * 1e-3 / calls);
    state.SetIterationTime(ours_s.back());
  }
  if (ours_s.empty()) return;
  const double t_ours = px::median(ours_s), t_cublas = px::median(cublas_s);
  state.counters["TFLOPs"] = flops / t_ours * 1e-12;
  state.counters["cublas_TFLOPs"] = flops / t_cublas * 1e-12;
  state.counters["vs_cublas"] = t_cublas / t_ours;
  std::string label;
  if (pass == Pass::Forward && L.bias) label += L.gelu ? "bias+gelu" : "bias";
  if (pass == Pass::WeightGrad && L.bias) label += "dbias";
  const px::cuda::GemmStats s = ctx.stats();
  if (s.unfused_epilogues > 0) label += label.empty() ? "unfused epilogues seen" : ", unfused epilogues seen";
  state.SetLabel(label);
}

}  // namespace

int main(int argc, char** argv) {
  std::unique_ptr<Gpu> device;
  if (px::cuda::device_count() > 0) {
    device = std::make_unique<Gpu>();
    gpu = device.get();
  }
  for (const Layer& L : layers())
    for (Pass p : {Pass::Forward, Pass::InputGrad, Pass::WeightGrad}) {
      const std::string name = L.model + "/" + L.name + "/" + pass_name(p) + "/m" + std::to_string(L.tokens) + "_n" +
                               std::to_string(L.out) + "_k" + std::to_string(L.in);
      benchmark::internal::Benchmark* b =
          benchmark::RegisterBenchmark(name.c_str(), [L, p](benchmark::State& st) { run(st, L, p); });
      b->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
      if (gpu) b->Repetitions(3)->ReportAggregatesOnly(true);  // one error line per benchmark otherwise
    }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  gpu = nullptr;
  return 0;
}
