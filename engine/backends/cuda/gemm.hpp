// The GEMMs of the CUDA backend on cuBLASLt: a general row-major bf16 GEMM (plain and strided-
// batched) and the three GEMMs of a linear layer y = x w + b with w stored [in x out], the same
// contract as engine/backends/cpu/gemm.hpp, plus the fused bias / GELU epilogue of the MLP's fc1.
//
// Every pointer is device memory; matrices are row-major, leading dimensions in elements. Calls are
// asynchronous on the context's stream.
//
// Precision, for every function here:
// - A and B are bf16. Products of two bf16 values are exact in fp32, and they are accumulated in fp32
//   (CUBLAS_COMPUTE_32F: no TF32, no fp16 or "fast" accumulation). Where cuBLASLt splits the k
//   dimension, a plan takes the heuristic's fastest algorithm that adds the partial sums in fp32,
//   skipping those that would add them in a bf16 output (reduction schemes INPLACE and OUTPUT_TYPE);
//   only when none of its candidates does is the fastest taken, and GemmStats counts it.
// - alpha and beta are fp32; the output is rounded once, from fp32, to its storage type.
// - Activations (x, y, dy, dx, the saved pre-activation) are bf16; a bias read by the forward is bf16;
//   weight and bias gradients are fp32, so micro-batches accumulate into them without bf16 rounding
//   (Megatron's gradient-accumulation fusion: dw += x^T dy with beta = 1 on an fp32 buffer).
// - The fused epilogue adds the bias and applies GELU in fp32 to the fp32 accumulator; the saved
//   pre-activation is that fp32 value rounded to bf16. GELU is the tanh approximation, as the CPU
//   kernel (engine/backends/cpu/activation.hpp) and cuBLASLt's epilogue compute it. Unfused (see
//   GemmOptions), the bias is written into y first and the GEMM adds into it (beta = 1), so the
//   pre-activation is still rounded once, and GELU is applied to that bf16 pre-activation.
// - Bias gradients are column sums of the bf16 dy accumulated in fp32 in a fixed order (by this
//   file's own kernel, not cuBLASLt's BGRAD epilogue, which overwrites where we must add), so they
//   are bitwise reproducible run to run on a given GPU (no atomics).
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace px::cuda {

using bf16 = __nv_bfloat16;  // as in device_buffer.hpp

// cuBLASLt's recommended workspace on Hopper (smaller suffices on Ampere).
inline constexpr std::size_t kGemmWorkspaceBytes = std::size_t{32} << 20;

struct GemmOptions {
  std::size_t workspace_bytes = kGemmWorkspaceBytes;
  // Fuse bias and GELU into the GEMM's epilogue. When false, or when cuBLASLt declines the fusion
  // (no algorithm for the shape, or a pre-activation row not a multiple of 8 elements), the GEMM runs
  // plain and small kernels add the bias and apply GELU; false exists so tests cover that path too.
  bool fuse_epilogues = true;
};

// What a context has done, for tests that check the plan cache and which epilogue path ran.
struct GemmStats {
  std::size_t plans = 0;            // cached (descriptors, algorithm) entries
  std::size_t heuristic_calls = 0;  // cublasLtMatmulAlgoGetHeuristic calls, one per new plan
  std::size_t fused_epilogues = 0;  // linear forwards whose bias / GELU ran in cuBLASLt's epilogue
  std::size_t unfused_epilogues = 0;
  std::size_t low_precision_reductions = 0;  // plans that could only get a bf16 split-k reduction
};

// Owns a cuBLASLt handle, its workspace and the plans (matmul and layout descriptors with the
// heuristic's algorithm) of every shape it has run, keyed by shape, epilogue and pointer alignment,
// so a training step's repeated GEMMs skip the heuristic. Needs a current CUDA device. The workspace
// is reused by every call, so one context serves one stream; use one per stream.
class GemmContext {
 public:
  explicit GemmContext(cudaStream_t stream = nullptr, GemmOptions options = {});
  ~GemmContext();
  GemmContext(const GemmContext&) = delete;
  GemmContext& operator=(const GemmContext&) = delete;

  cudaStream_t stream() const;
  void set_stream(cudaStream_t stream);  // the caller orders it after the previous stream's work
  cublasLtHandle_t handle() const;
  GemmStats stats() const;

  struct Impl;  // in gemm.cu, which alone uses impl()
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// C[m x n] = alpha op(A) op(B) + beta C; op(A) is [m x k], op(B) [k x n]. beta == 0 never reads C
// (it may hold NaNs). k == 0 gives C = beta C.
void gemm(GemmContext& ctx, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          const bf16* a, std::int64_t lda, const bf16* b, std::int64_t ldb, float beta, bf16* c, std::int64_t ldc);
void gemm(GemmContext& ctx, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          const bf16* a, std::int64_t lda, const bf16* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc);

// `batch` independent GEMMs, problem i on a + i stride_a, b + i stride_b, c + i stride_c (elements;
// a stride of 0 shares the operand, e.g. one weight over several row blocks).
void gemm_strided_batched(GemmContext& ctx, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                          float alpha, const bf16* a, std::int64_t lda, std::int64_t stride_a, const bf16* b,
                          std::int64_t ldb, std::int64_t stride_b, float beta, bf16* c, std::int64_t ldc,
                          std::int64_t stride_c, std::int64_t batch);
void gemm_strided_batched(GemmContext& ctx, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                          float alpha, const bf16* a, std::int64_t lda, std::int64_t stride_a, const bf16* b,
                          std::int64_t ldb, std::int64_t stride_b, float beta, float* c, std::int64_t ldc,
                          std::int64_t stride_c, std::int64_t batch);

enum class Activation : std::uint8_t { None, Gelu };

// y[m x n] = act(x[m x k] w[k x n] + bias[n]), bias null for none. With act == Gelu and
// pre_activation not null, pre_activation[m x n] receives x w + bias, the input gelu_backward needs.
// Requires k > 0.
void linear_forward(GemmContext& ctx, const bf16* x, const bf16* w, const bf16* bias, bf16* y, std::int64_t m,
                    std::int64_t n, std::int64_t k, Activation act = Activation::None, bf16* pre_activation = nullptr);

// dx[m x k] = dy[m x n] w^T, or dx += dy w^T when `accumulate`.
void linear_backward_input(GemmContext& ctx, const bf16* dy, const bf16* w, bf16* dx, std::int64_t m, std::int64_t n,
                           std::int64_t k, bool accumulate = false);

// dw[k x n] += x^T dy; dbias[n] += column sums of dy (skipped when dbias is null). Both fp32.
void linear_backward_weight(GemmContext& ctx, const bf16* x, const bf16* dy, float* dw, float* dbias, std::int64_t m,
                            std::int64_t n, std::int64_t k);

// The same over `batch` experts of equal capacity stored back to back (the grouped expert GEMMs):
// expert e reads x + e m k, w + e k n, bias + e n and writes y (and pre_activation) + e m n;
// backward: dy + e m n, dx + e m k, dw + e k n, dbias + e n.
void linear_forward_batched(GemmContext& ctx, const bf16* x, const bf16* w, const bf16* bias, bf16* y, std::int64_t m,
                            std::int64_t n, std::int64_t k, std::int64_t batch, Activation act = Activation::None,
                            bf16* pre_activation = nullptr);
void linear_backward_input_batched(GemmContext& ctx, const bf16* dy, const bf16* w, bf16* dx, std::int64_t m,
                                   std::int64_t n, std::int64_t k, std::int64_t batch, bool accumulate = false);
void linear_backward_weight_batched(GemmContext& ctx, const bf16* x, const bf16* dy, float* dw, float* dbias,
                                    std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t batch);

}  // namespace px::cuda
