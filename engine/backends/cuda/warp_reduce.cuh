// Warp-wide reductions every kernel group shares. xor butterflies add the same two operands on
// both lanes of each pair (in swapped order, which addition does not see), so every lane ends with
// the same bits: callers rely on it.
#pragma once

namespace px::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <class T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

}  // namespace px::cuda
