// Multi-tensor AdamW and the deterministic gradient sum of squares. Tensors are cut into tiles of
// kTile elements; one launch takes up to kMaxTensors tensors in its parameter block (no device
// copy of the tensor list, so nothing to allocate or synchronise) and a grid of resident blocks
// strides over all their tiles, which keeps one huge embedding and many small norms equally busy.
#include "engine/backends/cuda/adamw.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/training_device.cuh"

namespace px::cuda {
namespace {

using bf16 = __nv_bfloat16;
using i64 = std::int64_t;

constexpr int kThreads = 256;
constexpr int kVecPerThread = 2;  // float4s of each of p, g, m, v in flight per thread
constexpr i64 kTile = static_cast<i64>(kThreads) * 4 * kVecPerThread;
constexpr int kMaxTensors = 48;
// Fixed, not derived from the device, so the reduction tree (and its bits) is the same on every GPU.
constexpr int kNormBlocks = 1024;

struct AdamWBatch {
  AdamWTensor t[kMaxTensors];
  i64 tile_begin[kMaxTensors + 1];  // prefix sums of the tensors' tile counts
  int n;
};

struct GradBatch {
  GradTensor t[kMaxTensors];
  i64 tile_begin[kMaxTensors + 1];
  int n;
};

// Kernel parameters stay well inside the 4 KiB every architecture and driver accepts; the
// kernels index them in place (__grid_constant__: no per-thread copy of the tensor list).
static_assert(sizeof(AdamWBatch) <= 3584 && sizeof(GradBatch) <= 3584);

struct AdamWScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float decay;         // 1 - lr * weight_decay
  float step_size;     // lr / (1 - beta1^step)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^step)
  float eps;
  float grad_scale;
  const float* grad_scale_device;
};

// The tensor owning `tile`: the last j < n with tile_begin[j] <= tile (empty tensors are never
// batched, so that tensor holds the tile).
__device__ __forceinline__ int owner(const i64* tile_begin, int n, i64 tile) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_begin[mid] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const AdamWScalars& s, float gs) {
  g *= gs;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  // sqrt(v / bc2) = sqrt(v) / sqrt(bc2); decay first, as the CPU step does (decoupled, on the old p).
  p = p * s.decay - s.step_size * m / (sqrtf(v) * s.inv_sqrt_bc2 + s.eps);
}

__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const __grid_constant__ AdamWBatch batch, const AdamWScalars s) {
  const float gs = s.grad_scale_device ? s.grad_scale * *s.grad_scale_device : s.grad_scale;
  const i64 tiles = batch.tile_begin[batch.n];
  for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int j = owner(batch.tile_begin, batch.n, tile);
    float* const p = batch.t[j].param;
    const float* const g = batch.t[j].grad;
    float* const m = batch.t[j].m;
    float* const v = batch.t[j].v;
    bf16* const pb = batch.t[j].param_bf16;
    const i64 begin = (tile - batch.tile_begin[j]) * kTile;
    const i64 end = min(batch.t[j].count, begin + kTile);
    auto scalar = [&](i64 e) {
      float pe = p[e], me = m[e], ve = v[e];
      adamw_element(pe, g[e], me, ve, s, gs);
      p[e] = pe;
      m[e] = me;
      v[e] = ve;
      if (pb) pb[e] = __float2bfloat16_rn(pe);
    };
    const bool vectorise = train_dev::aligned16(p) && train_dev::aligned16(g) && train_dev::aligned16(m) &&
                           train_dev::aligned16(v) && (reinterpret_cast<std::uintptr_t>(pb) & 7u) == 0;
    if (!vectorise) {
      for (i64 e = begin + threadIdx.x; e < end; e += kThreads) scalar(e);
      continue;
    }
    // All loads first: p, m and v are written, so without this the compiler could not hoist the
    // second vector's loads above the first one's stores.
    float4 pv[kVecPerThread], gv[kVecPerThread], mv[kVecPerThread], vv[kVecPerThread];
#pragma unroll
    for (int u = 0; u < kVecPerThread; ++u) {
      const i64 e = begin + (static_cast<i64>(u) * kThreads + threadIdx.x) * 4;
      if (e + 4 <= end) {
        pv[u] = *reinterpret_cast<const float4*>(p + e);
        gv[u] = *reinterpret_cast<const float4*>(g + e);
        mv[u] = *reinterpret_cast<const float4*>(m + e);
        vv[u] = *reinterpret_cast<const float4*>(v + e);
      }
    }
#pragma unroll
    for (int u = 0; u < kVecPerThread; ++u) {
      const i64 e = begin + (static_cast<i64>(u) * kThreads + threadIdx.x) * 4;
      if (e + 4 <= end) {
        adamw_element(pv[u].x, gv[u].x, mv[u].x, vv[u].x, s, gs);
        adamw_element(pv[u].y, gv[u].y, mv[u].y, vv[u].y, s, gs);
        adamw_element(pv[u].z, gv[u].z, mv[u].z, vv[u].z, s, gs);
        adamw_element(pv[u].w, gv[u].w, mv[u].w, vv[u].w, s, gs);
        *reinterpret_cast<float4*>(p + e) = pv[u];
        *reinterpret_cast<float4*>(m + e) = mv[u];
        *reinterpret_cast<float4*>(v + e) = vv[u];
        if (pb) {
          const __nv_bfloat162 lo = __floats2bfloat162_rn(pv[u].x, pv[u].y);
          const __nv_bfloat162 hi = __floats2bfloat162_rn(pv[u].z, pv[u].w);
          uint2 packed;
          memcpy(&packed.x, &lo, sizeof(lo));
          memcpy(&packed.y, &hi, sizeof(hi));
          *reinterpret_cast<uint2*>(pb + e) = packed;
        }
      } else {
        for (i64 x = e; x < end; ++x) scalar(x);  // the tensor's last, partial vector
      }
    }
  }
}

// Squares are exact in double (24-bit mantissas squared fit in 53), so every thread sums exact
// terms in double, in an order fixed by the tensors, the tile layout and kNormBlocks.
__global__ void __launch_bounds__(kThreads)
    sum_of_squares_kernel(const __grid_constant__ GradBatch batch, double* partials, bool accumulate) {
  double acc = 0.0;
  const i64 tiles = batch.tile_begin[batch.n];
  for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int j = owner(batch.tile_begin, batch.n, tile);
    const float* const g = batch.t[j].data;
    const i64 begin = (tile - batch.tile_begin[j]) * kTile;
    const i64 end = min(batch.t[j].count, begin + kTile);
    if (!train_dev::aligned16(g)) {
      for (i64 e = begin + threadIdx.x; e < end; e += kThreads) acc = fma(double(g[e]), double(g[e]), acc);
      continue;
    }
    float4 gv[kVecPerThread];
#pragma unroll
    for (int u = 0; u < kVecPerThread; ++u) {
      const i64 e = begin + (static_cast<i64>(u) * kThreads + threadIdx.x) * 4;
      if (e + 4 <= end) gv[u] = *reinterpret_cast<const float4*>(g + e);
    }
#pragma unroll
    for (int u = 0; u < kVecPerThread; ++u) {
      const i64 e = begin + (static_cast<i64>(u) * kThreads + threadIdx.x) * 4;
      if (e + 4 <= end) {
        acc = fma(double(gv[u].x), double(gv[u].x), acc);
        acc = fma(double(gv[u].y), double(gv[u].y), acc);
        acc = fma(double(gv[u].z), double(gv[u].z), acc);
        acc = fma(double(gv[u].w), double(gv[u].w), acc);
      } else {
        for (i64 x = e; x < end; ++x) acc = fma(double(g[x]), double(g[x]), acc);
      }
    }
  }
  const double block = train_dev::block_sum(acc);
  // Block b owns partials[b] in every launch of one sum, so accumulating across launches races
  // with nothing and keeps the order fixed.
  if (threadIdx.x == 0) partials[blockIdx.x] = accumulate ? partials[blockIdx.x] + block : block;
}

__global__ void __launch_bounds__(kNormBlocks) sum_partials_kernel(const double* partials, double* out) {
  const double total = train_dev::block_sum(partials[threadIdx.x]);
  if (threadIdx.x == 0) *out = total;
}

__global__ void clip_coefficient_kernel(const double* sum_sq, double max_norm, float* coefficient) {
  double c = 1.0;
  if (max_norm > 0) {
    c = max_norm / (sqrt(*sum_sq) + 1e-6);
    if (!(c < 1.0)) c = 1.0;
  }
  *coefficient = static_cast<float>(c);
}

// Blocks of adamw_kernel resident at once on the current device: the grid that strides over the
// tiles with no second, partial wave.
int resident_blocks() {
  int device = 0, sms = 0, per_sm = 0;
  PX_CUDA_CHECK(cudaGetDevice(&device));
  PX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  PX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, adamw_kernel, kThreads, 0));
  return std::max(1, sms) * std::max(1, per_sm);
}

i64 tiles_of(i64 count, const char* what) {
  if (count < 0) throw std::invalid_argument(std::string(what) + ": negative element count " + std::to_string(count));
  return (count + kTile - 1) / kTile;
}

}  // namespace

void adamw_step(std::span<const AdamWTensor> tensors, const AdamWConfig& cfg, const AdamWStep& step,
                cudaStream_t stream) {
  if (step.step < 1) throw std::invalid_argument("adamw_step: step counts from 1, got " + std::to_string(step.step));
  const double t = static_cast<double>(step.step);
  const double bc1 = 1.0 - std::pow(cfg.beta1, t), bc2 = 1.0 - std::pow(cfg.beta2, t);
  const AdamWScalars s{static_cast<float>(cfg.beta1),
                       static_cast<float>(1.0 - cfg.beta1),
                       static_cast<float>(cfg.beta2),
                       static_cast<float>(1.0 - cfg.beta2),
                       static_cast<float>(1.0 - cfg.lr * cfg.weight_decay),
                       static_cast<float>(cfg.lr / bc1),
                       static_cast<float>(1.0 / std::sqrt(bc2)),
                       static_cast<float>(cfg.eps),
                       static_cast<float>(step.grad_scale),
                       step.grad_scale_device};
  const int max_grid = resident_blocks();
  AdamWBatch batch{};
  i64 tiles = 0;
  auto launch = [&] {
    if (batch.n == 0) return;
    batch.tile_begin[batch.n] = tiles;
    const auto grid = static_cast<unsigned>(std::min<i64>(tiles, max_grid));
    adamw_kernel<<<grid, kThreads, 0, stream>>>(batch, s);
    PX_CUDA_CHECK_LAUNCH();
    batch.n = 0;
    tiles = 0;
  };
  for (const AdamWTensor& x : tensors) {
    const i64 n = tiles_of(x.count, "adamw_step");
    if (n == 0) continue;
    if (batch.n == kMaxTensors) launch();
    batch.t[batch.n] = x;
    batch.tile_begin[batch.n++] = tiles;
    tiles += n;
  }
  launch();
}

std::size_t sum_of_squares_workspace_doubles() { return kNormBlocks; }

void sum_of_squares(std::span<const GradTensor> tensors, double* out, double* workspace, cudaStream_t stream) {
  GradBatch batch{};
  i64 tiles = 0;
  bool accumulate = false;
  auto launch = [&] {
    batch.tile_begin[batch.n] = tiles;
    // Always the full grid: blocks without tiles still write their (zero) partial, so the final
    // pass never reads a stale one.
    sum_of_squares_kernel<<<kNormBlocks, kThreads, 0, stream>>>(batch, workspace, accumulate);
    PX_CUDA_CHECK_LAUNCH();
    accumulate = true;
    batch.n = 0;
    tiles = 0;
  };
  for (const GradTensor& x : tensors) {
    const i64 n = tiles_of(x.count, "sum_of_squares");
    if (n == 0) continue;
    if (batch.n == kMaxTensors) launch();
    batch.t[batch.n] = x;
    batch.tile_begin[batch.n++] = tiles;
    tiles += n;
  }
  if (batch.n > 0 || !accumulate) launch();  // no tensors at all: one empty launch writes zeros
  sum_partials_kernel<<<1, kNormBlocks, 0, stream>>>(workspace, out);
  PX_CUDA_CHECK_LAUNCH();
}

double sum_of_squares_to_host(std::span<const GradTensor> tensors, double* out, double* workspace,
                              cudaStream_t stream) {
  sum_of_squares(tensors, out, workspace, stream);
  double host = 0;
  PX_CUDA_CHECK(cudaMemcpyAsync(&host, out, sizeof(host), cudaMemcpyDeviceToHost, stream));
  PX_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

void clip_coefficient(const double* sum_sq, double max_norm, float* coefficient, cudaStream_t stream) {
  clip_coefficient_kernel<<<1, 1, 0, stream>>>(sum_sq, max_norm, coefficient);
  PX_CUDA_CHECK_LAUNCH();
}

}  // namespace px::cuda
