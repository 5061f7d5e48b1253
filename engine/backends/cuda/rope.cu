// Rotary embedding kernel. A thread owns VEC consecutive pair indices i of one row: it forms
// their angles once and then walks every rotated head of the row, so the sines and cosines are
// paid once per row and pair, not once per element. The inverse frequencies theta^(-2i/d) are
// computed once per block, in double with pow as the CPU kernel does, into shared memory.
#include "engine/backends/cuda/rope.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/elementwise_device.cuh"

namespace px::cuda {
namespace {

using ew::Pack;
using i64 = std::int64_t;

constexpr int kThreads = 256;
constexpr double kTwoPi = 6.283185307179586;
constexpr double kInvTwoPi = 0.15915494309189535;

// Threads [0, rows_per_block * nv) of a block own (row, pack) pairs, nv = (d / 2) / VEC packs per
// half head; rows advance by a grid stride.
template <int VEC>
__global__ void rope_kernel(bf16* __restrict__ x, i64 rows, i64 ld, int heads, int d,
                            const std::int32_t* __restrict__ positions, double theta, float sign) {
  extern __shared__ double inv_freq[];  // d / 2 entries
  const int half = d / 2;
  for (int i = static_cast<int>(threadIdx.x); i < half; i += static_cast<int>(blockDim.x))
    inv_freq[i] = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
  __syncthreads();

  const int nv = half / VEC;
  const int rows_per_block = static_cast<int>(blockDim.x) / nv;
  const int lr = static_cast<int>(threadIdx.x) / nv, iv = static_cast<int>(threadIdx.x) % nv;
  if (lr >= rows_per_block) return;
  for (i64 r = static_cast<i64>(blockIdx.x) * rows_per_block + lr; r < rows;
       r += static_cast<i64>(gridDim.x) * rows_per_block) {
    const double p = positions[r];
    float c[VEC], s[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      // p * inv_freq reaches 1e5 rad and more; reducing in double first leaves fp32 sincos an
      // argument in [-pi, pi], where it is accurate to an ulp or two.
      double a = p * inv_freq[iv * VEC + j];
      a -= rint(a * kInvTwoPi) * kTwoPi;
      sincosf(static_cast<float>(a), &s[j], &c[j]);
      s[j] *= sign;
    }
    bf16* row = x + r * ld;
    for (int h = 0; h < heads; ++h) {
      bf16* lo = row + static_cast<i64>(h) * d;
      float x1[VEC], x2[VEC];
      ew::unpack(ew::load_pack<VEC>(lo, iv), x1);
      ew::unpack(ew::load_pack<VEC>(lo + half, iv), x2);
      float y1[VEC], y2[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        y1[j] = x1[j] * c[j] - x2[j] * s[j];
        y2[j] = x2[j] * c[j] + x1[j] * s[j];
      }
      ew::store_pack<VEC>(lo, iv, ew::pack(y1));
      ew::store_pack<VEC>(lo + half, iv, ew::pack(y2));
    }
  }
}

template <int VEC>
void launch(bf16* x, i64 rows, i64 ld, i64 heads, i64 d, const std::int32_t* positions, double theta, float sign,
            cudaStream_t stream) {
  const int nv = static_cast<int>(d / 2 / VEC);
  // A block holds whole rows' packs: 256 threads, or one row's worth when a row has more packs.
  const int threads = nv > kThreads ? static_cast<int>(ew::ceil_div(nv, 32) * 32) : kThreads;
  const int rows_per_block = threads / nv;
  const i64 blocks = std::min<i64>(ew::ceil_div(rows, rows_per_block), std::numeric_limits<int>::max());
  rope_kernel<VEC><<<static_cast<unsigned>(blocks), threads, static_cast<std::size_t>(d / 2) * sizeof(double), stream>>>(
      x, rows, ld, static_cast<int>(heads), static_cast<int>(d), positions, theta, sign);
  PX_CUDA_CHECK_LAUNCH();
}

void rotate(bf16* x, i64 rows, i64 ld, i64 heads, i64 d, const std::int32_t* positions, double theta, float sign,
            cudaStream_t stream) {
  if (rows < 0 || heads < 0 || d < 2 || d % 2 != 0 || d > 2048 || heads * d > ld)
    throw std::invalid_argument("rope: bad shape (rows " + std::to_string(rows) + ", ld " + std::to_string(ld) + ", heads " +
                                std::to_string(heads) + ", d " + std::to_string(d) + ")");
  if (rows == 0 || heads == 0) return;
  if (d % 16 == 0 && ld % 8 == 0 && ew::aligned(x, 16))
    launch<8>(x, rows, ld, heads, d, positions, theta, sign, stream);
  else
    launch<1>(x, rows, ld, heads, d, positions, theta, sign, stream);
}

}  // namespace

void rope_forward(bf16* x, i64 rows, i64 ld, i64 heads, i64 d, const std::int32_t* positions, double theta,
                  cudaStream_t stream) {
  rotate(x, rows, ld, heads, d, positions, theta, 1.0f, stream);
}

void rope_backward(bf16* dx, i64 rows, i64 ld, i64 heads, i64 d, const std::int32_t* positions, double theta,
                   cudaStream_t stream) {
  rotate(dx, rows, ld, heads, d, positions, theta, -1.0f, stream);  // a rotation's transpose is its inverse
}

}  // namespace px::cuda
