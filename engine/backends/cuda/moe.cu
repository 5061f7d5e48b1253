// MoE router and permutation kernels. The router is three launches: one warp per token (softmax,
// top-k, gates), one block per expert (the token-order prefix sum that assigns slots, the
// pre-capacity count and the probability column sum of the aux loss), and a one-warp aux-loss
// reduction. The permutation kernels are one block per dispatch row or per token, each output row
// written once by one block, with fp32 accumulation in the CPU's order.
#include "engine/backends/cuda/moe.hpp"

#include <cuda_runtime.h>

#include <initializer_list>
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

constexpr int kRouterWarps = 8;  // tokens per block in the per-token router kernels
constexpr int kAssignThreads = 256;
constexpr int kRowThreads = 128;
constexpr int kMaxExperts = 1024;  // a lane's taken-set is one 32-bit mask over its experts
constexpr int kMaxTopk = 32;       // lane r holds choice r

constexpr std::size_t align256(std::size_t n) { return (n + 255) / 256 * 256; }

struct RouterWorkspace {
  std::int32_t* chosen;  // [tokens x topk] the pre-capacity top-k
  std::int32_t* count;   // [experts] assignments before capacity dropping
  float* prob_sum;       // [experts] sum over tokens of probs[t, e]
};

RouterWorkspace carve(void* workspace, const MoeShape& s) {
  auto* base = static_cast<unsigned char*>(workspace);
  const std::size_t chosen = align256(static_cast<std::size_t>(s.tokens * s.topk) * sizeof(std::int32_t));
  const std::size_t count = align256(static_cast<std::size_t>(s.experts) * sizeof(std::int32_t));
  return {reinterpret_cast<std::int32_t*>(base), reinterpret_cast<std::int32_t*>(base + chosen),
          reinterpret_cast<float*>(base + chosen + count)};
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

// The ordering top-k selects by: larger probability first, ties to the lower expert. NaN ranks
// below everything, which keeps the order total, so every lane of the butterfly below reaches
// the same winner and the k choices stay distinct even on a poisoned row.
__device__ __forceinline__ float rank_key(float p) { return p != p ? -INFINITY : p; }
__device__ __forceinline__ bool beats(float v, int i, float bv, int bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  return v > bv || (v == bv && i < bi);
}

// Top-k of the warp's row p[0..E), where lane l only ever reads p[e] for e = l (mod 32), the
// entries it wrote itself. Lane r < k returns the r-th choice (expert and probability); k
// selection rounds, each a per-lane scan and a butterfly argmax, as the CPU's selection passes.
__device__ __forceinline__ void warp_topk(const float* p, int E, int k, int lane, int& idx, float& val) {
  unsigned taken = 0;  // bit j: expert lane + 32 j already chosen
  idx = -1;
  val = 0.0f;
  for (int r = 0; r < k; ++r) {
    float bv = -INFINITY;
    int bi = -1;
    for (int e = lane, j = 0; e < E; e += 32, ++j) {
      if ((taken >> j) & 1u) continue;
      const float q = rank_key(p[e]);
      if (beats(q, e, bv, bi)) {
        bv = q;
        bi = e;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(train_dev::kFullMask, bv, o);
      const int oi = __shfl_xor_sync(train_dev::kFullMask, bi, o);
      if (beats(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (bi >= 0 && (bi & 31) == lane) taken |= 1u << (bi >> 5);
    if (lane == r) {
      idx = bi;
      val = bv;
    }
  }
}

template <class TL>
__global__ void __launch_bounds__(kRouterWarps * 32)
    route_tokens_kernel(const TL* __restrict__ logits, float* __restrict__ probs, std::int32_t* __restrict__ expert,
                        std::int32_t* __restrict__ slot, float* __restrict__ gate, std::int32_t* __restrict__ chosen,
                        i64 tokens, int E, int k, bool renormalize) {
  extern __shared__ float rows[];
  const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x >> 5);
  const i64 t = static_cast<i64>(blockIdx.x) * kRouterWarps + warp;
  if (t >= tokens) return;  // whole warps only; this kernel has no block barrier
  float* p = rows + warp * E;
  const TL* l = logits + t * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    p[e] = to_float(l[e]);
    mx = fmaxf(mx, p[e]);
  }
  mx = train_dev::warp_max(mx);
  float sum = 0.0f;
  for (int e = lane; e < E; e += 32) {
    p[e] = expf(p[e] - mx);
    sum += p[e];
  }
  sum = train_dev::warp_sum(sum);
  for (int e = lane; e < E; e += 32) {
    p[e] /= sum;
    probs[t * E + e] = p[e];
  }
  int idx;
  float val;
  warp_topk(p, E, k, lane, idx, val);
  // Over all k chosen: capacity drops come after the renormalisation (Megatron).
  const float S = train_dev::warp_sum(lane < k ? val : 0.0f);
  if (lane < k) {
    const i64 i = t * k + lane;
    chosen[i] = idx;
    expert[i] = idx;  // assign_slots_kernel marks the dropped ones
    slot[i] = -1;
    gate[i] = renormalize ? val / S : val;
  }
}

// Block e: the tokens that chose e, in token order, take slots 0, 1, ... through a block-wide
// exclusive scan per chunk of tokens carried across chunks; those past capacity are dropped. Each
// assignment (t, r) belongs to exactly one expert's block, so the writes never collide.
__global__ void __launch_bounds__(kAssignThreads)
    assign_slots_kernel(const std::int32_t* __restrict__ chosen, const float* __restrict__ probs,
                        std::int32_t* __restrict__ expert, std::int32_t* __restrict__ slot, float* __restrict__ gate,
                        std::int32_t* __restrict__ count, float* __restrict__ prob_sum, i64 tokens, int E, int k,
                        i64 capacity) {
  const int e = static_cast<int>(blockIdx.x);
  i64 filled = 0;
  float psum = 0.0f;
  for (i64 base = 0; base < tokens; base += blockDim.x) {
    const i64 t = base + threadIdx.x;
    int hit = -1;
    if (t < tokens) {
      for (int r = 0; r < k; ++r)
        if (chosen[t * k + r] == e) hit = r;
      psum += probs[t * E + e];
    }
    int chunk_hits;
    const int before = train_dev::block_exclusive_scan(hit >= 0 ? 1 : 0, &chunk_hits);
    if (hit >= 0) {
      const i64 pos = filled + before, i = t * k + hit;
      if (pos < capacity) {
        slot[i] = static_cast<std::int32_t>(pos);
      } else {
        expert[i] = -1;
        gate[i] = 0.0f;
      }
    }
    filled += chunk_hits;
  }
  psum = train_dev::block_sum(psum);
  if (threadIdx.x == 0) {
    count[e] = static_cast<std::int32_t>(filled);
    prob_sum[e] = psum;
  }
}

// Megatron's switch load-balancing loss (see px::cpu::router_forward): scale * sum_e count_e P_e,
// in double and a fixed order.
__global__ void aux_loss_kernel(const std::int32_t* __restrict__ count, const float* __restrict__ prob_sum, int E,
                                double scale, float* __restrict__ aux) {
  if (threadIdx.x != 0) return;
  double acc = 0.0;
  for (int e = 0; e < E; ++e) acc += static_cast<double>(count[e]) * prob_sum[e];
  *aux = static_cast<float>(acc * scale);
}

// Backward, step 1: the forward's pre-capacity choice recomputed from probs (the same values the
// forward selected on, so the same choice) and the per-expert counts. Integer atomics add
// exactly, in whatever order.
__global__ void __launch_bounds__(kRouterWarps * 32)
    recount_kernel(const float* __restrict__ probs, std::int32_t* __restrict__ chosen, std::int32_t* __restrict__ count,
                   i64 tokens, int E, int k) {
  extern __shared__ float rows[];
  const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x >> 5);
  const i64 t = static_cast<i64>(blockIdx.x) * kRouterWarps + warp;
  if (t >= tokens) return;
  float* p = rows + warp * E;
  for (int e = lane; e < E; e += 32) p[e] = probs[t * E + e];
  int idx;
  float val;
  warp_topk(p, E, k, lane, idx, val);
  if (lane < k) {
    chosen[t * k + lane] = idx;
    if (idx >= 0) atomicAdd(count + idx, 1);
  }
}

// Backward, step 2, one warp per token: g = d loss / d probs of the token in shared memory (the
// aux term scale * count_e, plus the gates' terms at the chosen experts), then the softmax
// Jacobian d_logits = p * (g - <p, g>).
__global__ void __launch_bounds__(kRouterWarps * 32)
    router_grad_kernel(const float* __restrict__ d_gate, const float* __restrict__ probs,
                       const std::int32_t* __restrict__ expert, const std::int32_t* __restrict__ chosen,
                       const std::int32_t* __restrict__ count, float* __restrict__ d_logits, i64 tokens, int E, int k,
                       bool renormalize, float scale) {
  extern __shared__ float rows[];
  const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x >> 5);
  const i64 t = static_cast<i64>(blockIdx.x) * kRouterWarps + warp;
  if (t >= tokens) return;
  float* g = rows + warp * E;
  const float* p = probs + t * E;
  const bool mine = lane < k;
  const int c = mine ? chosen[t * k + lane] : -1;
  const float pc = c >= 0 ? p[c] : 0.0f;
  // A dropped assignment's gate is the constant 0, so its d_gate does not flow.
  const float kd = mine && expert[t * k + lane] >= 0 ? d_gate[t * k + lane] : 0.0f;
  for (int e = lane; e < E; e += 32) g[e] = scale * static_cast<float>(count[e]);
  float add = kd;
  if (renormalize) {
    // gate_r = p_{c_r} / S with S over all k chosen, dropped ones included, so a dropped choice
    // still gets gradient through S.
    const float S = train_dev::warp_sum(pc);
    const float dot = train_dev::warp_sum(kd * pc / S);
    add = (kd - dot) / S;
  }
  __syncwarp();             // g[c] below may be another lane's entry
  if (c >= 0) g[c] += add;  // the k choices are distinct: one lane per entry
  __syncwarp();
  float pg = 0.0f;
  for (int e = lane; e < E; e += 32) pg += p[e] * g[e];
  pg = train_dev::warp_sum(pg);
  for (int e = lane; e < E; e += 32) d_logits[t * E + e] = p[e] * (g[e] - pg);
}

__global__ void dispatch_map_kernel(const std::int32_t* __restrict__ expert, const std::int32_t* __restrict__ slot,
                                    std::int32_t* __restrict__ row_assignment, i64 assignments, i64 capacity) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < assignments && expert[i] >= 0) row_assignment[expert[i] * capacity + slot[i]] = static_cast<std::int32_t>(i);
}

__global__ void __launch_bounds__(kRowThreads)
    permute_forward_kernel(const bf16* __restrict__ x, const std::int32_t* __restrict__ row_assignment,
                           bf16* __restrict__ dispatched, int k, i64 hidden, bool vectorise) {
  const i64 row = blockIdx.x;
  const std::int32_t a = row_assignment[row];
  const bf16* src = a >= 0 ? x + (a / k) * hidden : nullptr;
  bf16* dst = dispatched + row * hidden;
  if (vectorise) {
    const uint4 zero = make_uint4(0, 0, 0, 0);  // bf16 +0 is all-zero bits
    for (i64 i = threadIdx.x; i < hidden / 8; i += blockDim.x)
      reinterpret_cast<uint4*>(dst)[i] = src ? reinterpret_cast<const uint4*>(src)[i] : zero;
  } else {
    for (i64 c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src ? src[c] : __float2bfloat16_rn(0.0f);
  }
}

// One block per token; its k dispatch rows (-1 when dropped) staged in shared memory.
__device__ __forceinline__ void load_token_rows(const std::int32_t* expert, const std::int32_t* slot, i64 t, int k,
                                                i64 capacity, i64* rows) {
  if (threadIdx.x < static_cast<unsigned>(k)) {
    const i64 i = t * k + threadIdx.x;
    rows[threadIdx.x] = expert[i] < 0 ? -1 : static_cast<i64>(expert[i]) * capacity + slot[i];
  }
  __syncthreads();
}

// Token t's row = sum over its kept assignments r = 0..k-1 of weight_r * src[row_r], accumulated
// in fp32 in that order from 0 (the CPU's order). Without gate the weights are 1 and skipped;
// with it each product is rounded before the add (no FMA), as the CPU rounds it.
template <bool kGated>
__global__ void __launch_bounds__(kRowThreads)
    combine_rows_kernel(const bf16* __restrict__ src, const std::int32_t* __restrict__ expert,
                        const std::int32_t* __restrict__ slot, const float* __restrict__ gate, bf16* __restrict__ out,
                        int k, i64 capacity, i64 hidden, bool vectorise) {
  __shared__ i64 rows[kMaxTopk];
  const i64 t = blockIdx.x;
  load_token_rows(expert, slot, t, k, capacity, rows);
  auto weight = [&](int r) { return kGated ? gate[t * k + r] : 1.0f; };
  bf16* dst = out + t * hidden;
  if (vectorise) {
    for (i64 i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
      Bf16x8 acc;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc.v[j] = 0.0f;
      for (int r = 0; r < k; ++r) {
        if (rows[r] < 0) continue;
        const Bf16x8 v = train_dev::load_bf16x8(src + rows[r] * hidden + i * 8);
        const float w = weight(r);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc.v[j] = __fadd_rn(acc.v[j], kGated ? __fmul_rn(w, v.v[j]) : v.v[j]);
      }
      train_dev::store_bf16x8(dst + i * 8, acc);
    }
  } else {
    for (i64 c = threadIdx.x; c < hidden; c += blockDim.x) {
      float acc = 0.0f;
      for (int r = 0; r < k; ++r) {
        if (rows[r] < 0) continue;
        const float v = __bfloat162float(src[rows[r] * hidden + c]);
        acc = __fadd_rn(acc, kGated ? __fmul_rn(weight(r), v) : v);
      }
      dst[c] = __float2bfloat16_rn(acc);
    }
  }
}

// One block per dispatch row: d_expert_out[row] = gate * dy[token] (zero for an empty row) and
// the row's gate gradient, dot(dy[token], expert_out[row]), through a block reduction.
__global__ void __launch_bounds__(kRowThreads)
    unpermute_backward_kernel(const bf16* __restrict__ dy, const bf16* __restrict__ expert_out,
                              const float* __restrict__ gate, const std::int32_t* __restrict__ row_assignment,
                              bf16* __restrict__ d_expert_out, float* __restrict__ d_gate, int k, i64 hidden,
                              bool vectorise) {
  const i64 row = blockIdx.x;
  const std::int32_t a = row_assignment[row];
  bf16* d_out = d_expert_out + row * hidden;
  if (a < 0) {  // uniform over the block, so no thread is left waiting at the reduction below
    if (vectorise) {
      for (i64 i = threadIdx.x; i < hidden / 8; i += blockDim.x)
        reinterpret_cast<uint4*>(d_out)[i] = make_uint4(0, 0, 0, 0);
    } else {
      for (i64 c = threadIdx.x; c < hidden; c += blockDim.x) d_out[c] = __float2bfloat16_rn(0.0f);
    }
    return;
  }
  const float w = gate[a];
  const bf16* d = dy + (a / k) * hidden;
  const bf16* o = expert_out + row * hidden;
  float dot = 0.0f;
  if (vectorise) {
    for (i64 i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
      const Bf16x8 dv = train_dev::load_bf16x8(d + i * 8), ov = train_dev::load_bf16x8(o + i * 8);
      Bf16x8 g;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        g.v[j] = __fmul_rn(w, dv.v[j]);
        dot = fmaf(dv.v[j], ov.v[j], dot);
      }
      train_dev::store_bf16x8(d_out + i * 8, g);
    }
  } else {
    for (i64 c = threadIdx.x; c < hidden; c += blockDim.x) {
      const float dv = __bfloat162float(d[c]);
      d_out[c] = __float2bfloat16_rn(__fmul_rn(w, dv));
      dot = fmaf(dv, __bfloat162float(o[c]), dot);
    }
  }
  dot = train_dev::block_sum(dot);
  if (threadIdx.x == 0) d_gate[a] = dot;
}

void validate(const MoeShape& s, const char* what) {
  if (s.tokens < 0 || s.tokens > std::numeric_limits<int>::max() || s.experts < 1 || s.experts > kMaxExperts ||
      s.topk < 1 || s.topk > kMaxTopk || s.topk > s.experts || s.capacity < 0 ||
      s.experts * s.capacity > std::numeric_limits<int>::max() || s.tokens * s.topk > std::numeric_limits<int>::max())
    throw std::invalid_argument(
        std::string(what) + ": unsupported MoE shape (tokens " + std::to_string(s.tokens) + ", experts " +
        std::to_string(s.experts) + ", topk " + std::to_string(s.topk) + ", capacity " + std::to_string(s.capacity) +
        "); experts <= " + std::to_string(kMaxExperts) + ", topk <= min(experts, " + std::to_string(kMaxTopk) + ")");
}

void validate_hidden(std::int64_t hidden, const char* what) {
  if (hidden < 0) throw std::invalid_argument(std::string(what) + ": negative hidden size");
}

unsigned router_grid(const MoeShape& s) { return static_cast<unsigned>((s.tokens + kRouterWarps - 1) / kRouterWarps); }
std::size_t router_smem(const MoeShape& s) {
  return static_cast<std::size_t>(kRouterWarps * s.experts) * sizeof(float);
}

// The vector path needs whole 16-byte vectors per row and 16-byte aligned bases.
bool rows_vectorise(std::int64_t hidden, std::initializer_list<const void*> bases) {
  if (hidden % 8 != 0) return false;
  for (const void* b : bases)
    if (!train_dev::aligned16(b)) return false;
  return true;
}

// Aux-loss factor coeff * E / (k T^2) of px::cpu's aux_scale, formed in double.
double aux_scale(const MoeShape& s, float aux_coeff) {
  const double n = static_cast<double>(s.tokens);
  return static_cast<double>(aux_coeff) * static_cast<double>(s.experts) / (static_cast<double>(s.topk) * n * n);
}

template <class TL>
void router_forward_impl(const TL* logits, float* probs, std::int32_t* expert, std::int32_t* slot, float* gate,
                         float* aux_loss, const MoeShape& s, bool renormalize, float aux_coeff, void* workspace,
                         cudaStream_t stream) {
  validate(s, "router_forward");
  if (s.tokens == 0) {  // no tokens, no imbalance (and no 1 / T^2 to form)
    if (aux_loss) PX_CUDA_CHECK(cudaMemsetAsync(aux_loss, 0, sizeof(float), stream));
    return;
  }
  const RouterWorkspace ws = carve(workspace, s);
  const int E = static_cast<int>(s.experts), k = static_cast<int>(s.topk);
  route_tokens_kernel<TL><<<router_grid(s), kRouterWarps * 32, router_smem(s), stream>>>(
      logits, probs, expert, slot, gate, ws.chosen, s.tokens, E, k, renormalize);
  PX_CUDA_CHECK_LAUNCH();
  assign_slots_kernel<<<static_cast<unsigned>(E), kAssignThreads, 0, stream>>>(
      ws.chosen, probs, expert, slot, gate, ws.count, ws.prob_sum, s.tokens, E, k, s.capacity);
  PX_CUDA_CHECK_LAUNCH();
  if (aux_loss) {
    aux_loss_kernel<<<1, 32, 0, stream>>>(ws.count, ws.prob_sum, E, aux_scale(s, aux_coeff), aux_loss);
    PX_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

std::size_t router_workspace_bytes(const MoeShape& s) {
  return align256(static_cast<std::size_t>(s.tokens * s.topk) * sizeof(std::int32_t)) +
         align256(static_cast<std::size_t>(s.experts) * sizeof(std::int32_t)) +
         align256(static_cast<std::size_t>(s.experts) * sizeof(float));
}

void router_forward(const float* logits, float* probs, std::int32_t* expert, std::int32_t* slot, float* gate,
                    float* aux_loss, const MoeShape& s, bool renormalize, float aux_coeff, void* workspace,
                    cudaStream_t stream) {
  router_forward_impl(logits, probs, expert, slot, gate, aux_loss, s, renormalize, aux_coeff, workspace, stream);
}

void router_forward(const bf16* logits, float* probs, std::int32_t* expert, std::int32_t* slot, float* gate,
                    float* aux_loss, const MoeShape& s, bool renormalize, float aux_coeff, void* workspace,
                    cudaStream_t stream) {
  router_forward_impl(logits, probs, expert, slot, gate, aux_loss, s, renormalize, aux_coeff, workspace, stream);
}

void router_backward(const float* d_gate, const float* probs, const std::int32_t* expert, float* d_logits,
                     const MoeShape& s, bool renormalize, float aux_coeff, void* workspace, cudaStream_t stream) {
  validate(s, "router_backward");
  if (s.tokens == 0) return;
  const RouterWorkspace ws = carve(workspace, s);
  const int E = static_cast<int>(s.experts), k = static_cast<int>(s.topk);
  PX_CUDA_CHECK(cudaMemsetAsync(ws.count, 0, static_cast<std::size_t>(E) * sizeof(std::int32_t), stream));
  recount_kernel<<<router_grid(s), kRouterWarps * 32, router_smem(s), stream>>>(probs, ws.chosen, ws.count, s.tokens, E,
                                                                                k);
  PX_CUDA_CHECK_LAUNCH();
  router_grad_kernel<<<router_grid(s), kRouterWarps * 32, router_smem(s), stream>>>(
      d_gate, probs, expert, ws.chosen, ws.count, d_logits, s.tokens, E, k, renormalize,
      static_cast<float>(aux_scale(s, aux_coeff)));
  PX_CUDA_CHECK_LAUNCH();
}

void dispatch_map(const std::int32_t* expert, const std::int32_t* slot, std::int32_t* row_assignment, const MoeShape& s,
                  cudaStream_t stream) {
  validate(s, "dispatch_map");
  const i64 rows = s.experts * s.capacity, assignments = s.tokens * s.topk;
  if (rows == 0) return;
  // 0xff bytes make every int32 -1: empty until an assignment claims the row.
  PX_CUDA_CHECK(cudaMemsetAsync(row_assignment, 0xff, static_cast<std::size_t>(rows) * sizeof(std::int32_t), stream));
  if (assignments == 0) return;
  constexpr int kThreads = 256;
  dispatch_map_kernel<<<static_cast<unsigned>((assignments + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      expert, slot, row_assignment, assignments, s.capacity);
  PX_CUDA_CHECK_LAUNCH();
}

void permute_forward(const bf16* x, const std::int32_t* row_assignment, bf16* dispatched, const MoeShape& s, i64 hidden,
                     cudaStream_t stream) {
  validate(s, "permute_forward");
  validate_hidden(hidden, "permute_forward");
  const i64 rows = s.experts * s.capacity;
  if (rows == 0 || hidden == 0) return;
  permute_forward_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
      x, row_assignment, dispatched, static_cast<int>(s.topk), hidden, rows_vectorise(hidden, {x, dispatched}));
  PX_CUDA_CHECK_LAUNCH();
}

void permute_backward(const bf16* d_dispatched, const std::int32_t* expert, const std::int32_t* slot, bf16* d_x,
                      const MoeShape& s, i64 hidden, cudaStream_t stream) {
  validate(s, "permute_backward");
  validate_hidden(hidden, "permute_backward");
  if (s.tokens == 0 || hidden == 0) return;
  combine_rows_kernel<false><<<static_cast<unsigned>(s.tokens), kRowThreads, 0, stream>>>(
      d_dispatched, expert, slot, nullptr, d_x, static_cast<int>(s.topk), s.capacity, hidden,
      rows_vectorise(hidden, {d_dispatched, d_x}));
  PX_CUDA_CHECK_LAUNCH();
}

void unpermute_forward(const bf16* expert_out, const std::int32_t* expert, const std::int32_t* slot, const float* gate,
                       bf16* y, const MoeShape& s, i64 hidden, cudaStream_t stream) {
  validate(s, "unpermute_forward");
  validate_hidden(hidden, "unpermute_forward");
  if (s.tokens == 0 || hidden == 0) return;
  combine_rows_kernel<true><<<static_cast<unsigned>(s.tokens), kRowThreads, 0, stream>>>(
      expert_out, expert, slot, gate, y, static_cast<int>(s.topk), s.capacity, hidden,
      rows_vectorise(hidden, {expert_out, y}));
  PX_CUDA_CHECK_LAUNCH();
}

void unpermute_backward(const bf16* dy, const bf16* expert_out, const float* gate, const std::int32_t* row_assignment,
                        bf16* d_expert_out, float* d_gate, const MoeShape& s, i64 hidden, cudaStream_t stream) {
  validate(s, "unpermute_backward");
  validate_hidden(hidden, "unpermute_backward");
  const i64 rows = s.experts * s.capacity, assignments = s.tokens * s.topk;
  // Dropped assignments have no row to write their (zero) gradient; kept ones are overwritten next.
  if (assignments > 0)
    PX_CUDA_CHECK(cudaMemsetAsync(d_gate, 0, static_cast<std::size_t>(assignments) * sizeof(float), stream));
  if (rows == 0) return;
  unpermute_backward_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
      dy, expert_out, gate, row_assignment, d_expert_out, d_gate, static_cast<int>(s.topk), hidden,
      rows_vectorise(hidden, {dy, expert_out, d_expert_out}));
  PX_CUDA_CHECK_LAUNCH();
}

}  // namespace px::cuda
