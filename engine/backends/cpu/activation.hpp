// MLP activations, forward and backward, elementwise over [rows x cols].
// GELU is the tanh approximation GPT-2 was trained with (Hendrycks & Gimpel 2016, eq. in sec. 2).
// SwiGLU (Shazeer 2020) reads rows of [gate (cols) | up (cols)], Megatron's chunk order, so a
// tensor-parallel shard of fc1 holds its slice of both halves.
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

template <class T>
void gelu_forward(std::span<const T> x, std::span<T> y);
// dx = dy * gelu'(x).
template <class T>
void gelu_backward(std::span<const T> dy, std::span<const T> x, std::span<T> dx);

// y[rows x cols] = silu(x_gate) * x_up with x = [rows x 2 cols].
template <class T>
void swiglu_forward(std::span<const T> x, std::span<T> y, std::int64_t rows, std::int64_t cols);
// dx[rows x 2 cols] from dy[rows x cols].
template <class T>
void swiglu_backward(std::span<const T> dy, std::span<const T> x, std::span<T> dx, std::int64_t rows, std::int64_t cols);

}  // namespace px::cpu
