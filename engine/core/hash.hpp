// Stable, platform-independent hashing for everything keyed by coordinates: initial weights,
// dropout masks, data windows, run fingerprints. Counter-based randomness needs a mixer whose
// output bits each depend on every input bit; SplitMix64's finaliser (Steele et al. 2014) is one.
#pragma once

#include <cstdint>
#include <string_view>

namespace px {

// SplitMix64: one step of the generator, a bijection on 64-bit words.
constexpr std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// FNV-1a of a string: names (of parameters, runs) to 64-bit keys.
constexpr std::uint64_t fnv1a(std::string_view s) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
  return h;
}

}  // namespace px
