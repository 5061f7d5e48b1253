// Softmax cross-entropy over a vocabulary split across tensor-parallel ranks (Megatron's
// vocab-parallel cross entropy): each rank holds the logits of columns [vocab_begin,
// vocab_begin + cols). The three per-row reductions across ranks are the caller's collectives:
// a max of row_max, then sums of sum_exp and target_logit. With one rank they are identities.
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

// row_max[r] = max over this shard's columns of row r.
template <class T>
void cross_entropy_row_max(std::span<const T> logits, std::span<T> row_max, std::int64_t rows, std::int64_t cols);

// Given the global row maxima: sum_exp[r] = sum over this shard of exp(logit - max);
// target_logit[r] = the target's logit when it falls in this shard, else 0.
template <class T>
void cross_entropy_partials(std::span<const T> logits, std::span<const std::int32_t> targets, std::int64_t vocab_begin,
                            std::span<const T> row_max, std::span<T> sum_exp, std::span<T> target_logit, std::int64_t rows,
                            std::int64_t cols);

// loss[r] = log(sum_exp) + max - target_logit, from the reduced statistics.
template <class T>
void cross_entropy_loss(std::span<const T> row_max, std::span<const T> sum_exp, std::span<const T> target_logit, std::span<T> loss);

// dlogits = (softmax - onehot(target)) * dloss[r] on this shard's columns.
template <class T>
void cross_entropy_backward(std::span<const T> logits, std::span<const std::int32_t> targets, std::int64_t vocab_begin,
                            std::span<const T> row_max, std::span<const T> sum_exp, std::span<const T> dloss, std::span<T> dlogits,
                            std::int64_t rows, std::int64_t cols);

}  // namespace px::cpu
