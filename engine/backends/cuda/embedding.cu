// Embedding lookup and its deterministic scatter-add backward.
//
// Backward, per table (word rows, then position rows), four stream-ordered kernels:
//   group       for each token t: the first index holding its id, its rank among the indices
//               holding that id, and (at first indices of in-range ids) the group's size
//   scan        exclusive prefix sum of the sizes: each group's offset in one list
//   fill        list[offset of t's group + rank of t] = t, so each group lists its tokens in order
//   accumulate  one block per (group, column slice) adds the group's dy rows, in list order, onto
//               the table row: the CPU kernel's additions in the CPU kernel's order
// Every step is integer bookkeeping or a fixed-order fp32 sum, so the result never depends on
// scheduling. Work per group is proportional to its size, so a very frequent token is one long
// serial sum per column slice; slices keep that to one pack per thread.
#include "engine/backends/cuda/embedding.hpp"

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
using i32 = std::int32_t;

constexpr int kTile = 256;          // ids per shared-memory tile of the all-pairs scan; its block size
constexpr int kScanThreads = 1024;  // the prefix sum's single block
constexpr int kThreads = 256;

template <int N>
struct alignas(N >= 4 ? 16 : 4 * N) FloatPack {
  float v[N];
};

template <int VEC, bool POS>
__global__ void embedding_forward_kernel(const i32* __restrict__ tokens, const i32* __restrict__ positions,
                                         const bf16* __restrict__ word, i64 vocab_begin, i64 vocab_rows,
                                         const bf16* __restrict__ pos, bf16* __restrict__ out, i64 n, int h) {
  const int v = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (v >= h / VEC) return;
  for (i64 t = blockIdx.y; t < n; t += gridDim.y) {
    const i64 r = static_cast<i64>(tokens[t]) - vocab_begin;
    float f[VEC] = {};
    if (r >= 0 && r < vocab_rows) ew::unpack(ew::load_pack<VEC>(word + r * h, v), f);
    if constexpr (POS) {
      float q[VEC];
      ew::unpack(ew::load_pack<VEC>(pos + static_cast<i64>(positions[t]) * h, v), q);
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] += q[j];
    }
    ew::store_pack<VEC>(out + t * h, v, ew::pack(f));
  }
}

// The all-pairs pass: thread t compares its id with every id, a shared-memory tile at a time
// (the tile is read as a broadcast, so each compare is one shared load). Ids in [lo, hi) are the
// ones this table holds; the others get no group.
__global__ void __launch_bounds__(kTile)
    group_kernel(const i32* __restrict__ keys, i64 n, i64 lo, i64 hi, i32* __restrict__ first, i32* __restrict__ rank,
                 i32* __restrict__ size) {
  __shared__ i32 tile[kTile];
  const i64 t = static_cast<i64>(blockIdx.x) * kTile + threadIdx.x;
  const bool mine = t < n;
  const i32 key = mine ? keys[t] : 0;
  i64 f = n;
  i32 before = 0, count = 0;
  for (i64 base = 0; base < n; base += kTile) {
    __syncthreads();  // the previous tile's readers are done
    if (base + threadIdx.x < n) tile[threadIdx.x] = keys[base + threadIdx.x];
    __syncthreads();
    const int m = static_cast<int>(std::min<i64>(kTile, n - base));
    for (int j = 0; j < m; ++j) {
      if (tile[j] == key) {
        const i64 u = base + j;
        f = std::min(f, u);
        ++count;
        before += u < t ? 1 : 0;
      }
    }
  }
  if (!mine) return;
  first[t] = static_cast<i32>(f);
  rank[t] = before;
  size[t] = (key >= lo && key < hi && f == t) ? count : 0;
}

// out[i] = in[0] + ... + in[i - 1], by one block striding over the array with a carry.
__global__ void __launch_bounds__(kScanThreads)
    exclusive_scan_kernel(const i32* __restrict__ in, i32* __restrict__ out, i64 n) {
  __shared__ i32 warp_total[kScanThreads / 32];
  const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x >> 5);
  i32 carry = 0;
  for (i64 base = 0; base < n; base += kScanThreads) {
    const i64 i = base + threadIdx.x;
    const i32 v = i < n ? in[i] : 0;
    i32 inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const i32 y = __shfl_up_sync(ew::kFullMask, inc, o);
      if (lane >= o) inc += y;
    }
    if (lane == 31) warp_total[warp] = inc;
    __syncthreads();
    i32 before = 0, all = 0;
    for (int w = 0; w < kScanThreads / 32; ++w) {
      const i32 s = warp_total[w];
      if (w < warp) before += s;
      all += s;
    }
    if (i < n) out[i] = carry + before + inc - v;
    carry += all;
    __syncthreads();  // everyone has read warp_total before the next chunk overwrites it
  }
}

__global__ void fill_kernel(const i32* __restrict__ keys, i64 n, i64 lo, i64 hi, const i32* __restrict__ first,
                            const i32* __restrict__ rank, const i32* __restrict__ offset, i32* __restrict__ list) {
  for (i64 t = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i32 key = keys[t];
    if (key >= lo && key < hi) list[offset[first[t]] + rank[t]] = static_cast<i32>(t);
  }
}

// Block (group head t, column slice y): thread x of slice y owns one pack of the row.
template <int VEC>
__global__ void accumulate_kernel(const bf16* __restrict__ dy, const i32* __restrict__ keys, i64 key_base,
                                  const i32* __restrict__ size, const i32* __restrict__ offset, const i32* __restrict__ list,
                                  i64 n, float* __restrict__ table, int h) {
  const int v = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  if (v >= h / VEC) return;
  for (i64 t = blockIdx.x; t < n; t += gridDim.x) {
    const i32 count = size[t];
    if (count == 0) continue;
    const i32* members = list + offset[t];
    auto* dst = reinterpret_cast<FloatPack<VEC>*>(table + (static_cast<i64>(keys[t]) - key_base) * h) + v;
    FloatPack<VEC> acc = *dst;
#pragma unroll 4
    for (i32 k = 0; k < count; ++k) {
      float d[VEC];
      ew::unpack(ew::load_pack<VEC>(dy + static_cast<i64>(members[k]) * h, v), d);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc.v[j] += d[j];
    }
    *dst = acc;
  }
}

struct Scratch {
  i32 *first, *rank, *size, *offset, *list;
};

template <int VEC>
void launch_accumulate(const bf16* dy, const i32* keys, i64 key_base, const Scratch& s, i64 n, float* table, i64 h,
                       cudaStream_t stream) {
  const i64 packs = h / VEC;
  const int threads = static_cast<int>(std::min<i64>(kThreads, ew::ceil_div(packs, 32) * 32));
  const dim3 grid(static_cast<unsigned>(std::min<i64>(n, std::numeric_limits<int>::max())),
                  static_cast<unsigned>(ew::ceil_div(packs, threads)));
  accumulate_kernel<VEC>
      <<<grid, threads, 0, stream>>>(dy, keys, key_base, s.size, s.offset, s.list, n, table, static_cast<int>(h));
  PX_CUDA_CHECK_LAUNCH();
}

// table[keys[t] - lo] += dy[t] for every t with keys[t] in [lo, hi).
void scatter_add(const bf16* dy, const i32* keys, i64 n, i64 lo, i64 hi, float* table, i64 h, const Scratch& s,
                 cudaStream_t stream) {
  group_kernel<<<static_cast<unsigned>(ew::ceil_div(n, kTile)), kTile, 0, stream>>>(keys, n, lo, hi, s.first, s.rank,
                                                                                    s.size);
  PX_CUDA_CHECK_LAUNCH();
  exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(s.size, s.offset, n);
  PX_CUDA_CHECK_LAUNCH();
  fill_kernel<<<ew::flat_blocks(n, kThreads), kThreads, 0, stream>>>(keys, n, lo, hi, s.first, s.rank, s.offset, s.list);
  PX_CUDA_CHECK_LAUNCH();
  if (h % 8 == 0 && ew::aligned(dy, 16) && ew::aligned(table, 16))
    launch_accumulate<8>(dy, keys, lo, s, n, table, h, stream);
  else
    launch_accumulate<1>(dy, keys, lo, s, n, table, h, stream);
}

void check_sizes(i64 n_tokens, i64 h, const char* what) {
  if (n_tokens < 0 || n_tokens > std::numeric_limits<i32>::max() || h < 0 || h > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string(what) + ": bad shape " + std::to_string(n_tokens) + " x " + std::to_string(h));
}

}  // namespace

void embedding_forward(const i32* tokens, const i32* positions, i64 n_tokens, const bf16* word, i64 vocab_begin,
                       i64 vocab_rows, const bf16* pos, bf16* out, i64 h, cudaStream_t stream) {
  check_sizes(n_tokens, h, "embedding_forward");
  if (n_tokens == 0 || h == 0) return;
  const bool vec8 = h % 8 == 0 && ew::aligned(word, 16) && ew::aligned(out, 16) && (pos == nullptr || ew::aligned(pos, 16));
  const int c = static_cast<int>(h);
  const auto l = ew::row_launch(n_tokens, vec8 ? h / 8 : h);
  if (vec8 && pos)
    embedding_forward_kernel<8, true>
        <<<l.grid, l.block, 0, stream>>>(tokens, positions, word, vocab_begin, vocab_rows, pos, out, n_tokens, c);
  else if (vec8)
    embedding_forward_kernel<8, false>
        <<<l.grid, l.block, 0, stream>>>(tokens, positions, word, vocab_begin, vocab_rows, pos, out, n_tokens, c);
  else if (pos)
    embedding_forward_kernel<1, true>
        <<<l.grid, l.block, 0, stream>>>(tokens, positions, word, vocab_begin, vocab_rows, pos, out, n_tokens, c);
  else
    embedding_forward_kernel<1, false>
        <<<l.grid, l.block, 0, stream>>>(tokens, positions, word, vocab_begin, vocab_rows, pos, out, n_tokens, c);
  PX_CUDA_CHECK_LAUNCH();
}

std::size_t embedding_backward_workspace_bytes(i64 n_tokens) {
  check_sizes(n_tokens, 0, "embedding_backward_workspace_bytes");
  return 5 * static_cast<std::size_t>(n_tokens) * sizeof(i32);
}

void embedding_backward(const bf16* dy, const i32* tokens, const i32* positions, i64 n_tokens, float* dword, i64 vocab_begin,
                        i64 vocab_rows, float* dpos, i64 h, void* workspace, std::size_t workspace_bytes,
                        cudaStream_t stream) {
  check_sizes(n_tokens, h, "embedding_backward");
  if (n_tokens == 0 || h == 0) return;
  const std::size_t need = embedding_backward_workspace_bytes(n_tokens);
  if (workspace == nullptr || workspace_bytes < need || !ew::aligned(workspace, alignof(i32)))
    throw std::invalid_argument("embedding_backward: workspace of " + std::to_string(workspace_bytes) + " bytes, " +
                                std::to_string(need) + " needed (4-byte aligned)");
  auto* w = static_cast<i32*>(workspace);
  const Scratch s{w, w + n_tokens, w + 2 * n_tokens, w + 3 * n_tokens, w + 4 * n_tokens};
  // The two tables reuse the scratch: their kernels run one after the other on the stream.
  if (dword && vocab_rows > 0) scatter_add(dy, tokens, n_tokens, vocab_begin, vocab_begin + vocab_rows, dword, h, s, stream);
  if (dpos) scatter_add(dy, positions, n_tokens, 0, std::numeric_limits<i32>::max() + i64{1}, dpos, h, s, stream);
}

}  // namespace px::cuda
