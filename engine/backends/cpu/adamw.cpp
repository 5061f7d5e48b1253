// AdamW update and gradient-norm clipping.
#include "engine/backends/cpu/adamw.hpp"

#include <cassert>
#include <cmath>

namespace px::cpu {

template <class T>
double sum_of_squares(std::span<const T> g) {
  double s = 0;
  for (T x : g) s += static_cast<double>(x) * x;
  return s;
}

double clip_coefficient(double global_norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  const double c = max_norm / (global_norm + 1e-6);
  return c < 1.0 ? c : 1.0;
}

template <class T>
void adamw_step(std::span<T> param, std::span<const T> grad, std::span<T> m, std::span<T> v, const AdamWConfig& cfg,
                std::int64_t step, double grad_scale) {
  assert(step >= 1 && grad.size() >= param.size() && m.size() >= param.size() && v.size() >= param.size());
  const double bc1 = 1.0 - std::pow(cfg.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(cfg.beta2, static_cast<double>(step));
  for (std::size_t i = 0; i < param.size(); ++i) {
    const double g = grad[i] * grad_scale;
    const double mi = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
    const double vi = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    double p = param[i];
    p -= cfg.lr * cfg.weight_decay * p;
    p -= cfg.lr * (mi / bc1) / (std::sqrt(vi / bc2) + cfg.eps);
    param[i] = static_cast<T>(p);
  }
}

#define PX_INSTANTIATE(T)                                                                                  \
  template double sum_of_squares<T>(std::span<const T>);                                                  \
  template void adamw_step<T>(std::span<T>, std::span<const T>, std::span<T>, std::span<T>, const AdamWConfig&, \
                              std::int64_t, double);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
