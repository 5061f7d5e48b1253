// Device helpers private to the training kernels (cross_entropy.cu, adamw.cu, moe.cu): block
// reductions and scans whose combination order depends only on the block size, so every result
// is bit-identical from run to run, and the bf16 x 8 vector loads the bandwidth-bound kernels use.
// Their own namespace, so nothing here can collide with another kernel group's helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "engine/backends/cuda/warp_reduce.cuh"

namespace px::cuda::train_dev {

using px::cuda::kFullMask;
using px::cuda::warp_max;
using px::cuda::warp_sum;

// Sum or max over the block, returned to every thread. blockDim.x must be a multiple of 32 (at
// most 1024) and every thread of the block must call it. Every warp reduces the same partials in
// the same order (which saves a broadcast barrier); the closing barrier lets the shared partials
// be reused by a call straight after.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float partial[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  const unsigned warps = blockDim.x >> 5;
  x = warp_sum(x);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  float y = lane < warps ? partial[lane] : 0.0f;
  y = warp_sum(y);
  __syncthreads();
  return y;
}
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double partial[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  const unsigned warps = blockDim.x >> 5;
  x = warp_sum(x);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  double y = lane < warps ? partial[lane] : 0.0;
  y = warp_sum(y);
  __syncthreads();
  return y;
}
__device__ __forceinline__ float block_max(float x) {
  __shared__ float partial[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  const unsigned warps = blockDim.x >> 5;
  x = warp_max(x);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  float y = lane < warps ? partial[lane] : partial[0];  // max is idempotent
  y = warp_max(y);
  __syncthreads();
  return y;
}

// Exclusive prefix sum of one int per thread in thread order; *total gets the block's sum.
// Integer, so exact; same requirements as block_sum.
__device__ __forceinline__ int block_exclusive_scan(int x, int* total) {
  __shared__ int warp_total[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  const unsigned warps = blockDim.x >> 5;
  int inc = x;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFullMask, inc, o);
    if (lane >= static_cast<unsigned>(o)) inc += y;
  }
  if (lane == 31) warp_total[warp] = inc;
  __syncthreads();
  int before = 0, all = 0;
  for (unsigned w = 0; w < warps; ++w) {  // at most 32 shared reads, same on every thread
    const int t = warp_total[w];
    if (w < warp) before += t;
    all += t;
  }
  __syncthreads();
  *total = all;
  return before + inc - x;
}

// Eight bf16 as one 16-byte load or store.
struct Bf16x8 {
  float v[8];
};
__device__ __forceinline__ Bf16x8 load_bf16x8(const __nv_bfloat16* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  Bf16x8 out;
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162 pair;
    static_assert(sizeof(pair) == sizeof(unsigned));
    memcpy(&pair, &words[i], sizeof(pair));
    const float2 f = __bfloat1622float2(pair);
    out.v[2 * i] = f.x;
    out.v[2 * i + 1] = f.y;
  }
  return out;
}
__device__ __forceinline__ void store_bf16x8(__nv_bfloat16* p, const Bf16x8& x) {
  unsigned words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(x.v[2 * i], x.v[2 * i + 1]);
    memcpy(&words[i], &pair, sizeof(pair));
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

}  // namespace px::cuda::train_dev
