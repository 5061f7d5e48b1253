// Rotary embedding: one rotation routine, turned forward or back.
#include "engine/backends/cpu/rope.hpp"

#include <cassert>
#include <cmath>

namespace px::cpu {
namespace {

template <class T>
void rotate(std::span<T> x, std::int64_t rows, std::int64_t ld, std::int64_t heads, std::int64_t d,
            std::span<const std::int32_t> positions, double theta, double sign) {
  assert(d % 2 == 0 && heads * d <= ld && static_cast<std::int64_t>(positions.size()) >= rows);
  const std::int64_t half = d / 2;
  for (std::int64_t r = 0; r < rows; ++r) {
    const double p = positions[static_cast<std::size_t>(r)];
    for (std::int64_t i = 0; i < half; ++i) {
      const double angle = sign * p * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
      const double c = std::cos(angle), s = std::sin(angle);
      for (std::int64_t hd = 0; hd < heads; ++hd) {
        T& a = x[static_cast<std::size_t>(r * ld + hd * d + i)];
        T& b = x[static_cast<std::size_t>(r * ld + hd * d + i + half)];
        const double x1 = a, x2 = b;
        a = static_cast<T>(x1 * c - x2 * s);
        b = static_cast<T>(x2 * c + x1 * s);
      }
    }
  }
}

}  // namespace

template <class T>
void rope_forward(std::span<T> x, std::int64_t rows, std::int64_t ld, std::int64_t heads, std::int64_t d,
                  std::span<const std::int32_t> positions, double theta) {
  rotate(x, rows, ld, heads, d, positions, theta, 1.0);
}

template <class T>
void rope_backward(std::span<T> dx, std::int64_t rows, std::int64_t ld, std::int64_t heads, std::int64_t d,
                   std::span<const std::int32_t> positions, double theta) {
  rotate(dx, rows, ld, heads, d, positions, theta, -1.0);  // a rotation's transpose is its inverse
}

#define PX_INSTANTIATE(T)                                                                                          \
  template void rope_forward<T>(std::span<T>, std::int64_t, std::int64_t, std::int64_t, std::int64_t,             \
                                std::span<const std::int32_t>, double);                                             \
  template void rope_backward<T>(std::span<T>, std::int64_t, std::int64_t, std::int64_t, std::int64_t,            \
                                 std::span<const std::int32_t>, double);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
