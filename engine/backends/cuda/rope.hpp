// Rotary position embedding on bf16 tensors, in place, with the layout and conventions of
// engine/backends/cpu/rope.hpp: rotate-half (GPT-NeoX, Llama) within each head of d columns,
// column i < d/2 paired with i + d/2 and turned by position * theta^(-2i/d), applied to the first
// `heads` heads of each row of stride ld (Q and K at the front of a packed qkv row); the backward
// turns the gradient back. Angles are formed in double and reduced to [-pi, pi] before the fp32
// sine and cosine, so positions in the hundreds of thousands keep fp32-accurate rotations.
//
// Every pointer is device memory; calls are asynchronous on `stream`. 16-byte-aligned x with d a
// multiple of 16 and ld a multiple of 8 takes the vectorised path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace px::cuda {

using bf16 = __nv_bfloat16;  // as in device_buffer.hpp

// positions: one global position per row (device memory). d even, heads * d <= ld, d <= 2048.
void rope_forward(bf16* x, std::int64_t rows, std::int64_t ld, std::int64_t heads, std::int64_t d,
                  const std::int32_t* positions, double theta, cudaStream_t stream = nullptr);
void rope_backward(bf16* dx, std::int64_t rows, std::int64_t ld, std::int64_t heads, std::int64_t d,
                   const std::int32_t* positions, double theta, cudaStream_t stream = nullptr);

}  // namespace px::cuda
