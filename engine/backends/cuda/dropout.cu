// Dropout-add kernels. The mask hash is the CPU kernel's (engine/core/counter_rng.hpp, compiled
// here as device code); the per-row half of it is hoisted out of the column loop, and the
// probability test is its integer form, so an element costs one 64-bit mix and a compare.
#include "engine/backends/cuda/dropout.hpp"

#include <limits>
#include <stdexcept>
#include <string>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/elementwise_device.cuh"
#include "engine/core/counter_rng.hpp"

namespace px::cuda {
namespace {

using ew::MaskPack;
using i64 = std::int64_t;
constexpr int kThreads = 256;

// Thread x walks one pack of a row, grid y the rows.
template <int VEC, bool RESIDUAL>
__global__ void dropout_add_kernel(const bf16* __restrict__ x, const bf16* __restrict__ residual, bf16* __restrict__ out,
                                   std::uint8_t* __restrict__ mask, const std::uint64_t* __restrict__ row_keys, i64 rows,
                                   int cols, std::uint64_t threshold, float scale, std::uint64_t seed) {
  const int v = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (v >= cols / VEC) return;
  for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
    const std::uint64_t stream = px::dropout_row_stream(seed, row_keys[r]);
    const i64 off = r * cols;
    float f[VEC], res[VEC] = {};
    ew::unpack(ew::load_pack<VEC>(x + off, v), f);
    if constexpr (RESIDUAL) ew::unpack(ew::load_pack<VEC>(residual + off, v), res);
    MaskPack<VEC> m;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const bool keep = !px::dropped_below(stream, static_cast<i64>(v) * VEC + j, threshold);
      m.v[j] = keep ? 1 : 0;
      f[j] = res[j] + (keep ? f[j] * scale : 0.0f);
    }
    ew::store_pack<VEC>(out + off, v, ew::pack(f));
    reinterpret_cast<MaskPack<VEC>*>(mask + off)[v] = m;
  }
}

// Packs over the grid-stride loop; the n % VEC trailing elements go to the grid's first threads.
template <int VEC>
__global__ void dropout_backward_kernel(const bf16* __restrict__ dy, const std::uint8_t* __restrict__ mask,
                                        bf16* __restrict__ dx, i64 n, float scale) {
  const i64 packs = n / VEC;
  const i64 tid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (i64 i = tid; i < packs; i += static_cast<i64>(gridDim.x) * blockDim.x) {
    float d[VEC];
    ew::unpack(ew::load_pack<VEC>(dy, i), d);
    const MaskPack<VEC> m = reinterpret_cast<const MaskPack<VEC>*>(mask)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) d[j] = m.v[j] ? d[j] * scale : 0.0f;
    ew::store_pack<VEC>(dx, i, ew::pack(d));
  }
  if (const i64 t = packs * VEC + tid; VEC > 1 && t < n)
    dx[t] = __float2bfloat16_rn(mask[t] ? __bfloat162float(dy[t]) * scale : 0.0f);
}

void check_p(double p, const char* what) {
  if (!(p >= 0.0 && p < 1.0))
    throw std::invalid_argument(std::string(what) + ": p must be in [0, 1), got " + std::to_string(p));
}

template <int VEC>
void launch_forward(const bf16* x, const bf16* residual, bf16* out, std::uint8_t* mask, const std::uint64_t* row_keys,
                    i64 rows, i64 cols, std::uint64_t threshold, float scale, std::uint64_t seed, cudaStream_t stream) {
  const auto l = ew::row_launch(rows, cols / VEC);
  const int c = static_cast<int>(cols);
  if (residual)
    dropout_add_kernel<VEC, true>
        <<<l.grid, l.block, 0, stream>>>(x, residual, out, mask, row_keys, rows, c, threshold, scale, seed);
  else
    dropout_add_kernel<VEC, false>
        <<<l.grid, l.block, 0, stream>>>(x, residual, out, mask, row_keys, rows, c, threshold, scale, seed);
  PX_CUDA_CHECK_LAUNCH();
}

}  // namespace

void dropout_add_forward(const bf16* x, const bf16* residual, bf16* out, std::uint8_t* mask, const std::uint64_t* row_keys,
                         i64 rows, i64 cols, double p, std::uint64_t seed, cudaStream_t stream) {
  check_p(p, "dropout_add_forward");
  if (rows < 0 || cols < 0 || cols > std::numeric_limits<int>::max())
    throw std::invalid_argument("dropout_add_forward: bad shape " + std::to_string(rows) + " x " + std::to_string(cols));
  if (rows == 0 || cols == 0) return;
  const std::uint64_t threshold = px::dropout_threshold(p);
  const auto scale = static_cast<float>(1.0 / (1.0 - p));
  const bool vec8 = cols % 8 == 0 && ew::aligned(x, 16) && ew::aligned(out, 16) && ew::aligned(mask, 8) &&
                    (residual == nullptr || ew::aligned(residual, 16));
  if (vec8)
    launch_forward<8>(x, residual, out, mask, row_keys, rows, cols, threshold, scale, seed, stream);
  else
    launch_forward<1>(x, residual, out, mask, row_keys, rows, cols, threshold, scale, seed, stream);
}

void dropout_backward(const bf16* dy, const std::uint8_t* mask, bf16* dx, i64 n, double p, cudaStream_t stream) {
  check_p(p, "dropout_backward");
  if (n < 0) throw std::invalid_argument("dropout_backward: negative size");
  if (n == 0) return;
  const auto scale = static_cast<float>(1.0 / (1.0 - p));
  if (ew::aligned(dy, 16) && ew::aligned(dx, 16) && ew::aligned(mask, 8))
    dropout_backward_kernel<8>
        <<<ew::flat_blocks(ew::ceil_div(n, 8), kThreads), kThreads, 0, stream>>>(dy, mask, dx, n, scale);
  else
    dropout_backward_kernel<1><<<ew::flat_blocks(n, kThreads), kThreads, 0, stream>>>(dy, mask, dx, n, scale);
  PX_CUDA_CHECK_LAUNCH();
}

}  // namespace px::cuda
