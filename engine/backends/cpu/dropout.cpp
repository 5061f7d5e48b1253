// Counter-based dropout masks and the fused dropout-add.
#include "engine/backends/cpu/dropout.hpp"

#include <cassert>

namespace px::cpu {

template <class T>
void dropout_add_forward(std::span<const T> x, std::span<const T> residual, std::span<T> out, std::span<std::uint8_t> mask,
                         std::span<const std::uint64_t> row_keys, std::int64_t cols, double p, std::uint64_t seed) {
  assert(p >= 0 && p < 1 && mask.size() >= x.size() && out.size() >= x.size());
  assert(static_cast<std::int64_t>(row_keys.size()) * cols >= static_cast<std::int64_t>(x.size()));
  const double scale = 1.0 / (1.0 - p);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const auto r = static_cast<std::int64_t>(i) / cols, c = static_cast<std::int64_t>(i) % cols;
    const bool keep = !dropped(seed, row_keys[static_cast<std::size_t>(r)], c, p);
    mask[i] = keep ? 1 : 0;
    out[i] = static_cast<T>((residual.empty() ? 0.0 : static_cast<double>(residual[i])) + (keep ? x[i] * scale : 0.0));
  }
}

template <class T>
void dropout_backward(std::span<const T> dy, std::span<const std::uint8_t> mask, std::span<T> dx, double p) {
  const double scale = 1.0 / (1.0 - p);
  for (std::size_t i = 0; i < dy.size(); ++i) dx[i] = mask[i] ? static_cast<T>(dy[i] * scale) : T(0);
}

#define PX_INSTANTIATE(T)                                                                                                   \
  template void dropout_add_forward<T>(std::span<const T>, std::span<const T>, std::span<T>, std::span<std::uint8_t>,      \
                                       std::span<const std::uint64_t>, std::int64_t, double, std::uint64_t);                \
  template void dropout_backward<T>(std::span<const T>, std::span<const std::uint8_t>, std::span<T>, double);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
