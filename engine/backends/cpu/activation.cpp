// GELU (tanh form) and SwiGLU.
#include "engine/backends/cpu/activation.hpp"

#include <cassert>
#include <cmath>

namespace px::cpu {
namespace {
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCubic = 0.044715;
}  // namespace

template <class T>
void gelu_forward(std::span<const T> x, std::span<T> y) {
  assert(y.size() >= x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    y[i] = static_cast<T>(0.5 * v * (1.0 + std::tanh(kSqrt2OverPi * (v + kCubic * v * v * v))));
  }
}

template <class T>
void gelu_backward(std::span<const T> dy, std::span<const T> x, std::span<T> dx) {
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    const double u = kSqrt2OverPi * (v + kCubic * v * v * v);
    const double t = std::tanh(u);
    const double du = kSqrt2OverPi * (1.0 + 3.0 * kCubic * v * v);
    dx[i] = static_cast<T>(dy[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du));
  }
}

template <class T>
void swiglu_forward(std::span<const T> x, std::span<T> y, std::int64_t rows, std::int64_t cols) {
  assert(static_cast<std::int64_t>(x.size()) >= 2 * rows * cols && static_cast<std::int64_t>(y.size()) >= rows * cols);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      const double g = x[static_cast<std::size_t>(r * 2 * cols + c)], u = x[static_cast<std::size_t>(r * 2 * cols + cols + c)];
      y[static_cast<std::size_t>(r * cols + c)] = static_cast<T>(g / (1.0 + std::exp(-g)) * u);
    }
}

template <class T>
void swiglu_backward(std::span<const T> dy, std::span<const T> x, std::span<T> dx, std::int64_t rows, std::int64_t cols) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      const auto gi = static_cast<std::size_t>(r * 2 * cols + c), ui = static_cast<std::size_t>(r * 2 * cols + cols + c);
      const double g = x[gi], u = x[ui], d = dy[static_cast<std::size_t>(r * cols + c)];
      const double sig = 1.0 / (1.0 + std::exp(-g));
      dx[gi] = static_cast<T>(d * u * sig * (1.0 + g * (1.0 - sig)));
      dx[ui] = static_cast<T>(d * g * sig);
    }
}

#define PX_INSTANTIATE(T)                                                                               \
  template void gelu_forward<T>(std::span<const T>, std::span<T>);                                      \
  template void gelu_backward<T>(std::span<const T>, std::span<const T>, std::span<T>);                 \
  template void swiglu_forward<T>(std::span<const T>, std::span<T>, std::int64_t, std::int64_t);        \
  template void swiglu_backward<T>(std::span<const T>, std::span<const T>, std::span<T>, std::int64_t, \
                                   std::int64_t);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
