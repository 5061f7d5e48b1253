// AdamW (Loshchilov & Hutter 2019) with bias correction and decoupled weight decay, as
// torch.optim.AdamW computes it, and global-norm gradient clipping as torch.nn.utils.
// clip_grad_norm_ does: the caller sums squared norms over every rank holding part of the
// gradients, then scales each gradient by clip_coefficient before the step.
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

struct AdamWConfig {
  double lr = 3e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

// Sum of squares, accumulated in double.
template <class T>
double sum_of_squares(std::span<const T> g);

// min(1, max_norm / (norm + 1e-6)); max_norm <= 0 means no clipping.
double clip_coefficient(double global_norm, double max_norm);

// One step on a (shard of a) parameter: step counts from 1; grad is scaled by grad_scale first.
template <class T>
void adamw_step(std::span<T> param, std::span<const T> grad, std::span<T> m, std::span<T> v, const AdamWConfig& cfg,
                std::int64_t step, double grad_scale);

}  // namespace px::cpu
