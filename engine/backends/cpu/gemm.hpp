// Dense matmuls on OpenBLAS, and the three GEMMs of a linear layer y = x w + b with w stored
// [in x out] (the plan compiler's y[m x n] = x[m x k] w[k x n]).
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

// Threads OpenBLAS may use per process. A rank is one process per core, as on GPUs one per device,
// so the engine runs single-threaded GEMMs: several ranks' thread pools on few cores thrash.
void set_gemm_threads(int threads);

// C[m x n] = alpha op(A) op(B) + beta C, row-major, leading dimensions in elements.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a, std::int64_t lda,
          const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc);

// y[m x n] = x[m x k] w[k x n] (+ bias[n] when bias is not empty).
template <class T>
void linear_forward(std::span<const T> x, std::span<const T> w, std::span<const T> bias, std::span<T> y, std::int64_t m,
                    std::int64_t n, std::int64_t k);

// dx[m x k] = dy[m x n] w^T, or dx += dy w^T when `accumulate`.
template <class T>
void linear_backward_input(std::span<const T> dy, std::span<const T> w, std::span<T> dx, std::int64_t m, std::int64_t n,
                           std::int64_t k, bool accumulate = false);

// dw[k x n] += x^T dy; dbias[n] += column sums of dy (skipped when dbias is empty).
template <class T>
void linear_backward_weight(std::span<const T> x, std::span<const T> dy, std::span<T> dw, std::span<T> dbias, std::int64_t m,
                            std::int64_t n, std::int64_t k);

}  // namespace px::cpu
