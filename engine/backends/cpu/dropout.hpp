// Dropout with a counter-based mask (a hash of seed, row key and column, in the manner of
// Philox-style generators), fused with the residual add as Megatron fuses bias-dropout-add.
// The caller gives each row a key naming the element globally (sample in the global batch,
// position, layer, site), so tensor-, sequence- and data-parallel ranks draw the very bits the
// single-rank run draws for the same elements. Masks are one byte per element (1 kept, 0 dropped).
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

// Deterministic 64-bit mixing of a key tuple (SplitMix64 finaliser, Steele et al. 2014).
std::uint64_t mix_key(std::uint64_t a, std::uint64_t b);

// True with probability p for this element (p in [0, 1)).
bool dropped(std::uint64_t seed, std::uint64_t row_key, std::int64_t col, double p);

// out = residual + mask * x / (1 - p) over [rows x cols], with the mask written to `mask`;
// `residual` may be empty (plain dropout).
template <class T>
void dropout_add_forward(std::span<const T> x, std::span<const T> residual, std::span<T> out, std::span<std::uint8_t> mask,
                         std::span<const std::uint64_t> row_keys, std::int64_t cols, double p, std::uint64_t seed);
// dx = dy * mask / (1 - p); the residual's gradient is dy itself.
template <class T>
void dropout_backward(std::span<const T> dy, std::span<const std::uint8_t> mask, std::span<T> dx, double p);

}  // namespace px::cpu
