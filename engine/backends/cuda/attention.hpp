// Fused causal attention on the GPU in the flash-attention manner: tiles of queries and keys in
// shared memory, online softmax, bf16 tensor-core products with fp32 accumulation, and never an
// sq x sk matrix in device memory. The contract is px::cpu::attention_forward/backward's (one
// key/value block per call, global positions for the mask, a running out and lse merged across
// blocks for context-parallel ring attention), with bf16 inputs and fp32 running state.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace px::cuda {

// One (query block, key/value block) pair, as px::cpu::AttentionShape: rows are sequence-major
// (row s * b + j); query q_pos0 + i sees key k_pos0 + t iff k_pos0 + t <= q_pos0 + i.
struct AttentionShape {
  std::int64_t b = 1;       // sequences
  std::int64_t heads = 1;   // query heads
  std::int64_t groups = 1;  // key/value heads; query head h reads group h / (heads / groups)
  std::int64_t d = 1;       // head dim, 1 .. 256
  std::int64_t sq = 0;      // query positions in the block
  std::int64_t sk = 0;      // key/value positions in the block
  std::int64_t q_pos0 = 0;  // global position of the first query
  std::int64_t k_pos0 = 0;  // global position of the first key
};

// Device pointers to the first element of the first row of q (sq * b rows of heads * d), k and v
// (sk * b rows of groups * d), rows ld elements apart, e.g. the Q, K and V columns of one packed
// [Q | K | V] bf16 row. Rows 16-byte aligned with d = 32, 64, 96, 128 or 256 take the vectorised
// path; anything else takes the element-wise one, with the same results.
struct AttentionInputs {
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  std::int64_t ldq = 0, ldk = 0, ldv = 0;
};

// Where dq, dk and dv accumulate, laid out like q, k and v (e.g. the columns of a packed fp32
// [dQ | dK | dV] row). fp32, not bf16: a ring sums one share per key/value block and GQA sums
// heads / groups heads into each dk and dv, and bf16 partial sums would lose those low bits. The
// backend rounds into its bf16 gradient tensors once every block is in.
struct AttentionGrads {
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  std::int64_t ldq = 0, ldk = 0, ldv = 0;
};

// Folds one key/value block into the running out (fp32, sq * b rows of heads * d, contiguous)
// and lse (fp32 log-sum-exp of the scaled scores, [b][heads][sq]). `first` initialises both: a
// query that sees no key of the block gets out 0 and lse -inf; later blocks merge by online
// softmax and leave a query that sees none of their keys bit-for-bit unchanged. The running out
// stays fp32 because every later block rescales it; out_bf16 (optional, same layout) receives
// the bf16 rounding of out after this block, every row, so passing it on the last block feeds the
// output projection without a separate conversion pass. Asynchronous on `stream`.
void attention_forward(const AttentionShape& sh, const AttentionInputs& x, float* out, float* lse, bool first,
                       __nv_bfloat16* out_bf16 = nullptr, cudaStream_t stream = nullptr);

// delta[(j * heads + h) * sq + i] = dout . out over the head's d columns, the softmax term the
// backward needs. It depends only on the final out (fp32) and dout (bf16, laid out as out), so a
// ring computes it once per query block and reuses it for every key/value block.
void attention_backward_delta(const AttentionShape& sh, const float* out, const __nv_bfloat16* dout, float* delta,
                              cudaStream_t stream = nullptr);

// Backward of one key/value block from the final lse (after every block), delta and dout:
// accumulates (+=) this block's share of dq and the block's dk and dv, so the sums over all
// blocks are the exact gradients (FlashAttention-2: one thread block per key tile and head,
// recomputing the probabilities from lse). dk and dv of a key tile are summed in registers across
// the query tiles; dq is added with fp32 atomics, once per (key tile, query tile), so its
// low-order bits depend on the order the tiles finish, and GQA heads sharing a key/value group
// add into that group's dk and dv with atomics too (plain += for MHA). Asynchronous on `stream`.
void attention_backward(const AttentionShape& sh, const AttentionInputs& x, const float* lse, const float* delta,
                        const __nv_bfloat16* dout, const AttentionGrads& dx, cudaStream_t stream = nullptr);

}  // namespace px::cuda
