// Rotary position embedding (Su et al. 2021) in the rotate-half form of GPT-NeoX and Llama:
// within each head of d columns, column i < d/2 pairs with column i + d/2 and the pair turns by
// position * theta^(-2i/d). Applied in place to the first `heads` heads of each row (Q and K sit
// there in a packed qkv row); the backward is the inverse rotation of the gradient.
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

// x: rows of stride ld; positions: one global position per row (context-parallel ranks pass
// their block's offsets).
template <class T>
void rope_forward(std::span<T> x, std::int64_t rows, std::int64_t ld, std::int64_t heads, std::int64_t d,
                  std::span<const std::int32_t> positions, double theta);
template <class T>
void rope_backward(std::span<T> dx, std::int64_t rows, std::int64_t ld, std::int64_t heads, std::int64_t d,
                   std::span<const std::int32_t> positions, double theta);

}  // namespace px::cpu
