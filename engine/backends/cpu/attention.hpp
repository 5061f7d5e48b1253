// Causal self-attention, softmax(q k^T / sqrt(d)) v with grouped key/value heads, forward and
// backward over one key/value block per call, so that context-parallel (ring) attention can fold
// in each block as it arrives around the ring and the single-rank run is the one-block case.
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

// One (query block, key/value block) pair. Rows are sequence-major (row s * b + j). Positions are
// global, so the causal mask holds across blocks: query q_pos0 + i sees key k_pos0 + t iff
// k_pos0 + t <= q_pos0 + i.
struct AttentionShape {
  std::int64_t b = 1;       // sequences
  std::int64_t heads = 1;   // query heads
  std::int64_t groups = 1;  // key/value heads; query head h reads group h / (heads / groups)
  std::int64_t d = 1;       // head dim
  std::int64_t sq = 0;      // query positions in the block
  std::int64_t sk = 0;      // key/value positions in the block
  std::int64_t q_pos0 = 0;  // global position of the first query
  std::int64_t k_pos0 = 0;  // global position of the first key
};

// Where q (sq * b rows of heads * d), k and v (sk * b rows of groups * d) live, or their gradients:
// each span starts at the first element of its first row, e.g. at the K columns of a packed
// [Q | K | V] row, and its rows are ld apart.
template <typename T>
struct QkvView {
  std::span<T> q, k, v;
  std::int64_t ldq = 0, ldk = 0, ldv = 0;
};

// Folds one key/value block into the running out (sq * b rows of heads * d) and lse (log-sum-exp
// of the scaled scores, [b][heads][sq]). `first` initialises both: a query that sees no key of the
// block gets out 0 and lse -inf. Later blocks merge by online softmax, leaving a query that sees
// none of their keys unchanged. Once every block is folded in, out is exact causal attention.
template <typename T>
void attention_forward(const AttentionShape& sh, const QkvView<const T>& x, std::span<T> out, std::span<T> lse,
                       bool first);

// Backward of one key/value block, from the final out and lse (after every block) and dout (laid
// out as out). Accumulates (+=) this block's share of dq and the block's dk and dv, so the sums
// over all blocks are the exact gradients.
template <typename T>
void attention_backward(const AttentionShape& sh, const QkvView<const T>& x, std::span<const T> out,
                        std::span<const T> lse, std::span<const T> dout, const QkvView<T>& dx);

}  // namespace px::cpu
