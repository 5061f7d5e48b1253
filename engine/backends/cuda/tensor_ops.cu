// Conversions, strided copies, adds, sums and fills between the CUDA backend's kernels.
#include "engine/backends/cuda/tensor_ops.hpp"

#include "engine/backends/cuda/check.hpp"

namespace px::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(std::int64_t n) {
  const std::int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

template <class In, class Out>
__global__ void convert_kernel(const In* x, Out* y, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    y[i] = static_cast<Out>(x[i]);
}

__global__ void float_to_bf16_kernel(const float* x, bf16* y, std::int64_t n, bool accumulate) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16(accumulate ? __bfloat162float(y[i]) + x[i] : x[i]);
}

__global__ void copy_columns_kernel(const bf16* src, std::int64_t ld_src, bf16* dst, std::int64_t ld_dst, std::int64_t rows,
                                    std::int64_t cols, bool accumulate) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / cols, c = i % cols;
    const float v = __bfloat162float(src[r * ld_src + c]);
    bf16& d = dst[r * ld_dst + c];
    d = __float2bfloat16(accumulate ? __bfloat162float(d) + v : v);
  }
}

__global__ void add_bias_residual_kernel(const bf16* x, const bf16* bias, const bf16* residual, bf16* out, std::int64_t rows,
                                         std::int64_t cols) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    float v = __bfloat162float(x[i]);
    if (bias) v += __bfloat162float(bias[i % cols]);
    if (residual) v += __bfloat162float(residual[i]);
    out[i] = __float2bfloat16(v);
  }
}

// One thread per column: consecutive threads read consecutive columns of a row (coalesced), and
// each column's rows are added in order.
__global__ void column_sums_add_kernel(const bf16* x, std::int64_t rows, std::int64_t cols, float* out) {
  const std::int64_t c = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  float s = 0;
  for (std::int64_t r = 0; r < rows; ++r) s += __bfloat162float(x[r * cols + c]);
  out[c] += s;
}

__global__ void sum_add_kernel(const float* x, std::int64_t n, double* acc) {
  __shared__ double part[kThreads];
  double s = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += kThreads) s += static_cast<double>(x[i]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *acc += part[0];
}

__global__ void add_kernel(const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

__global__ void fill_kernel(float* x, std::int64_t n, float value) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    x[i] = value;
}

}  // namespace

void convert(const bf16* x, float* y, std::int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  convert_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, y, n);
  PX_CUDA_CHECK_LAUNCH();
}

void convert(const float* x, bf16* y, std::int64_t n, bool accumulate, cudaStream_t stream) {
  if (n <= 0) return;
  float_to_bf16_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, y, n, accumulate);
  PX_CUDA_CHECK_LAUNCH();
}

void convert(const float* x, double* y, std::int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  convert_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, y, n);
  PX_CUDA_CHECK_LAUNCH();
}

void convert(const double* x, float* y, std::int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  convert_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, y, n);
  PX_CUDA_CHECK_LAUNCH();
}

void copy_columns(const bf16* src, std::int64_t ld_src, bf16* dst, std::int64_t ld_dst, std::int64_t rows, std::int64_t cols,
                  bool accumulate, cudaStream_t stream) {
  if (rows * cols <= 0) return;
  copy_columns_kernel<<<blocks_for(rows * cols), kThreads, 0, stream>>>(src, ld_src, dst, ld_dst, rows, cols, accumulate);
  PX_CUDA_CHECK_LAUNCH();
}

void add_bias_residual(const bf16* x, const bf16* bias, const bf16* residual, bf16* out, std::int64_t rows, std::int64_t cols,
                       cudaStream_t stream) {
  if (rows * cols <= 0) return;
  add_bias_residual_kernel<<<blocks_for(rows * cols), kThreads, 0, stream>>>(x, bias, residual, out, rows, cols);
  PX_CUDA_CHECK_LAUNCH();
}

void column_sums_add(const bf16* x, std::int64_t rows, std::int64_t cols, float* out, cudaStream_t stream) {
  if (cols <= 0) return;
  column_sums_add_kernel<<<static_cast<unsigned>((cols + kThreads - 1) / kThreads), kThreads, 0, stream>>>(x, rows, cols, out);
  PX_CUDA_CHECK_LAUNCH();
}

void sum_add(const float* x, std::int64_t n, double* acc, cudaStream_t stream) {
  sum_add_kernel<<<1, kThreads, 0, stream>>>(x, n, acc);
  PX_CUDA_CHECK_LAUNCH();
}

void add(const float* x, float* y, std::int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, y, n);
  PX_CUDA_CHECK_LAUNCH();
}

void fill(float* x, std::int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return;
  fill_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n, value);
  PX_CUDA_CHECK_LAUNCH();
}

}  // namespace px::cuda
