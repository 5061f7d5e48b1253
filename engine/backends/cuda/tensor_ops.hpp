// The small device operations the CUDA backend needs between its kernels: dtype conversions
// (bf16 <-> fp32 with one rounding, fp32 <-> double scalars), strided column copies and adds (the
// key/value packing of the context-parallel ring), a bias and residual add, an fp32 add,
// deterministic column and total sums, and fills. Each is the CPU backend's loop of the same step, on the device.
//
// Every pointer is device memory; calls are asynchronous on `stream`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace px::cuda {

using bf16 = __nv_bfloat16;  // as in device_buffer.hpp

// y[i] = x[i] over n elements.
void convert(const bf16* x, float* y, std::int64_t n, cudaStream_t stream);
// y[i] = bf16(x[i]), or bf16(y[i] + x[i]) when `accumulate` (the sum in fp32, rounded once).
void convert(const float* x, bf16* y, std::int64_t n, bool accumulate, cudaStream_t stream);
void convert(const float* x, double* y, std::int64_t n, cudaStream_t stream);
void convert(const double* x, float* y, std::int64_t n, cudaStream_t stream);

// dst[r * ld_dst + c] = src[r * ld_src + c] (or += when `accumulate`, in fp32, rounded once) for
// r < rows, c < cols.
void copy_columns(const bf16* src, std::int64_t ld_src, bf16* dst, std::int64_t ld_dst, std::int64_t rows, std::int64_t cols,
                  bool accumulate, cudaStream_t stream);

// out[r][c] = x[r][c] + bias[c] + residual[r][c] over [rows x cols], in fp32, rounded once; bias and
// residual may each be null.
void add_bias_residual(const bf16* x, const bf16* bias, const bf16* residual, bf16* out, std::int64_t rows, std::int64_t cols,
                       cudaStream_t stream);

// out[c] += sum over rows of x[r][c], in fp32, rows in order (bitwise reproducible).
void column_sums_add(const bf16* x, std::int64_t rows, std::int64_t cols, float* out, cudaStream_t stream);

// *acc += sum of x[0..n) in double, in a fixed order (one block).
void sum_add(const float* x, std::int64_t n, double* acc, cudaStream_t stream);

// y[i] += x[i] over n elements (a staged reduce-scatter's shard added into the gradient it accumulates).
void add(const float* x, float* y, std::int64_t n, cudaStream_t stream);

// x[i] = value over n elements.
void fill(float* x, std::int64_t n, float value, cudaStream_t stream);

}  // namespace px::cuda
