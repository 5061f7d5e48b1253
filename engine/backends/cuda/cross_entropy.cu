// Vocabulary-parallel softmax cross-entropy kernels: one block per row, the row streamed in
// 16-byte vectors of eight bf16, fp32 statistics through deterministic block reductions.
#include "engine/backends/cuda/cross_entropy.hpp"

#include <cuda_runtime.h>

#include <limits>
#include <stdexcept>
#include <string>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/training_device.cuh"

namespace px::cuda {
namespace {

using bf16 = __nv_bfloat16;
using i64 = std::int64_t;
using train_dev::Bf16x8;

constexpr int kThreads = 256;
// Vectors each thread has in flight per loop trip: 4 x 16 bytes x 2048 resident threads per SM
// is ample to cover HBM latency.
constexpr int kUnroll = 4;
constexpr float kLog2e = 1.4426950408889634f;

// exp(x - m) as exp2(x log2e - m log2e): one FMA and the SFU's exp2. The FMA rounds once, relative
// to its (small, for the terms that matter) result, and the rounding of m log2e is one common
// factor on every term of the row, which the softmax quotient cancels.
__device__ __forceinline__ float exp_shifted(float x, float m_log2e) { return exp2f(fmaf(x, kLog2e, -m_log2e)); }

// Calls scalar(c, x) or vec(c, Bf16x8) for every column c of one row, each column once and by one
// thread. The vectorised body starts at the first 16-byte boundary of the row (rows of an odd
// width start at every alignment); vectorise = false visits every column as a scalar.
template <class Scalar, class Vec>
__device__ __forceinline__ void for_each_in_row(const bf16* row, i64 cols, bool vectorise, Scalar&& scalar, Vec&& vec) {
  const auto misalign = static_cast<i64>(reinterpret_cast<std::uintptr_t>(row) & 15u);
  const i64 head = vectorise ? min(cols, ((16 - misalign) & 15) / 2) : cols;
  const i64 stride = blockDim.x;
  for (i64 c = threadIdx.x; c < head; c += stride) scalar(c, __bfloat162float(row[c]));
  const bf16* body = row + head;
  const i64 nvec = (cols - head) / 8;
  for (i64 base = threadIdx.x; base < nvec; base += kUnroll * stride) {
    Bf16x8 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * stride < nvec) v[u] = train_dev::load_bf16x8(body + (base + u * stride) * 8);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * stride < nvec) vec(head + (base + u * stride) * 8, v[u]);
  }
  for (i64 c = head + nvec * 8 + threadIdx.x; c < cols; c += stride) scalar(c, __bfloat162float(row[c]));
}

__global__ void __launch_bounds__(kThreads)
    row_max_kernel(const bf16* __restrict__ logits, float* __restrict__ row_max, i64 cols) {
  const bf16* row = logits + static_cast<i64>(blockIdx.x) * cols;
  float m = -INFINITY;
  for_each_in_row(
      row, cols, true, [&](i64, float x) { m = fmaxf(m, x); },
      [&](i64, const Bf16x8& v) {
#pragma unroll
        for (int j = 0; j < 8; ++j) m = fmaxf(m, v.v[j]);
      });
  m = train_dev::block_max(m);
  if (threadIdx.x == 0) row_max[blockIdx.x] = m;
}

__device__ __forceinline__ float target_in_shard(const bf16* row, const std::int32_t* targets, i64 vocab_begin,
                                                 i64 cols) {
  const i64 t = static_cast<i64>(targets[blockIdx.x]) - vocab_begin;
  return t >= 0 && t < cols ? __bfloat162float(row[t]) : 0.0f;
}

__global__ void __launch_bounds__(kThreads)
    partials_kernel(const bf16* __restrict__ logits, const std::int32_t* __restrict__ targets, i64 vocab_begin,
                    const float* __restrict__ row_max, float* __restrict__ sum_exp, float* __restrict__ target_logit,
                    i64 cols) {
  const bf16* row = logits + static_cast<i64>(blockIdx.x) * cols;
  const float m_log2e = row_max[blockIdx.x] * kLog2e;
  float s = 0.0f;
  for_each_in_row(
      row, cols, true, [&](i64, float x) { s += exp_shifted(x, m_log2e); },
      [&](i64, const Bf16x8& v) {
        // Pairwise inside the vector keeps the per-thread chain short (and its rounding small).
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
          a += exp_shifted(v.v[j], m_log2e);
          b += exp_shifted(v.v[j + 1], m_log2e);
        }
        s += a + b;
      });
  s = train_dev::block_sum(s);
  if (threadIdx.x == 0) {
    sum_exp[blockIdx.x] = s;
    target_logit[blockIdx.x] = target_in_shard(row, targets, vocab_begin, cols);
  }
}

__global__ void loss_kernel(const float* __restrict__ row_max, const float* __restrict__ sum_exp,
                            const float* __restrict__ target_logit, float* __restrict__ loss, i64 rows) {
  const i64 r = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) loss[r] = logf(sum_exp[r]) + row_max[r] - target_logit[r];
}

// No __restrict__ on logits / dlogits: they may be the same buffer.
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const bf16* logits, const std::int32_t* __restrict__ targets, i64 vocab_begin,
                    const float* __restrict__ row_max, const float* __restrict__ sum_exp,
                    const float* __restrict__ dloss, bf16* dlogits, i64 cols, bool vectorise) {
  const i64 r = blockIdx.x;
  const bf16* row = logits + r * cols;
  bf16* out = dlogits + r * cols;
  const float m_log2e = row_max[r] * kLog2e;
  const float dl = dloss[r];
  const float scale = dl / sum_exp[r];
  const i64 t = static_cast<i64>(targets[r]) - vocab_begin;  // may be outside [0, cols): no onehot here
  auto grad = [&](i64 c, float x) { return exp_shifted(x, m_log2e) * scale - (c == t ? dl : 0.0f); };
  for_each_in_row(
      row, cols, vectorise, [&](i64 c, float x) { out[c] = __float2bfloat16_rn(grad(c, x)); },
      [&](i64 c, const Bf16x8& v) {
        Bf16x8 g;
#pragma unroll
        for (int j = 0; j < 8; ++j) g.v[j] = grad(c + j, v.v[j]);
        train_dev::store_bf16x8(out + c, g);  // 16-byte aligned: same offset in the row as the load
      });
}

// One read of the row: each thread keeps a running max m and sum s of exp(x - m), rescaling s when
// the max grows (once per vector at most), then the block combines them against the row's max.
__global__ void __launch_bounds__(kThreads)
    fused_forward_kernel(const bf16* __restrict__ logits, const std::int32_t* __restrict__ targets,
                         float* __restrict__ row_max, float* __restrict__ sum_exp, float* __restrict__ target_logit,
                         float* __restrict__ loss, i64 cols) {
  const bf16* row = logits + static_cast<i64>(blockIdx.x) * cols;
  float m = -INFINITY, s = 0.0f;
  // Columns at -inf add nothing (and would make exp(-inf - -inf) a NaN while m is still -inf); a
  // NaN column still poisons the sum, as it does on the CPU.
  auto rescale_to = [&](float new_max) {
    if (new_max > m) {
      s *= exp2f((m - new_max) * kLog2e);  // m = -inf: s is 0 and stays 0
      m = new_max;
    }
  };
  for_each_in_row(
      row, cols, true,
      [&](i64, float x) {
        rescale_to(x);
        if (x != -INFINITY) s += exp_shifted(x, m * kLog2e);
      },
      [&](i64, const Bf16x8& v) {
        float vm = v.v[0];
#pragma unroll
        for (int j = 1; j < 8; ++j) vm = fmaxf(vm, v.v[j]);
        rescale_to(vm);
        const float m_log2e = m * kLog2e;
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
          if (v.v[j] != -INFINITY) a += exp_shifted(v.v[j], m_log2e);
          if (v.v[j + 1] != -INFINITY) b += exp_shifted(v.v[j + 1], m_log2e);
        }
        s += a + b;
      });
  const float row_m = train_dev::block_max(m);
  const float mine = m == -INFINITY ? 0.0f : s * exp2f((m - row_m) * kLog2e);
  const float total = train_dev::block_sum(mine);
  if (threadIdx.x == 0) {
    const float tl = target_in_shard(row, targets, 0, cols);
    row_max[blockIdx.x] = row_m;
    sum_exp[blockIdx.x] = total;
    if (target_logit) target_logit[blockIdx.x] = tl;
    loss[blockIdx.x] = logf(total) + row_m - tl;
  }
}

unsigned row_grid(i64 rows) {
  if (rows < 0 || rows > std::numeric_limits<int>::max())
    throw std::invalid_argument("cross entropy: rows " + std::to_string(rows) + " outside [0, 2^31)");
  return static_cast<unsigned>(rows);
}

}  // namespace

void cross_entropy_row_max(const bf16* logits, float* row_max, i64 rows, i64 cols, cudaStream_t stream) {
  if (rows == 0) return;
  row_max_kernel<<<row_grid(rows), kThreads, 0, stream>>>(logits, row_max, cols);
  PX_CUDA_CHECK_LAUNCH();
}

void cross_entropy_partials(const bf16* logits, const std::int32_t* targets, i64 vocab_begin, const float* row_max,
                            float* sum_exp, float* target_logit, i64 rows, i64 cols, cudaStream_t stream) {
  if (rows == 0) return;
  partials_kernel<<<row_grid(rows), kThreads, 0, stream>>>(logits, targets, vocab_begin, row_max, sum_exp, target_logit,
                                                           cols);
  PX_CUDA_CHECK_LAUNCH();
}

void cross_entropy_loss(const float* row_max, const float* sum_exp, const float* target_logit, float* loss, i64 rows,
                        cudaStream_t stream) {
  if (rows == 0) return;
  const i64 blocks = (rows + kThreads - 1) / kThreads;
  loss_kernel<<<row_grid(blocks), kThreads, 0, stream>>>(row_max, sum_exp, target_logit, loss, rows);
  PX_CUDA_CHECK_LAUNCH();
}

void cross_entropy_backward(const bf16* logits, const std::int32_t* targets, i64 vocab_begin, const float* row_max,
                            const float* sum_exp, const float* dloss, bf16* dlogits, i64 rows, i64 cols,
                            cudaStream_t stream) {
  if (rows == 0) return;
  // Rows of logits and dlogits are at the same offsets, so the vector path needs only the two
  // bases to agree modulo 16 bytes.
  const bool vectorise =
      ((reinterpret_cast<std::uintptr_t>(logits) ^ reinterpret_cast<std::uintptr_t>(dlogits)) & 15u) == 0;
  backward_kernel<<<row_grid(rows), kThreads, 0, stream>>>(logits, targets, vocab_begin, row_max, sum_exp, dloss,
                                                           dlogits, cols, vectorise);
  PX_CUDA_CHECK_LAUNCH();
}

void cross_entropy_forward_fused(const bf16* logits, const std::int32_t* targets, float* row_max, float* sum_exp,
                                 float* target_logit, float* loss, i64 rows, i64 cols, cudaStream_t stream) {
  if (rows == 0) return;
  fused_forward_kernel<<<row_grid(rows), kThreads, 0, stream>>>(logits, targets, row_max, sum_exp, target_logit, loss,
                                                                cols);
  PX_CUDA_CHECK_LAUNCH();
}

}  // namespace px::cuda
