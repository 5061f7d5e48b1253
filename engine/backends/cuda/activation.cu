// GELU and SwiGLU kernels: elementwise, so bound by memory; each thread moves 16-byte packs.
//
// Both activations are written through the logistic function, 0.5 (1 + tanh u) = sigmoid(2u) =
// 1 / (1 + e^-2u), rather than tanh: for negative inputs 1 + tanh u cancels, and tanh's own
// rounding error (about 2^-24 absolute) would swamp gelu(x) once it falls below ~1e-5, whereas the
// quotient keeps its relative precision all the way down. 1 - sigmoid(z) is e sigmoid(z) for the
// same reason. The exponent is clamped to +-80, where e^80 is still finite and sigmoid has long
// since saturated in fp32, so no inf * 0 can appear.
#include "engine/backends/cuda/activation.hpp"

#include <limits>
#include <stdexcept>
#include <string>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/elementwise_device.cuh"

namespace px::cuda {
namespace {

using ew::Pack;
using i64 = std::int64_t;

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kExpClamp = 80.0f;
constexpr int kThreads = 256;

struct Logistic {
  float s;          // sigmoid(z)
  float one_minus;  // 1 - sigmoid(z), without cancellation
};
__device__ __forceinline__ Logistic logistic(float z) {
  const float e = __expf(-fminf(fmaxf(z, -kExpClamp), kExpClamp));
  const float s = 1.0f / (1.0f + e);
  return {s, e * s};
}

__device__ __forceinline__ float gelu(float v) {
  const float u = kSqrt2OverPi * (v + kCubic * v * v * v);
  return v * logistic(2.0f * u).s;
}
// d/dv of 0.5 v (1 + tanh u) = 0.5 (1 + t) + 0.5 v (1 - t^2) u', and with s = sigmoid(2u):
// 0.5 (1 + t) = s, 1 - t^2 = 4 s (1 - s).
__device__ __forceinline__ float gelu_grad(float v) {
  const float u = kSqrt2OverPi * (v + kCubic * v * v * v);
  const float du = kSqrt2OverPi * (1.0f + 3.0f * kCubic * v * v);
  const Logistic l = logistic(2.0f * u);
  return l.s + 2.0f * v * l.s * l.one_minus * du;
}

// Packs over the grid-stride loop; the n % VEC elements after the last whole pack go to the
// grid's first threads, one each (the grid always has more than VEC threads).
template <int VEC>
__global__ void gelu_forward_kernel(const bf16* __restrict__ x, bf16* __restrict__ y, i64 n) {
  const i64 packs = n / VEC;
  const i64 tid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (i64 i = tid; i < packs; i += static_cast<i64>(gridDim.x) * blockDim.x) {
    float f[VEC];
    ew::unpack(ew::load_pack<VEC>(x, i), f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = gelu(f[j]);
    ew::store_pack<VEC>(y, i, ew::pack(f));
  }
  if (const i64 t = packs * VEC + tid; VEC > 1 && t < n) y[t] = __float2bfloat16_rn(gelu(__bfloat162float(x[t])));
}

template <int VEC>
__global__ void gelu_backward_kernel(const bf16* __restrict__ dy, const bf16* __restrict__ x, bf16* __restrict__ dx, i64 n) {
  const i64 packs = n / VEC;
  const i64 tid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (i64 i = tid; i < packs; i += static_cast<i64>(gridDim.x) * blockDim.x) {
    float f[VEC], d[VEC];
    ew::unpack(ew::load_pack<VEC>(x, i), f);
    ew::unpack(ew::load_pack<VEC>(dy, i), d);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = d[j] * gelu_grad(f[j]);
    ew::store_pack<VEC>(dx, i, ew::pack(f));
  }
  if (const i64 t = packs * VEC + tid; VEC > 1 && t < n)
    dx[t] = __float2bfloat16_rn(__bfloat162float(dy[t]) * gelu_grad(__bfloat162float(x[t])));
}

// x rows are [gate | up], 2 cols long; thread x walks one pack of a row, grid y the rows.
template <int VEC>
__global__ void swiglu_forward_kernel(const bf16* __restrict__ x, bf16* __restrict__ y, i64 rows, int cols) {
  const int v = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (v >= cols / VEC) return;
  for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
    const bf16* xr = x + r * 2 * cols;
    float g[VEC], u[VEC];
    ew::unpack(ew::load_pack<VEC>(xr, v), g);
    ew::unpack(ew::load_pack<VEC>(xr + cols, v), u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = g[j] * logistic(g[j]).s * u[j];
    ew::store_pack<VEC>(y + r * cols, v, ew::pack(g));
  }
}

template <int VEC>
__global__ void swiglu_backward_kernel(const bf16* __restrict__ dy, const bf16* __restrict__ x, bf16* __restrict__ dx,
                                       i64 rows, int cols) {
  const int v = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (v >= cols / VEC) return;
  for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
    const bf16* xr = x + r * 2 * cols;
    bf16* dxr = dx + r * 2 * cols;
    float g[VEC], u[VEC], d[VEC];
    ew::unpack(ew::load_pack<VEC>(xr, v), g);
    ew::unpack(ew::load_pack<VEC>(xr + cols, v), u);
    ew::unpack(ew::load_pack<VEC>(dy + r * cols, v), d);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const Logistic l = logistic(g[j]);
      const float dg = d[j] * u[j] * l.s * (1.0f + g[j] * l.one_minus);
      u[j] = d[j] * g[j] * l.s;  // the up half's gradient, in place of u
      g[j] = dg;
    }
    ew::store_pack<VEC>(dxr, v, ew::pack(g));
    ew::store_pack<VEC>(dxr + cols, v, ew::pack(u));
  }
}

void check_rows(i64 rows, i64 cols, const char* what) {
  if (rows < 0 || cols < 0 || 2 * cols > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string(what) + ": bad shape " + std::to_string(rows) + " x " + std::to_string(cols));
}

}  // namespace

void gelu_forward(const bf16* x, bf16* y, i64 n, cudaStream_t stream) {
  if (n < 0) throw std::invalid_argument("gelu_forward: negative size");
  if (n == 0) return;
  if (ew::aligned(x, 16) && ew::aligned(y, 16))
    gelu_forward_kernel<8><<<ew::flat_blocks(ew::ceil_div(n, 8), kThreads), kThreads, 0, stream>>>(x, y, n);
  else
    gelu_forward_kernel<1><<<ew::flat_blocks(n, kThreads), kThreads, 0, stream>>>(x, y, n);
  PX_CUDA_CHECK_LAUNCH();
}

void gelu_backward(const bf16* dy, const bf16* x, bf16* dx, i64 n, cudaStream_t stream) {
  if (n < 0) throw std::invalid_argument("gelu_backward: negative size");
  if (n == 0) return;
  if (ew::aligned(dy, 16) && ew::aligned(x, 16) && ew::aligned(dx, 16))
    gelu_backward_kernel<8><<<ew::flat_blocks(ew::ceil_div(n, 8), kThreads), kThreads, 0, stream>>>(dy, x, dx, n);
  else
    gelu_backward_kernel<1><<<ew::flat_blocks(n, kThreads), kThreads, 0, stream>>>(dy, x, dx, n);
  PX_CUDA_CHECK_LAUNCH();
}

void swiglu_forward(const bf16* x, bf16* y, i64 rows, i64 cols, cudaStream_t stream) {
  check_rows(rows, cols, "swiglu_forward");
  if (rows == 0 || cols == 0) return;
  const int c = static_cast<int>(cols);
  if (cols % 8 == 0 && ew::aligned(x, 16) && ew::aligned(y, 16)) {
    const auto l = ew::row_launch(rows, cols / 8);
    swiglu_forward_kernel<8><<<l.grid, l.block, 0, stream>>>(x, y, rows, c);
  } else {
    const auto l = ew::row_launch(rows, cols);
    swiglu_forward_kernel<1><<<l.grid, l.block, 0, stream>>>(x, y, rows, c);
  }
  PX_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(const bf16* dy, const bf16* x, bf16* dx, i64 rows, i64 cols, cudaStream_t stream) {
  check_rows(rows, cols, "swiglu_backward");
  if (rows == 0 || cols == 0) return;
  const int c = static_cast<int>(cols);
  if (cols % 8 == 0 && ew::aligned(dy, 16) && ew::aligned(x, 16) && ew::aligned(dx, 16)) {
    const auto l = ew::row_launch(rows, cols / 8);
    swiglu_backward_kernel<8><<<l.grid, l.block, 0, stream>>>(dy, x, dx, rows, c);
  } else {
    const auto l = ew::row_launch(rows, cols);
    swiglu_backward_kernel<1><<<l.grid, l.block, 0, stream>>>(dy, x, dx, rows, c);
  }
  PX_CUDA_CHECK_LAUNCH();
}

}  // namespace px::cuda
