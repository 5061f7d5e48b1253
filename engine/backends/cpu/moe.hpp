// Mixture-of-experts routing and token permutation (Switch / GShard / Mixtral top-k routing with a
// per-expert capacity, Megatron-Core semantics): the router's softmax, top-k and capacity
// assignment with its load-balancing loss, dispatch of token rows into an expert-major buffer and
// the gate-weighted combine back, each with its backward.
//
// A token's k assignments are (expert, slot) pairs in rank order; a dropped assignment, past its
// expert's capacity, is expert -1, slot -1 and gate 0, and contributes nothing downstream. The
// dispatch buffer is [experts * capacity x hidden], row e * capacity + slot, so with ep expert-
// parallel ranks the experts of rank r are one contiguous chunk of the all-to-all.
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

struct MoeShape {
  std::int64_t tokens = 0;
  std::int64_t experts = 0;
  std::int64_t topk = 0;
  std::int64_t capacity = 0;  // token-assignments each expert takes from this batch of tokens
};

// logits [tokens x experts] -> probs = softmax(logits) [tokens x experts] (kept for backward), and
// per token its topk experts by probability (ties to the lower index), expert / slot (int32) and
// gate [tokens x topk]. gate is the chosen probability, divided by the sum of the topk chosen when
// `renormalize` (Mixtral); capacity drops come after, so a kept gate keeps that sum. Slots fill in
// token order. Returns the Switch load-balancing loss scaled by aux_coeff.
template <typename T>
T router_forward(std::span<const T> logits, std::span<T> probs, std::span<std::int32_t> expert,
                 std::span<std::int32_t> slot, std::span<T> gate, const MoeShape& s, bool renormalize, T aux_coeff);

// d_gate [tokens x topk] plus the aux loss (its gradient taken as 1, times aux_coeff) -> d_logits
// [tokens x experts], overwritten. The top-k choice is recomputed from probs, exactly as forward
// made it; the expert counts in the aux loss are constants.
template <typename T>
void router_backward(std::span<const T> d_gate, std::span<const T> probs, std::span<const std::int32_t> expert,
                     std::span<T> d_logits, const MoeShape& s, bool renormalize, T aux_coeff);

// x [tokens x hidden] -> dispatched [experts * capacity x hidden]; empty slots are zero.
template <typename T>
void permute_forward(std::span<const T> x, std::span<const std::int32_t> expert, std::span<const std::int32_t> slot,
                     std::span<T> dispatched, const MoeShape& s, std::int64_t hidden);

// d_dispatched -> d_x (overwritten), summed over each token's kept assignments.
template <typename T>
void permute_backward(std::span<const T> d_dispatched, std::span<const std::int32_t> expert,
                      std::span<const std::int32_t> slot, std::span<T> d_x, const MoeShape& s, std::int64_t hidden);

// expert_out [experts * capacity x hidden] -> y [tokens x hidden] = sum over kept assignments of
// gate * expert_out[row].
template <typename T>
void unpermute_forward(std::span<const T> expert_out, std::span<const std::int32_t> expert,
                       std::span<const std::int32_t> slot, std::span<const T> gate, std::span<T> y, const MoeShape& s,
                       std::int64_t hidden);

// dy [tokens x hidden] -> d_expert_out (overwritten, zero in empty slots) and d_gate (overwritten,
// zero for dropped assignments).
template <typename T>
void unpermute_backward(std::span<const T> dy, std::span<const T> expert_out, std::span<const std::int32_t> expert,
                        std::span<const std::int32_t> slot, std::span<const T> gate, std::span<T> d_expert_out,
                        std::span<T> d_gate, const MoeShape& s, std::int64_t hidden);

}  // namespace px::cpu
