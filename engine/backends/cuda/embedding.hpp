// Token and learned-position embeddings on the device, vocabulary-parallel as in
// engine/backends/cpu/embedding.hpp: a rank holds word-table rows [vocab_begin, vocab_begin +
// vocab_rows), looks up the tokens that fall there and writes zeros for the rest, so a sum over
// the tensor-parallel group is the full lookup. Tables and activations are bf16; gradients are
// fp32, accumulated (+=).
//
// The backward is deterministic and matches the CPU kernel bit for bit: each table row touched
// by the batch is owned by one block, which adds that row's dy rows in token order onto the
// existing gradient, exactly the fp32 additions the CPU kernel makes. No float atomics. Grouping
// the tokens by row is sort-free: a tiled all-pairs comparison of the token ids (O(tokens^2)
// integer compares; an estimated 10 us for 8192 tokens on an H100, not yet measured), then a
// prefix sum.
//
// Every pointer is device memory; calls are asynchronous on `stream`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace px::cuda {

using bf16 = __nv_bfloat16;  // as in device_buffer.hpp

// out[tokens x h] = word[token - vocab_begin] (zero outside the shard) + pos[position] (when pos
// is not null; positions must then index rows of pos).
void embedding_forward(const std::int32_t* tokens, const std::int32_t* positions, std::int64_t n_tokens, const bf16* word,
                       std::int64_t vocab_begin, std::int64_t vocab_rows, const bf16* pos, bf16* out, std::int64_t h,
                       cudaStream_t stream = nullptr);

// Scratch the backward needs for n_tokens tokens.
std::size_t embedding_backward_workspace_bytes(std::int64_t n_tokens);

// dword[token - vocab_begin] += dy for the tokens of this shard; dpos[position] += dy when dpos is
// not null. workspace: embedding_backward_workspace_bytes(n_tokens) bytes, 4-byte aligned.
void embedding_backward(const bf16* dy, const std::int32_t* tokens, const std::int32_t* positions, std::int64_t n_tokens,
                        float* dword, std::int64_t vocab_begin, std::int64_t vocab_rows, float* dpos, std::int64_t h,
                        void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr);

}  // namespace px::cuda
