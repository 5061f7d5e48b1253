// Dropout with a counter-based mask (a hash of seed, row key and column, in the manner of
// Philox-style generators), fused with the residual add as Megatron fuses bias-dropout-add.
// The caller gives each row a key naming the element globally (sample in the global batch,
// position, layer, site), so tensor-, sequence- and data-parallel ranks draw the very bits the
// single-rank run draws for the same elements. Masks are one byte per element (1 kept, 0 dropped).
#pragma once

#include <cstdint>
#include <span>

#include "engine/core/counter_rng.hpp"

namespace px::cpu {

// The mask hash lives in engine/core/counter_rng.hpp, one definition for the CPU and CUDA kernels.
using px::dropped;
using px::mix_key;

// out = residual + mask * x / (1 - p) over [rows x cols], with the mask written to `mask`;
// `residual` may be empty (plain dropout).
template <class T>
void dropout_add_forward(std::span<const T> x, std::span<const T> residual, std::span<T> out, std::span<std::uint8_t> mask,
                         std::span<const std::uint64_t> row_keys, std::int64_t cols, double p, std::uint64_t seed);
// dx = dy * mask / (1 - p); the residual's gradient is dy itself.
template <class T>
void dropout_backward(std::span<const T> dy, std::span<const std::uint8_t> mask, std::span<T> dx, double p);

}  // namespace px::cpu
