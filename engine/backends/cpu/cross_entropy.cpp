// Vocabulary-parallel softmax cross-entropy: local partial statistics, loss, and gradient.
#include "engine/backends/cpu/cross_entropy.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

namespace px::cpu {
namespace {
using i64 = std::int64_t;
inline std::size_t at(i64 r, i64 c, i64 cols) { return static_cast<std::size_t>(r * cols + c); }
}  // namespace

template <class T>
void cross_entropy_row_max(std::span<const T> logits, std::span<T> row_max, i64 rows, i64 cols) {
  assert(static_cast<i64>(logits.size()) >= rows * cols && static_cast<i64>(row_max.size()) >= rows);
  for (i64 r = 0; r < rows; ++r) {
    T m = -std::numeric_limits<T>::infinity();
    for (i64 c = 0; c < cols; ++c) m = std::max(m, logits[at(r, c, cols)]);
    row_max[static_cast<std::size_t>(r)] = m;
  }
}

template <class T>
void cross_entropy_partials(std::span<const T> logits, std::span<const std::int32_t> targets, i64 vocab_begin,
                            std::span<const T> row_max, std::span<T> sum_exp, std::span<T> target_logit, i64 rows, i64 cols) {
  for (i64 r = 0; r < rows; ++r) {
    const auto ri = static_cast<std::size_t>(r);
    double s = 0;
    for (i64 c = 0; c < cols; ++c) s += std::exp(static_cast<double>(logits[at(r, c, cols)]) - row_max[ri]);
    sum_exp[ri] = static_cast<T>(s);
    const i64 t = targets[ri] - vocab_begin;
    target_logit[ri] = t >= 0 && t < cols ? logits[at(r, t, cols)] : T(0);
  }
}

template <class T>
void cross_entropy_loss(std::span<const T> row_max, std::span<const T> sum_exp, std::span<const T> target_logit, std::span<T> loss) {
  for (std::size_t r = 0; r < loss.size(); ++r)
    loss[r] = static_cast<T>(std::log(static_cast<double>(sum_exp[r])) + row_max[r] - target_logit[r]);
}

template <class T>
void cross_entropy_backward(std::span<const T> logits, std::span<const std::int32_t> targets, i64 vocab_begin,
                            std::span<const T> row_max, std::span<const T> sum_exp, std::span<const T> dloss, std::span<T> dlogits,
                            i64 rows, i64 cols) {
  for (i64 r = 0; r < rows; ++r) {
    const auto ri = static_cast<std::size_t>(r);
    const i64 t = targets[ri] - vocab_begin;
    for (i64 c = 0; c < cols; ++c) {
      const double p = std::exp(static_cast<double>(logits[at(r, c, cols)]) - row_max[ri]) / sum_exp[ri];
      dlogits[at(r, c, cols)] = static_cast<T>((p - (c == t ? 1.0 : 0.0)) * dloss[ri]);
    }
  }
}

#define PX_INSTANTIATE(T)                                                                                                     \
  template void cross_entropy_row_max<T>(std::span<const T>, std::span<T>, i64, i64);                                        \
  template void cross_entropy_partials<T>(std::span<const T>, std::span<const std::int32_t>, i64, std::span<const T>,        \
                                          std::span<T>, std::span<T>, i64, i64);                                             \
  template void cross_entropy_loss<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<T>);             \
  template void cross_entropy_backward<T>(std::span<const T>, std::span<const std::int32_t>, i64, std::span<const T>,        \
                                          std::span<const T>, std::span<const T>, std::span<T>, i64, i64);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
