// Device helpers private to the bandwidth-bound kernels (norm.cu, activation.cu, dropout.cu,
// rope.cu, embedding.cu): packs of N bf16 moved as one N * 2-byte access (16 bytes for N = 8, the
// widest load a thread can issue), fixed-order warp reductions, and the launch arithmetic they
// share. The namespace is their own, so nothing here can collide with another kernel group's
// helpers of the same name when everything links into parallax_cuda_kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/warp_reduce.cuh"

namespace px::cuda::ew {

using bf16 = __nv_bfloat16;
using px::cuda::kFullMask;

// N consecutive bf16; the alignment makes the compiler issue one vector access per pack, so a
// Pack<8> access needs a 16-byte-aligned address (the host checks before choosing N = 8).
template <int N>
struct alignas(sizeof(bf16) * N) Pack {
  bf16 v[N];
};

template <int N>
__device__ __forceinline__ Pack<N> load_pack(const bf16* base, std::int64_t pack_index) {
  return reinterpret_cast<const Pack<N>*>(base)[pack_index];
}
template <int N>
__device__ __forceinline__ void store_pack(bf16* base, std::int64_t pack_index, const Pack<N>& p) {
  reinterpret_cast<Pack<N>*>(base)[pack_index] = p;
}
template <int N>
__device__ __forceinline__ void unpack(const Pack<N>& p, float (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = __bfloat162float(p.v[j]);
}
template <int N>
__device__ __forceinline__ Pack<N> pack(const float (&in)[N]) {
  Pack<N> p;
#pragma unroll
  for (int j = 0; j < N; ++j) p.v[j] = __float2bfloat16_rn(in[j]);
  return p;
}

// N mask bytes as one access (8 bytes for N = 8), aligned like Pack.
template <int N>
struct alignas(N) MaskPack {
  std::uint8_t v[N];
};

using px::cuda::warp_sum;

__host__ __device__ constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* p, std::uintptr_t bytes) { return (reinterpret_cast<std::uintptr_t>(p) % bytes) == 0; }

// Streaming multiprocessors of the current device, for grids sized to fill it once.
inline int sm_count() {
  int device = 0, n = 0;
  PX_CUDA_CHECK(cudaGetDevice(&device));
  PX_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// Launch shape of a [rows x packs_per_row] kernel: x spans a row's packs, y walks rows (grid-
// stride past the 65535 limit of gridDim.y). Blocks are trimmed to a warp multiple of the row so
// short rows (GPT-2's 1600 columns are 200 packs) waste few threads.
struct RowLaunch {
  dim3 grid, block;
};
inline RowLaunch row_launch(std::int64_t rows, std::int64_t packs_per_row) {
  constexpr std::int64_t kBlock = 256, kMaxGridY = 65535;
  const std::int64_t threads = packs_per_row < kBlock ? ceil_div(packs_per_row, 32) * 32 : kBlock;
  const std::int64_t gx = ceil_div(packs_per_row, threads);
  const std::int64_t gy = rows < kMaxGridY ? rows : kMaxGridY;
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy > 0 ? gy : 1)), dim3(static_cast<unsigned>(threads))};
}

// Launch shape of a flat kernel over n packs, one pack per thread per grid-stride step. Capped
// at a few waves' worth of blocks: enough resident threads to keep loads in flight, and a grid
// that is cheap to launch however large n is.
inline unsigned flat_blocks(std::int64_t n_packs, int threads) {
  const std::int64_t cap = static_cast<std::int64_t>(sm_count()) * 32;
  const std::int64_t want = ceil_div(n_packs, threads);
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

}  // namespace px::cuda::ew
