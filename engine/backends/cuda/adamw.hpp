// AdamW on the GPU, the update of engine/backends/cpu/adamw.hpp (torch.optim.AdamW: bias
// correction, decoupled weight decay, the gradient scaled by grad_scale first) on fp32 master
// weights, gradients and moments, writing the bf16 working copy of each weight in the same pass,
// for any number of tensors in as few launches as the kernel-parameter space allows. Plus the
// sum of squares of fp32 gradients for global-norm clipping, deterministic and kept on the device
// so the clip coefficient can reach the step without a host round trip.
//
// All pointers are device pointers; every call is asynchronous on `stream` and allocates nothing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "engine/backends/cpu/adamw.hpp"

namespace px::cuda {

// The CPU reference's hyper-parameters, one definition for both backends.
using px::cpu::AdamWConfig;

// One parameter tensor (or a shard of one) and its state, `count` elements each. param_bf16 may
// be null (no working copy). Tensors may start at any 4-byte boundary; those whose pointers are
// all 16-byte aligned (8 for param_bf16) take the vectorised path.
struct AdamWTensor {
  float* param = nullptr;
  const float* grad = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  __nv_bfloat16* param_bf16 = nullptr;
  std::int64_t count = 0;
};

struct AdamWStep {
  std::int64_t step = 1;    // counts from 1
  double grad_scale = 1.0;  // e.g. 1 / loss scale
  // Optional device scalar multiplied into grad_scale, e.g. the clip coefficient from
  // clip_coefficient() below, so clipping never waits on the host.
  const float* grad_scale_device = nullptr;
};

// One AdamW step on every tensor: the arithmetic is fp32 (the CPU reference's is double and
// agrees to a few ulp of each weight).
void adamw_step(std::span<const AdamWTensor> tensors, const AdamWConfig& cfg, const AdamWStep& step,
                cudaStream_t stream);
inline void adamw_step(const AdamWTensor& tensor, const AdamWConfig& cfg, const AdamWStep& step, cudaStream_t stream) {
  adamw_step(std::span<const AdamWTensor>(&tensor, 1), cfg, step, stream);
}

struct GradTensor {
  const float* data = nullptr;
  std::int64_t count = 0;
};

// Device workspace sum_of_squares needs, in doubles (a few KiB whatever the tensors).
std::size_t sum_of_squares_workspace_doubles();

// *out = sum over every tensor of g^2, as a double on the device. Deterministic: the same tensors
// at the same addresses give the same bits on every run and every GPU (a fixed grid of 1024
// blocks, fixed per-thread element sets, fixed-order tree reductions, no atomics). No fp32
// partials at all: each square of a fp32 value is exact in double and summed in double (an FMA
// per element, far below the memory time on A100 / H100), per thread, then over the block, then
// over the 1024 block partials in a second pass, so the relative error is about 1e-16 times the
// depth of the sums. The caller all-reduces *out across ranks when gradients are sharded.
void sum_of_squares(std::span<const GradTensor> tensors, double* out, double* workspace, cudaStream_t stream);

// The same, copied back to the host (synchronises `stream`).
double sum_of_squares_to_host(std::span<const GradTensor> tensors, double* out, double* workspace, cudaStream_t stream);

// *coefficient = min(1, max_norm / (sqrt(*sum_sq) + 1e-6)) as px::cpu::clip_coefficient computes
// it; 1 when max_norm <= 0. Both device scalars; feed `coefficient` to AdamWStep::grad_scale_device.
void clip_coefficient(const double* sum_sq, double max_norm, float* coefficient, cudaStream_t stream);

}  // namespace px::cuda
