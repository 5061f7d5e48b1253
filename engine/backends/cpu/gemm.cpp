// Linear-layer GEMMs on OpenBLAS (cblas), single and double precision.
#include "engine/backends/cpu/gemm.hpp"

#include <cassert>
#include <cblas.h>

namespace px::cpu {
namespace {

void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n, blasint k, float alpha, const float* a, blasint lda,
               const float* b, blasint ldb, float beta, float* c, blasint ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n, blasint k, double alpha, const double* a,
               blasint lda, const double* b, blasint ldb, double beta, double* c, blasint ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

blasint to_blas(std::int64_t v) { return static_cast<blasint>(v); }

}  // namespace

void set_gemm_threads(int threads) { openblas_set_num_threads(threads); }

template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a, std::int64_t lda,
          const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves C untouched then only when beta == 1; make it exact for any beta
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  blas_gemm(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, to_blas(m), to_blas(n), to_blas(k), alpha, a,
            to_blas(lda), b, to_blas(ldb), beta, c, to_blas(ldc));
}

template <class T>
void linear_forward(std::span<const T> x, std::span<const T> w, std::span<const T> bias, std::span<T> y, std::int64_t m,
                    std::int64_t n, std::int64_t k) {
  assert(static_cast<std::int64_t>(x.size()) >= m * k && static_cast<std::int64_t>(w.size()) >= k * n);
  assert(static_cast<std::int64_t>(y.size()) >= m * n && (bias.empty() || static_cast<std::int64_t>(bias.size()) >= n));
  T beta = T(0);
  if (!bias.empty()) {
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) y[static_cast<std::size_t>(i * n + j)] = bias[static_cast<std::size_t>(j)];
    beta = T(1);
  }
  gemm<T>(false, false, m, n, k, T(1), x.data(), k, w.data(), n, beta, y.data(), n);
}

template <class T>
void linear_backward_input(std::span<const T> dy, std::span<const T> w, std::span<T> dx, std::int64_t m, std::int64_t n,
                           std::int64_t k, bool accumulate) {
  assert(static_cast<std::int64_t>(dy.size()) >= m * n && static_cast<std::int64_t>(dx.size()) >= m * k);
  gemm<T>(false, true, m, k, n, T(1), dy.data(), n, w.data(), n, accumulate ? T(1) : T(0), dx.data(), k);
}

template <class T>
void linear_backward_weight(std::span<const T> x, std::span<const T> dy, std::span<T> dw, std::span<T> dbias, std::int64_t m,
                            std::int64_t n, std::int64_t k) {
  assert(static_cast<std::int64_t>(dw.size()) >= k * n);
  gemm<T>(true, false, k, n, m, T(1), x.data(), k, dy.data(), n, T(1), dw.data(), n);
  if (dbias.empty()) return;
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) dbias[static_cast<std::size_t>(j)] += dy[static_cast<std::size_t>(i * n + j)];
}

#define PX_INSTANTIATE(T)                                                                                                   \
  template void gemm<T>(bool, bool, std::int64_t, std::int64_t, std::int64_t, T, const T*, std::int64_t, const T*,       \
                        std::int64_t, T, T*, std::int64_t);                                                                 \
  template void linear_forward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<T>, std::int64_t, \
                                  std::int64_t, std::int64_t);                                                              \
  template void linear_backward_input<T>(std::span<const T>, std::span<const T>, std::span<T>, std::int64_t, std::int64_t, \
                                         std::int64_t, bool);                                                               \
  template void linear_backward_weight<T>(std::span<const T>, std::span<const T>, std::span<T>, std::span<T>, std::int64_t, \
                                          std::int64_t, std::int64_t);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
