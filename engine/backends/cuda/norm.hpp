// Fused LayerNorm and RMSNorm over the last dimension of [rows x cols] bf16 tensors, forward and
// backward, with the contract of engine/backends/cpu/norm.hpp: the backward adds the input
// gradient into dx (the residual stream's gradient is already there) and accumulates the weight
// gradients (+=). Statistics are fp32, every reduction runs in a fixed order, so results are
// bitwise reproducible from run to run on one device.
//
// Every pointer is device memory; calls are asynchronous on `stream`. Rows of any length work;
// rows whose length is a multiple of 8 on 16-byte-aligned tensors take the vectorised path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace px::cuda {

using bf16 = __nv_bfloat16;  // as in device_buffer.hpp

// y = (x - mean) / sqrt(var + eps) * gamma + beta, statistics in fp32. mean and rstd (rows
// floats each) receive each row's statistics when not null, for the backward to reuse.
void layernorm_forward(const bf16* x, const bf16* gamma, const bf16* beta, bf16* y, float* mean, float* rstd,
                       std::int64_t rows, std::int64_t cols, float eps, cudaStream_t stream = nullptr);

// y = x / sqrt(mean(x^2) + eps) * gamma; rstd as above.
void rmsnorm_forward(const bf16* x, const bf16* gamma, bf16* y, float* rstd, std::int64_t rows, std::int64_t cols, float eps,
                     cudaStream_t stream = nullptr);

// The backward's scratch: per-block partial column sums of dgamma (and dbeta), reduced in a fixed
// order into the fp32 gradients by a second kernel. Enough for either norm at this shape, on the
// current device.
std::size_t norm_backward_workspace_bytes(std::int64_t rows, std::int64_t cols);

// dx += d/dx (dx bf16, the sum rounded once); dgamma += and dbeta += their gradients (fp32).
// mean and rstd: both the forward's saved statistics, or both null to recompute them from x
// (the CPU kernel's way). workspace: norm_backward_workspace_bytes(rows, cols) bytes, or more.
void layernorm_backward(const bf16* dy, const bf16* x, const bf16* gamma, const float* mean, const float* rstd, bf16* dx,
                        float* dgamma, float* dbeta, std::int64_t rows, std::int64_t cols, float eps, void* workspace,
                        std::size_t workspace_bytes, cudaStream_t stream = nullptr);

// dx += d/dx; dgamma += its gradient. rstd: the forward's, or null to recompute.
void rmsnorm_backward(const bf16* dy, const bf16* x, const bf16* gamma, const float* rstd, bf16* dx, float* dgamma,
                      std::int64_t rows, std::int64_t cols, float eps, void* workspace, std::size_t workspace_bytes,
                      cudaStream_t stream = nullptr);

}  // namespace px::cuda
