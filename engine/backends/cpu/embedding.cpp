// Vocabulary-parallel embedding lookup and its scatter-add backward.
#include "engine/backends/cpu/embedding.hpp"

#include <algorithm>
#include <cassert>

namespace px::cpu {

template <class T>
void embedding_forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> positions, std::span<const T> word,
                       std::int64_t vocab_begin, std::span<const T> pos, std::span<T> out, std::int64_t h) {
  const auto rows = static_cast<std::int64_t>(word.size()) / h;
  assert(out.size() >= tokens.size() * static_cast<std::size_t>(h) && (pos.empty() || positions.size() >= tokens.size()));
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const std::int64_t r = tokens[t] - vocab_begin;
    auto dst = out.subspan(t * static_cast<std::size_t>(h), static_cast<std::size_t>(h));
    if (r >= 0 && r < rows)
      std::copy_n(word.begin() + r * h, h, dst.begin());
    else
      std::fill(dst.begin(), dst.end(), T(0));
    if (pos.empty()) continue;
    const std::int64_t p = positions[t];
    assert(p >= 0 && (p + 1) * h <= static_cast<std::int64_t>(pos.size()));
    for (std::int64_t c = 0; c < h; ++c) dst[static_cast<std::size_t>(c)] += pos[static_cast<std::size_t>(p * h + c)];
  }
}

template <class T>
void embedding_backward(std::span<const T> dy, std::span<const std::int32_t> tokens, std::span<const std::int32_t> positions,
                        std::span<T> dword, std::int64_t vocab_begin, std::span<T> dpos, std::int64_t h) {
  const auto rows = static_cast<std::int64_t>(dword.size()) / h;
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const auto src = dy.subspan(t * static_cast<std::size_t>(h), static_cast<std::size_t>(h));
    const std::int64_t r = tokens[t] - vocab_begin;
    if (r >= 0 && r < rows)
      for (std::int64_t c = 0; c < h; ++c) dword[static_cast<std::size_t>(r * h + c)] += src[static_cast<std::size_t>(c)];
    if (dpos.empty()) continue;
    const std::int64_t p = positions[t];
    for (std::int64_t c = 0; c < h; ++c) dpos[static_cast<std::size_t>(p * h + c)] += src[static_cast<std::size_t>(c)];
  }
}

#define PX_INSTANTIATE(T)                                                                                                      \
  template void embedding_forward<T>(std::span<const std::int32_t>, std::span<const std::int32_t>, std::span<const T>,        \
                                     std::int64_t, std::span<const T>, std::span<T>, std::int64_t);                           \
  template void embedding_backward<T>(std::span<const T>, std::span<const std::int32_t>, std::span<const std::int32_t>,       \
                                      std::span<T>, std::int64_t, std::span<T>, std::int64_t);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
