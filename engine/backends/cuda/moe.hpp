// Mixture-of-experts routing and token permutation on the GPU, with the semantics and layouts of
// engine/backends/cpu/moe.hpp (Megatron-Core top-k routing with a per-expert capacity): softmax
// router with top-k (ties to the lower expert), slots filled in token order, optional Mixtral
// renormalisation, the Switch load-balancing loss, and dispatch into / combine from the
// expert-major [experts * capacity x hidden] buffer, each with its backward.
//
// Slots are assigned exactly as the sequential CPU loop assigns them, without atomics: a token
// takes each of its k (distinct) experts at most once, so its slot in expert e is the number of
// earlier tokens that chose e, an exclusive prefix sum down column e of the tokens x experts
// choice mask. Everything here is deterministic from run to run.
//
// Types: router logits fp32 or bf16 (two overloads); probs, gates, their gradients and the aux
// loss fp32; expert / slot int32 (-1 for a dropped assignment); hidden rows bf16 with fp32
// accumulation. Limits: experts <= 1024 and topk <= 32 (one warp routes one token).
//
// All pointers are device pointers; every call is asynchronous on `stream` and allocates nothing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "engine/backends/cpu/moe.hpp"

namespace px::cuda {

// The CPU reference's shape, one definition for both backends.
using px::cpu::MoeShape;

// Bytes of device workspace router_forward and router_backward need (256-byte aligned).
std::size_t router_workspace_bytes(const MoeShape& s);

// logits [tokens x experts] -> probs = softmax(logits) [tokens x experts] (kept for backward),
// expert / slot / gate [tokens x topk] as px::cpu::router_forward defines them, and
// *aux_loss = the Switch load-balancing loss times aux_coeff (aux_loss may be null).
void router_forward(const float* logits, float* probs, std::int32_t* expert, std::int32_t* slot, float* gate,
                    float* aux_loss, const MoeShape& s, bool renormalize, float aux_coeff, void* workspace,
                    cudaStream_t stream);
void router_forward(const __nv_bfloat16* logits, float* probs, std::int32_t* expert, std::int32_t* slot, float* gate,
                    float* aux_loss, const MoeShape& s, bool renormalize, float aux_coeff, void* workspace,
                    cudaStream_t stream);

// d_gate [tokens x topk] plus the aux loss (gradient 1, times aux_coeff) -> d_logits [tokens x
// experts] (overwritten), as px::cpu::router_backward: the top-k choice is recomputed from probs.
void router_backward(const float* d_gate, const float* probs, const std::int32_t* expert, float* d_logits,
                     const MoeShape& s, bool renormalize, float aux_coeff, void* workspace, cudaStream_t stream);

// The inverse of (expert, slot): row_assignment[e * capacity + slot] = t * topk + r for each kept
// assignment, -1 for an empty row; [experts * capacity] int32. Built once per routing, it lets the
// kernels that write the dispatch buffer gather instead of scatter, so each row is written once
// and empty rows need no separate clearing pass.
void dispatch_map(const std::int32_t* expert, const std::int32_t* slot, std::int32_t* row_assignment, const MoeShape& s,
                  cudaStream_t stream);

// x [tokens x hidden] -> dispatched [experts * capacity x hidden]; empty rows are zero.
void permute_forward(const __nv_bfloat16* x, const std::int32_t* row_assignment, __nv_bfloat16* dispatched,
                     const MoeShape& s, std::int64_t hidden, cudaStream_t stream);

// d_dispatched -> d_x (overwritten), summed in fp32 over each token's kept assignments in rank order.
void permute_backward(const __nv_bfloat16* d_dispatched, const std::int32_t* expert, const std::int32_t* slot,
                      __nv_bfloat16* d_x, const MoeShape& s, std::int64_t hidden, cudaStream_t stream);

// expert_out [experts * capacity x hidden] -> y [tokens x hidden] = sum over kept assignments (in
// rank order, fp32) of gate * expert_out[row].
void unpermute_forward(const __nv_bfloat16* expert_out, const std::int32_t* expert, const std::int32_t* slot,
                       const float* gate, __nv_bfloat16* y, const MoeShape& s, std::int64_t hidden,
                       cudaStream_t stream);

// dy [tokens x hidden] -> d_expert_out (overwritten, zero in empty rows) and d_gate (overwritten,
// zero for dropped assignments; each a fp32 dot product over hidden).
void unpermute_backward(const __nv_bfloat16* dy, const __nv_bfloat16* expert_out, const float* gate,
                        const std::int32_t* row_assignment, __nv_bfloat16* d_expert_out, float* d_gate,
                        const MoeShape& s, std::int64_t hidden, cudaStream_t stream);

}  // namespace px::cuda
