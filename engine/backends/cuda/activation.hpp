// MLP activations on bf16 tensors, forward and backward, with the contract of
// engine/backends/cpu/activation.hpp: GELU in the tanh approximation (GPT-2's), and SwiGLU over
// rows of [gate (cols) | up (cols)], Megatron's chunk order. Arithmetic is fp32; each output is
// rounded to bf16 once. Input gradients are overwritten, as the CPU kernels do.
//
// Every pointer is device memory; calls are asynchronous on `stream`. Any size works; 16-byte-
// aligned tensors (and, for SwiGLU, rows a multiple of 8) take the vectorised path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace px::cuda {

using bf16 = __nv_bfloat16;  // as in device_buffer.hpp

// y[i] = gelu(x[i]) over n elements.
void gelu_forward(const bf16* x, bf16* y, std::int64_t n, cudaStream_t stream = nullptr);
// dx[i] = dy[i] gelu'(x[i]).
void gelu_backward(const bf16* dy, const bf16* x, bf16* dx, std::int64_t n, cudaStream_t stream = nullptr);

// y[rows x cols] = silu(gate) * up, x = [rows x 2 cols].
void swiglu_forward(const bf16* x, bf16* y, std::int64_t rows, std::int64_t cols, cudaStream_t stream = nullptr);
// dx[rows x 2 cols] from dy[rows x cols].
void swiglu_backward(const bf16* dy, const bf16* x, bf16* dx, std::int64_t rows, std::int64_t cols,
                     cudaStream_t stream = nullptr);

}  // namespace px::cuda
