// Vocabulary-parallel softmax cross-entropy on the GPU, with the CPU kernels' three-phase contract
// (engine/backends/cpu/cross_entropy.hpp): a rank holds the bf16 logits of columns [vocab_begin,
// vocab_begin + cols) and the caller's collectives reduce the per-row statistics between phases
// (a max of row_max, then sums of sum_exp and target_logit). Statistics and the loss are fp32;
// dlogits is bf16. For one rank, cross_entropy_forward_fused does the first three phases in one
// read of the logits.
//
// All pointers are device pointers; every call is asynchronous on `stream`. Any row width and
// any 2-byte-aligned base work: rows whose start is not 16-byte aligned take a scalar head and
// tail around the vectorised body.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace px::cuda {

// row_max[r] = max over this shard's columns of row r.
void cross_entropy_row_max(const __nv_bfloat16* logits, float* row_max, std::int64_t rows, std::int64_t cols,
                           cudaStream_t stream);

// Given the global row maxima: sum_exp[r] = sum over this shard of exp(logit - row_max[r]);
// target_logit[r] = the target's logit when it falls in this shard, else 0.
void cross_entropy_partials(const __nv_bfloat16* logits, const std::int32_t* targets, std::int64_t vocab_begin,
                            const float* row_max, float* sum_exp, float* target_logit, std::int64_t rows,
                            std::int64_t cols, cudaStream_t stream);

// loss[r] = log(sum_exp[r]) + row_max[r] - target_logit[r], from the reduced statistics.
void cross_entropy_loss(const float* row_max, const float* sum_exp, const float* target_logit, float* loss,
                        std::int64_t rows, cudaStream_t stream);

// dlogits = (softmax - onehot(target)) * dloss[r] on this shard's columns, from the reduced
// row_max and sum_exp. dlogits may be logits itself (in place, as Megatron does to save the
// rows x vocab buffer): every element is read before it is overwritten, by the same thread.
void cross_entropy_backward(const __nv_bfloat16* logits, const std::int32_t* targets, std::int64_t vocab_begin,
                            const float* row_max, const float* sum_exp, const float* dloss, __nv_bfloat16* dlogits,
                            std::int64_t rows, std::int64_t cols, cudaStream_t stream);

// Single rank (the whole vocabulary, vocab_begin 0): row_max, sum_exp (relative to that max) and
// loss in one pass with an online softmax, so the logits are read once instead of twice.
// target_logit may be null. The statistics feed cross_entropy_backward unchanged.
void cross_entropy_forward_fused(const __nv_bfloat16* logits, const std::int32_t* targets, float* row_max,
                                 float* sum_exp, float* target_logit, float* loss, std::int64_t rows, std::int64_t cols,
                                 cudaStream_t stream);

}  // namespace px::cuda
