// Row normalizations; statistics accumulate in double whatever T is, so fp32 rows of thousands
// of columns keep their precision.
#include "engine/backends/cpu/norm.hpp"

#include <cassert>
#include <cmath>

namespace px::cpu {
namespace {
using i64 = std::int64_t;
inline std::size_t at(i64 r, i64 c, i64 cols) { return static_cast<std::size_t>(r * cols + c); }
}  // namespace

template <class T>
void layernorm_forward(std::span<const T> x, std::span<const T> gamma, std::span<const T> beta, std::span<T> y, i64 rows, i64 cols,
                       T eps) {
  assert(static_cast<i64>(x.size()) >= rows * cols && static_cast<i64>(y.size()) >= rows * cols);
  for (i64 r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (i64 c = 0; c < cols; ++c) mean += x[at(r, c, cols)];
    mean /= static_cast<double>(cols);
    for (i64 c = 0; c < cols; ++c) var += (x[at(r, c, cols)] - mean) * (x[at(r, c, cols)] - mean);
    const double rstd = 1.0 / std::sqrt(var / static_cast<double>(cols) + eps);
    for (i64 c = 0; c < cols; ++c)
      y[at(r, c, cols)] = static_cast<T>((x[at(r, c, cols)] - mean) * rstd * gamma[c] + beta[c]);
  }
}

template <class T>
void layernorm_backward(std::span<const T> dy, std::span<const T> x, std::span<const T> gamma, std::span<T> dx, std::span<T> dgamma,
                        std::span<T> dbeta, i64 rows, i64 cols, T eps) {
  const double n = static_cast<double>(cols);
  for (i64 r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (i64 c = 0; c < cols; ++c) mean += x[at(r, c, cols)];
    mean /= n;
    for (i64 c = 0; c < cols; ++c) var += (x[at(r, c, cols)] - mean) * (x[at(r, c, cols)] - mean);
    const double rstd = 1.0 / std::sqrt(var / n + eps);
    // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gamma.
    double mean_g = 0, mean_gx = 0;
    for (i64 c = 0; c < cols; ++c) {
      const double xhat = (x[at(r, c, cols)] - mean) * rstd;
      const double g = static_cast<double>(dy[at(r, c, cols)]) * gamma[c];
      mean_g += g;
      mean_gx += g * xhat;
      dgamma[c] += static_cast<T>(dy[at(r, c, cols)] * xhat);
      dbeta[c] += dy[at(r, c, cols)];
    }
    mean_g /= n;
    mean_gx /= n;
    for (i64 c = 0; c < cols; ++c) {
      const double xhat = (x[at(r, c, cols)] - mean) * rstd;
      const double g = static_cast<double>(dy[at(r, c, cols)]) * gamma[c];
      dx[at(r, c, cols)] += static_cast<T>(rstd * (g - mean_g - xhat * mean_gx));
    }
  }
}

template <class T>
void rmsnorm_forward(std::span<const T> x, std::span<const T> gamma, std::span<T> y, i64 rows, i64 cols, T eps) {
  for (i64 r = 0; r < rows; ++r) {
    double ss = 0;
    for (i64 c = 0; c < cols; ++c) ss += static_cast<double>(x[at(r, c, cols)]) * x[at(r, c, cols)];
    const double rstd = 1.0 / std::sqrt(ss / static_cast<double>(cols) + eps);
    for (i64 c = 0; c < cols; ++c) y[at(r, c, cols)] = static_cast<T>(x[at(r, c, cols)] * rstd * gamma[c]);
  }
}

template <class T>
void rmsnorm_backward(std::span<const T> dy, std::span<const T> x, std::span<const T> gamma, std::span<T> dx, std::span<T> dgamma,
                      i64 rows, i64 cols, T eps) {
  const double n = static_cast<double>(cols);
  for (i64 r = 0; r < rows; ++r) {
    double ss = 0;
    for (i64 c = 0; c < cols; ++c) ss += static_cast<double>(x[at(r, c, cols)]) * x[at(r, c, cols)];
    const double rstd = 1.0 / std::sqrt(ss / n + eps);
    // dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * gamma, xhat = x * rstd.
    double mean_gx = 0;
    for (i64 c = 0; c < cols; ++c) {
      const double xhat = x[at(r, c, cols)] * rstd;
      mean_gx += static_cast<double>(dy[at(r, c, cols)]) * gamma[c] * xhat;
      dgamma[c] += static_cast<T>(dy[at(r, c, cols)] * xhat);
    }
    mean_gx /= n;
    for (i64 c = 0; c < cols; ++c) {
      const double xhat = x[at(r, c, cols)] * rstd;
      dx[at(r, c, cols)] += static_cast<T>(rstd * (static_cast<double>(dy[at(r, c, cols)]) * gamma[c] - xhat * mean_gx));
    }
  }
}

#define PX_INSTANTIATE(T)                                                                                                      \
  template void layernorm_forward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<T>, i64, i64, T);  \
  template void layernorm_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<T>, std::span<T>, \
                                      std::span<T>, i64, i64, T);                                                              \
  template void rmsnorm_forward<T>(std::span<const T>, std::span<const T>, std::span<T>, i64, i64, T);                        \
  template void rmsnorm_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<T>, std::span<T>,   \
                                    i64, i64, T);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
