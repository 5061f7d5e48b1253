// LayerNorm / RMSNorm kernels. A row group of G threads (a warp multiple) owns one row at a time;
// short rows share a 256-thread block between several groups, so a block still has enough loads
// in flight. Each thread keeps up to kItems packs of its row in registers, so the two or three
// passes a norm needs (mean, variance, output; or statistics, gradient sums, dx) read the row
// from DRAM once; only rows longer than a block can cache (over 16384 columns) re-read the rest.
//
// The backward's dgamma / dbeta are column sums over all rows. Summing them with float atomics
// would serialise thousands of rows on each column and make the result depend on arrival order,
// so each block instead accumulates its rows' contributions privately (registers, then a fixed-
// order combine of its row groups in shared memory) into one partial row of the workspace, and a
// second kernel adds the partial rows in index order into the fp32 gradients. The grid is one
// wave of resident blocks, so the partial rows cost a few percent of the row traffic.
#include "engine/backends/cuda/norm.hpp"

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

constexpr int kMaxThreads = 512;   // so a thread may hold 128 registers: the caches below fit
constexpr int kSharedBlock = 256;  // block size when several short rows share a block

// Packs per tensor a thread caches in registers. The vectorised backward holds two cached
// tensors and two accumulators per pack (24 registers a pack); three packs keep it under 128
// registers without spills and still cache a 12288-column row (GPT-3) in 512 threads.
template <int VEC, bool BACKWARD>
constexpr int kCachedPacks = VEC == 1 ? 8 : (BACKWARD ? 3 : 4);
// How a row maps onto threads.
struct Shape {
  int group;  // threads per row, a multiple of 32
  int block;  // threads per block, a multiple of group
  int rows_per_block() const { return block / group; }
};

// The smallest group that caches the whole row (capped at kMaxThreads). Groups of at most 128
// threads are rounded to a power of two so they tile a 256-thread block; such rows always fit the
// cache (packs <= items * group), which the backward's shared-memory combine relies on.
Shape shape_for(i64 cols, int vec, int items) {
  const i64 packs = cols / vec;
  const i64 g = ew::ceil_div(ew::ceil_div(packs, items), 32) * 32;
  if (g <= 128) {
    int p = 32;
    while (p < g) p *= 2;
    return {p, kSharedBlock};
  }
  const int capped = static_cast<int>(std::min<i64>(g, kMaxThreads));
  return {capped, capped};
}

// Sum over the calling thread's row group, returned to all its threads, in an order fixed by the
// group size. Every thread of the block must call it (it holds barriers when a group spans
// several warps); the leading barrier keeps a fast warp from overwriting `red` while a slow one
// still reads the previous call's sums.
__device__ __forceinline__ float group_sum(float v, int group, float2* red) {
  v = ew::warp_sum(v);
  if (group == 32) return v;
  __syncthreads();
  if ((threadIdx.x & 31u) == 0) red[threadIdx.x >> 5].x = v;
  __syncthreads();
  const int first = static_cast<int>(threadIdx.x) / group * (group >> 5);
  float s = 0.0f;
  for (int w = 0; w < (group >> 5); ++w) s += red[first + w].x;
  return s;
}
__device__ __forceinline__ float2 group_sum2(float2 v, int group, float2* red) {
  v.x = ew::warp_sum(v.x);
  v.y = ew::warp_sum(v.y);
  if (group == 32) return v;
  __syncthreads();
  if ((threadIdx.x & 31u) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  const int first = static_cast<int>(threadIdx.x) / group * (group >> 5);
  float2 s = make_float2(0.0f, 0.0f);
  for (int w = 0; w < (group >> 5); ++w) {
    s.x += red[first + w].x;
    s.y += red[first + w].y;
  }
  return s;
}

template <int VEC, bool LAYER>
__global__ void __launch_bounds__(kMaxThreads)
    norm_forward_kernel(const bf16* __restrict__ x, const bf16* __restrict__ gamma, const bf16* __restrict__ beta,
                        bf16* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, i64 rows, int cols,
                        float eps, int group) {
  constexpr int kItems = kCachedPacks<VEC, false>;
  __shared__ float2 red[kMaxThreads / 32];
  const int per_block = static_cast<int>(blockDim.x) / group;
  const int rg = static_cast<int>(threadIdx.x) / group, gt = static_cast<int>(threadIdx.x) % group;
  const int packs = cols / VEC;
  const float n = static_cast<float>(cols);

  // Every group of the block runs the same number of iterations (the bound is per block), so the
  // barriers inside group_sum are reached by all threads; groups past the last row idle through.
  for (i64 base = static_cast<i64>(blockIdx.x) * per_block; base < rows; base += static_cast<i64>(gridDim.x) * per_block) {
    const i64 r = base + rg;
    const bool active = r < rows;
    const bf16* xr = x + (active ? r : 0) * cols;
    bf16* yr = y + (active ? r : 0) * cols;

    Pack<VEC> xc[kItems];
    // Calls f(values) for each of this thread's packs of the row: cached ones from registers,
    // the rest (rows longer than the cache) reloaded.
    auto each = [&](auto&& f) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int v = gt + k * group;
        if (v < packs) f(v, xc[k]);
      }
      for (int v = gt + kItems * group; v < packs; v += group) f(v, ew::load_pack<VEC>(xr, v));
    };

    if (active) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int v = gt + k * group;
        if (v < packs) xc[k] = ew::load_pack<VEC>(xr, v);
      }
    }
    float mean = 0.0f;
    if constexpr (LAYER) {
      float s = 0.0f;
      if (active)
        each([&](int, const Pack<VEC>& p) {
          float f[VEC];
          ew::unpack(p, f);
#pragma unroll
          for (int j = 0; j < VEC; ++j) s += f[j];
        });
      mean = group_sum(s, group, red) / n;
    }
    // Two passes (mean, then squared deviations) as the CPU kernel does: sum(x^2) - mean^2 would
    // cancel catastrophically on rows whose mean is large against their spread.
    float ss = 0.0f;
    if (active)
      each([&](int, const Pack<VEC>& p) {
        float f[VEC];
        ew::unpack(p, f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += (f[j] - mean) * (f[j] - mean);
      });
    const float rstd = rsqrtf(group_sum(ss, group, red) / n + eps);
    if (!active) continue;
    each([&](int v, const Pack<VEC>& p) {
      float f[VEC], g[VEC], b[VEC] = {};
      ew::unpack(p, f);
      ew::unpack(ew::load_pack<VEC>(gamma, v), g);
      if constexpr (LAYER) ew::unpack(ew::load_pack<VEC>(beta, v), b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] = (f[j] - mean) * rstd * g[j] + b[j];
      ew::store_pack<VEC>(yr, v, ew::pack(f));
    });
    if (gt == 0) {
      if (LAYER && mean_out) mean_out[r] = mean;
      if (rstd_out) rstd_out[r] = rstd;
    }
  }
}

// part: rows [0, gridDim.x) are the blocks' dgamma partials, rows [gridDim.x, 2 gridDim.x) their
// dbeta partials (LayerNorm only), each `cols` floats.
template <int VEC, bool LAYER, bool SAVED>
__global__ void __launch_bounds__(kMaxThreads)
    norm_backward_kernel(const bf16* __restrict__ dy, const bf16* __restrict__ x, const bf16* __restrict__ gamma,
                         const float* __restrict__ mean_in, const float* __restrict__ rstd_in, bf16* __restrict__ dx,
                         float* __restrict__ part, i64 rows, int cols, float eps, int group) {
  constexpr int kItems = kCachedPacks<VEC, true>;
  // The vectorised kernel caches x (read by up to four passes) but reloads dy (read by two) in
  // its last pass, from L1 or L2: caching both spills registers. The reload is cache traffic,
  // not DRAM traffic, since the row was read a moment before.
  constexpr bool kCacheDy = VEC == 1;
  __shared__ float2 red[kMaxThreads / 32];
  extern __shared__ float combine[];  // [2 x cols], only when several groups share the block
  const int per_block = static_cast<int>(blockDim.x) / group;
  const int rg = static_cast<int>(threadIdx.x) / group, gt = static_cast<int>(threadIdx.x) % group;
  const int packs = cols / VEC;
  const float n = static_cast<float>(cols);
  float* part_g = part + static_cast<i64>(blockIdx.x) * cols;
  float* part_b = LAYER ? part + (static_cast<i64>(gridDim.x) + blockIdx.x) * cols : nullptr;

  float acc_g[kItems][VEC] = {}, acc_b[kItems][VEC] = {};
  // Packs beyond the register cache accumulate straight into this block's partial row. That
  // happens only with one group per block, where each column has exactly one owning thread, so
  // its read-modify-writes need no synchronisation.
  for (int v = gt + kItems * group; v < packs; v += group)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      part_g[v * VEC + j] = 0.0f;
      if constexpr (LAYER) part_b[v * VEC + j] = 0.0f;
    }

  for (i64 base = static_cast<i64>(blockIdx.x) * per_block; base < rows; base += static_cast<i64>(gridDim.x) * per_block) {
    const i64 r = base + rg;
    const bool active = r < rows;
    const i64 off = (active ? r : 0) * cols;
    const bf16* xr = x + off;
    const bf16* dyr = dy + off;
    bf16* dxr = dx + off;

    Pack<VEC> xc[kItems], dc[kItems];
    // f(k, v, x pack, dy pack) over this thread's packs; k is the cache slot, -1 past the cache.
    // (Passes that ignore dy let the compiler drop its reload.)
    auto each = [&](auto&& f) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int v = gt + k * group;
        if (v < packs) f(k, v, xc[k], kCacheDy ? dc[k] : ew::load_pack<VEC>(dyr, v));
      }
      for (int v = gt + kItems * group; v < packs; v += group)
        f(-1, v, ew::load_pack<VEC>(xr, v), ew::load_pack<VEC>(dyr, v));
    };

    if (active) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int v = gt + k * group;
        if (v < packs) {
          xc[k] = ew::load_pack<VEC>(xr, v);
          if constexpr (kCacheDy) dc[k] = ew::load_pack<VEC>(dyr, v);
        }
      }
    }

    float mean = 0.0f, rstd = 0.0f;
    if constexpr (SAVED) {
      if (active) {
        if constexpr (LAYER) mean = mean_in[r];
        rstd = rstd_in[r];
      }
    } else {
      // The forward's statistics, recomputed in the forward's order.
      if constexpr (LAYER) {
        float s = 0.0f;
        if (active)
          each([&](int, int, const Pack<VEC>& p, const Pack<VEC>&) {
            float f[VEC];
            ew::unpack(p, f);
#pragma unroll
            for (int j = 0; j < VEC; ++j) s += f[j];
          });
        mean = group_sum(s, group, red) / n;
      }
      float ss = 0.0f;
      if (active)
        each([&](int, int, const Pack<VEC>& p, const Pack<VEC>&) {
          float f[VEC];
          ew::unpack(p, f);
#pragma unroll
          for (int j = 0; j < VEC; ++j) ss += (f[j] - mean) * (f[j] - mean);
        });
      rstd = rsqrtf(group_sum(ss, group, red) / n + eps);
    }

    // LayerNorm: dx = rstd (g - mean(g) - xhat mean(g xhat)); RMSNorm: dx = rstd (g - xhat
    // mean(g xhat)); g = dy gamma.
    float2 sums = make_float2(0.0f, 0.0f);
    if (active)
      each([&](int, int v, const Pack<VEC>& xp, const Pack<VEC>& dp) {
        float f[VEC], d[VEC], g[VEC];
        ew::unpack(xp, f);
        ew::unpack(dp, d);
        ew::unpack(ew::load_pack<VEC>(gamma, v), g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float gd = d[j] * g[j];
          sums.x += gd;
          sums.y += gd * ((f[j] - mean) * rstd);
        }
      });
    float mean_g = 0.0f, mean_gx = 0.0f;
    if constexpr (LAYER) {
      sums = group_sum2(sums, group, red);
      mean_g = sums.x / n;
      mean_gx = sums.y / n;
    } else {
      mean_gx = group_sum(sums.y, group, red) / n;
    }
    if (!active) continue;
    each([&](int k, int v, const Pack<VEC>& xp, const Pack<VEC>& dp) {
      float f[VEC], d[VEC], g[VEC], old[VEC];
      ew::unpack(xp, f);
      ew::unpack(dp, d);
      ew::unpack(ew::load_pack<VEC>(gamma, v), g);
      ew::unpack(ew::load_pack<VEC>(dxr, v), old);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (f[j] - mean) * rstd;
        old[j] += rstd * (d[j] * g[j] - mean_g - xhat * mean_gx);
        if (k >= 0) {
          acc_g[k][j] += d[j] * xhat;
          if constexpr (LAYER) acc_b[k][j] += d[j];
        } else {
          part_g[v * VEC + j] += d[j] * xhat;
          if constexpr (LAYER) part_b[v * VEC + j] += d[j];
        }
      }
      ew::store_pack<VEC>(dxr, v, ew::pack(old));
    });
  }

  if (per_block == 1) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int v = gt + k * group;
      if (v < packs)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          part_g[v * VEC + j] = acc_g[k][j];
          if constexpr (LAYER) part_b[v * VEC + j] = acc_b[k][j];
        }
    }
    return;
  }
  // Several groups: they hold the same columns, so add them into shared memory one group at a
  // time (group order fixes the sum), then write the block's partial row coalesced.
  for (int turn = 0; turn < per_block; ++turn) {
    if (rg == turn) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int v = gt + k * group;
        if (v < packs)
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int c = v * VEC + j;
            combine[c] = (turn == 0 ? 0.0f : combine[c]) + acc_g[k][j];
            if constexpr (LAYER) combine[cols + c] = (turn == 0 ? 0.0f : combine[cols + c]) + acc_b[k][j];
          }
      }
    }
    __syncthreads();
  }
  for (int c = static_cast<int>(threadIdx.x); c < cols; c += static_cast<int>(blockDim.x)) {
    part_g[c] = combine[c];
    if constexpr (LAYER) part_b[c] = combine[cols + c];
  }
}

// out0[c] += sum over p of part[p][c], out1 likewise from the second block of `parts` rows
// (gridDim.y == 2). 32 columns a block, each column's parts split over 32 threads in a fixed
// interleave and combined in thread order: deterministic, and parallel enough for short rows.
__global__ void __launch_bounds__(1024) column_sum_kernel(const float* __restrict__ part, i64 parts, int cols,
                                                          float* __restrict__ out0, float* __restrict__ out1) {
  __shared__ float s[32][33];
  const int c = static_cast<int>(blockIdx.x) * 32 + static_cast<int>(threadIdx.x);
  const float* src = part + static_cast<i64>(blockIdx.y) * parts * cols;
  float acc = 0.0f;
  if (c < cols)
    for (i64 p = threadIdx.y; p < parts; p += 32) acc += src[p * cols + c];
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  float total = 0.0f;
  for (int j = 0; j < 32; ++j) total += s[j][threadIdx.x];
  (blockIdx.y == 0 ? out0 : out1)[c] += total;
}

void check_shape(i64 rows, i64 cols, const char* what) {
  if (rows < 0 || cols < 0 || cols > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string(what) + ": bad shape " + std::to_string(rows) + " x " + std::to_string(cols));
}

std::size_t combine_bytes(const Shape& s, i64 cols) {
  return s.rows_per_block() > 1 ? 2 * static_cast<std::size_t>(cols) * sizeof(float) : 0;
}

template <int VEC, bool LAYER>
void launch_forward(const bf16* x, const bf16* gamma, const bf16* beta, bf16* y, float* mean, float* rstd, i64 rows,
                    i64 cols, float eps, cudaStream_t stream) {
  const Shape s = shape_for(cols, VEC, kCachedPacks<VEC, false>);
  const i64 blocks = std::min<i64>(ew::ceil_div(rows, s.rows_per_block()), std::numeric_limits<int>::max());
  norm_forward_kernel<VEC, LAYER><<<static_cast<unsigned>(blocks), s.block, 0, stream>>>(
      x, gamma, beta, y, mean, rstd, rows, static_cast<int>(cols), eps, s.group);
  PX_CUDA_CHECK_LAUNCH();
}

// Blocks of the backward grid: one wave of resident blocks (fewer when there are fewer rows), so
// each block folds many rows into its partial row.
template <int VEC, bool LAYER, bool SAVED>
i64 backward_blocks(i64 rows, i64 cols) {
  const Shape s = shape_for(cols, VEC, kCachedPacks<VEC, true>);
  int per_sm = 0;
  PX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, norm_backward_kernel<VEC, LAYER, SAVED>, s.block,
                                                              combine_bytes(s, cols)));
  const i64 wave = static_cast<i64>(ew::sm_count()) * std::max(per_sm, 1);
  return std::max<i64>(1, std::min(ew::ceil_div(rows, s.rows_per_block()), wave));
}

template <int VEC, bool LAYER, bool SAVED>
void launch_backward(const bf16* dy, const bf16* x, const bf16* gamma, const float* mean, const float* rstd, bf16* dx,
                     float* dgamma, float* dbeta, i64 rows, i64 cols, float eps, void* workspace,
                     std::size_t workspace_bytes, cudaStream_t stream) {
  const Shape s = shape_for(cols, VEC, kCachedPacks<VEC, true>);
  const i64 blocks = backward_blocks<VEC, LAYER, SAVED>(rows, cols);
  const std::size_t need = (LAYER ? 2u : 1u) * static_cast<std::size_t>(blocks * cols) * sizeof(float);
  if (workspace_bytes < need || workspace == nullptr || !ew::aligned(workspace, alignof(float)))
    throw std::invalid_argument("norm backward: workspace of " + std::to_string(workspace_bytes) + " bytes, " +
                                std::to_string(need) + " needed (4-byte aligned)");
  auto* part = static_cast<float*>(workspace);
  norm_backward_kernel<VEC, LAYER, SAVED><<<static_cast<unsigned>(blocks), s.block, combine_bytes(s, cols), stream>>>(
      dy, x, gamma, mean, rstd, dx, part, rows, static_cast<int>(cols), eps, s.group);
  PX_CUDA_CHECK_LAUNCH();
  const dim3 grid(static_cast<unsigned>(ew::ceil_div(cols, 32)), LAYER ? 2u : 1u);
  column_sum_kernel<<<grid, dim3(32, 32), 0, stream>>>(part, blocks, static_cast<int>(cols), dgamma, dbeta);
  PX_CUDA_CHECK_LAUNCH();
}

template <bool LAYER>
void backward(const bf16* dy, const bf16* x, const bf16* gamma, const float* mean, const float* rstd, bf16* dx,
              float* dgamma, float* dbeta, i64 rows, i64 cols, float eps, void* workspace, std::size_t workspace_bytes,
              cudaStream_t stream) {
  check_shape(rows, cols, LAYER ? "layernorm_backward" : "rmsnorm_backward");
  if (LAYER && ((mean == nullptr) != (rstd == nullptr)))
    throw std::invalid_argument("layernorm_backward: pass both saved statistics (mean, rstd) or neither");
  if (rows == 0 || cols == 0) return;
  const bool vec8 =
      cols % 8 == 0 && ew::aligned(dy, 16) && ew::aligned(x, 16) && ew::aligned(gamma, 16) && ew::aligned(dx, 16);
  const bool saved = rstd != nullptr;
  if (vec8 && saved)
    launch_backward<8, LAYER, true>(dy, x, gamma, mean, rstd, dx, dgamma, dbeta, rows, cols, eps, workspace, workspace_bytes,
                                    stream);
  else if (vec8)
    launch_backward<8, LAYER, false>(dy, x, gamma, mean, rstd, dx, dgamma, dbeta, rows, cols, eps, workspace,
                                     workspace_bytes, stream);
  else if (saved)
    launch_backward<1, LAYER, true>(dy, x, gamma, mean, rstd, dx, dgamma, dbeta, rows, cols, eps, workspace, workspace_bytes,
                                    stream);
  else
    launch_backward<1, LAYER, false>(dy, x, gamma, mean, rstd, dx, dgamma, dbeta, rows, cols, eps, workspace,
                                     workspace_bytes, stream);
}

}  // namespace

void layernorm_forward(const bf16* x, const bf16* gamma, const bf16* beta, bf16* y, float* mean, float* rstd, i64 rows,
                       i64 cols, float eps, cudaStream_t stream) {
  check_shape(rows, cols, "layernorm_forward");
  if (rows == 0 || cols == 0) return;
  const bool vec8 =
      cols % 8 == 0 && ew::aligned(x, 16) && ew::aligned(gamma, 16) && ew::aligned(beta, 16) && ew::aligned(y, 16);
  if (vec8)
    launch_forward<8, true>(x, gamma, beta, y, mean, rstd, rows, cols, eps, stream);
  else
    launch_forward<1, true>(x, gamma, beta, y, mean, rstd, rows, cols, eps, stream);
}

void rmsnorm_forward(const bf16* x, const bf16* gamma, bf16* y, float* rstd, i64 rows, i64 cols, float eps,
                     cudaStream_t stream) {
  check_shape(rows, cols, "rmsnorm_forward");
  if (rows == 0 || cols == 0) return;
  const bool vec8 = cols % 8 == 0 && ew::aligned(x, 16) && ew::aligned(gamma, 16) && ew::aligned(y, 16);
  if (vec8)
    launch_forward<8, false>(x, gamma, nullptr, y, nullptr, rstd, rows, cols, eps, stream);
  else
    launch_forward<1, false>(x, gamma, nullptr, y, nullptr, rstd, rows, cols, eps, stream);
}

std::size_t norm_backward_workspace_bytes(i64 rows, i64 cols) {
  check_shape(rows, cols, "norm_backward_workspace_bytes");
  if (rows == 0 || cols == 0) return 0;
  // The largest grid any variant (pack width from alignment, saved statistics or not, either
  // norm) launches at this shape, with LayerNorm's two partial rows a block.
  i64 blocks = std::max({backward_blocks<1, true, true>(rows, cols), backward_blocks<1, true, false>(rows, cols),
                         backward_blocks<1, false, true>(rows, cols), backward_blocks<1, false, false>(rows, cols)});
  if (cols % 8 == 0)
    blocks = std::max({blocks, backward_blocks<8, true, true>(rows, cols), backward_blocks<8, true, false>(rows, cols),
                       backward_blocks<8, false, true>(rows, cols), backward_blocks<8, false, false>(rows, cols)});
  return 2 * static_cast<std::size_t>(blocks * cols) * sizeof(float);
}

void layernorm_backward(const bf16* dy, const bf16* x, const bf16* gamma, const float* mean, const float* rstd, bf16* dx,
                        float* dgamma, float* dbeta, i64 rows, i64 cols, float eps, void* workspace,
                        std::size_t workspace_bytes, cudaStream_t stream) {
  backward<true>(dy, x, gamma, mean, rstd, dx, dgamma, dbeta, rows, cols, eps, workspace, workspace_bytes, stream);
}

void rmsnorm_backward(const bf16* dy, const bf16* x, const bf16* gamma, const float* rstd, bf16* dx, float* dgamma, i64 rows,
                      i64 cols, float eps, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  backward<false>(dy, x, gamma, nullptr, rstd, dx, dgamma, nullptr, rows, cols, eps, workspace, workspace_bytes, stream);
}

}  // namespace px::cuda
