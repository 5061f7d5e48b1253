// LayerNorm and RMSNorm over the last dimension of [rows x cols], forward and backward. The
// backward recomputes each row's statistics from x (one pass over a row is cheaper than keeping
// them), and adds the input gradient into dx: the residual stream's gradient is already there.
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

// y = (x - mean) / sqrt(var + eps) * gamma + beta.
template <class T>
void layernorm_forward(std::span<const T> x, std::span<const T> gamma, std::span<const T> beta, std::span<T> y, std::int64_t rows,
                       std::int64_t cols, T eps);
// dx += d/dx; dgamma += and dbeta += their gradients.
template <class T>
void layernorm_backward(std::span<const T> dy, std::span<const T> x, std::span<const T> gamma, std::span<T> dx,
                        std::span<T> dgamma, std::span<T> dbeta, std::int64_t rows, std::int64_t cols, T eps);

// y = x / sqrt(mean(x^2) + eps) * gamma.
template <class T>
void rmsnorm_forward(std::span<const T> x, std::span<const T> gamma, std::span<T> y, std::int64_t rows, std::int64_t cols, T eps);
template <class T>
void rmsnorm_backward(std::span<const T> dy, std::span<const T> x, std::span<const T> gamma, std::span<T> dx, std::span<T> dgamma,
                      std::int64_t rows, std::int64_t cols, T eps);

}  // namespace px::cpu
