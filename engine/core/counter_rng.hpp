// Counter-based randomness shared by the CPU and CUDA backends: a dropout decision is a pure
// function of (seed, row key, column), so any rank, and either backend, that holds an element
// draws the very bit the single-rank CPU run draws for it. Everything here is constexpr and
// plain C++, so g++ and nvcc (--expt-relaxed-constexpr, which makes constexpr host functions
// callable from device code) compile one definition: two copies could drift apart silently.
#pragma once

#include <cstdint>

#include "engine/core/hash.hpp"

namespace px {

// Deterministic 64-bit mixing of a key tuple. The boost::hash_combine step before the SplitMix64
// finaliser keeps (a, b) and (b, a) apart.
constexpr std::uint64_t mix_key(std::uint64_t a, std::uint64_t b) { return splitmix64(a ^ (b + (a << 6) + (a >> 2))); }

// The per-row half of the mask hash, split out so a kernel can hoist it out of its column loop.
constexpr std::uint64_t dropout_row_stream(std::uint64_t seed, std::uint64_t row_key) { return mix_key(seed, row_key); }

// True with probability p (in [0, 1)) for the element at `col` of a row whose stream is `stream`:
// the top 53 hash bits as a uniform in [0, 1), exactly representable in a double.
constexpr bool dropped_in_stream(std::uint64_t stream, std::int64_t col, double p) {
  const std::uint64_t bits = mix_key(stream, static_cast<std::uint64_t>(col));
  return static_cast<double>(bits >> 11) * 0x1.0p-53 < p;
}

// True with probability p for this element (p in [0, 1)).
constexpr bool dropped(std::uint64_t seed, std::uint64_t row_key, std::int64_t col, double p) {
  return dropped_in_stream(dropout_row_stream(seed, row_key), col, p);
}

// The same decision as an integer comparison, for kernels that would rather not convert every
// element's bits to double: with u = bits >> 11 (an integer below 2^53) and q = p 2^53 (exact, a
// power-of-two scaling), u 2^-53 < p iff u < q iff u < ceil(q). dropped_in_stream(s, c, p) ==
// dropped_below(s, c, dropout_threshold(p)) for every s, c and p in [0, 1).
constexpr std::uint64_t dropout_threshold(double p) {
  const double q = p * 0x1.0p53;
  auto t = static_cast<std::uint64_t>(q);  // floor, q >= 0
  if (static_cast<double>(t) < q) ++t;
  return t;
}
constexpr bool dropped_below(std::uint64_t stream, std::int64_t col, std::uint64_t threshold) {
  return (mix_key(stream, static_cast<std::uint64_t>(col)) >> 11) < threshold;
}

}  // namespace px
