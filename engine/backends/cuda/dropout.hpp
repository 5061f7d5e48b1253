// Dropout fused with the residual add on bf16 tensors, with the contract of
// engine/backends/cpu/dropout.hpp and the very same mask bits: an element's keep/drop decision is
// px::dropped(seed, row_key, col, p) from engine/core/counter_rng.hpp, the one definition both
// backends compile, so a device run and the CPU reference drop the same elements on every rank.
// Masks are one byte per element (1 kept, 0 dropped).
//
// Every pointer is device memory; calls are asynchronous on `stream`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace px::cuda {

using bf16 = __nv_bfloat16;  // as in device_buffer.hpp

// out = residual + mask * x / (1 - p) over [rows x cols], writing the mask; residual may be null
// (plain dropout). row_keys: one key per row (device memory), as the CPU kernel takes them.
// p in [0, 1).
void dropout_add_forward(const bf16* x, const bf16* residual, bf16* out, std::uint8_t* mask, const std::uint64_t* row_keys,
                         std::int64_t rows, std::int64_t cols, double p, std::uint64_t seed, cudaStream_t stream = nullptr);

// dx = dy * mask / (1 - p) over n elements; the residual's gradient is dy itself.
void dropout_backward(const bf16* dy, const std::uint8_t* mask, bf16* dx, std::int64_t n, double p,
                      cudaStream_t stream = nullptr);

}  // namespace px::cuda
