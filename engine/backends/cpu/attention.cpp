// Causal attention on CPU, one query row at a time: the row's scores against the visible keys of
// the block, never an sq x sk matrix. The backward recomputes the probabilities from lse
// (flash-attention style), which is what makes per-block backward passes sum to the exact one.
#include "engine/backends/cpu/attention.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <vector>

namespace px::cpu {
namespace {

template <typename T>
T dot(const T* a, const T* b, std::int64_t n) {
  T s = 0;
  for (std::int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

template <typename T>
bool covers(std::span<T> m, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  return rows == 0 || (ld >= cols && std::ssize(m) >= (rows - 1) * ld + cols);
}

template <typename T>
bool fits(const AttentionShape& sh, const QkvView<T>& x) {
  return sh.b > 0 && sh.d > 0 && sh.groups > 0 && sh.heads % sh.groups == 0 && sh.sq >= 0 && sh.sk >= 0 &&
         covers(x.q, sh.sq * sh.b, sh.heads * sh.d, x.ldq) && covers(x.k, sh.sk * sh.b, sh.groups * sh.d, x.ldk) &&
         covers(x.v, sh.sk * sh.b, sh.groups * sh.d, x.ldv);
}

// Keys 0 .. visible-1 of the block are at or before query i: a prefix, since positions ascend.
std::int64_t visible(const AttentionShape& sh, std::int64_t i) {
  return std::clamp<std::int64_t>(sh.q_pos0 + i - sh.k_pos0 + 1, 0, sh.sk);
}

}  // namespace

template <typename T>
void attention_forward(const AttentionShape& sh, const QkvView<const T>& x, std::span<T> out, std::span<T> lse,
                       bool first) {
  const std::int64_t b = sh.b, d = sh.d, hd = sh.heads * d, per_group = sh.heads / sh.groups;
  assert(fits(sh, x) && std::ssize(out) == sh.sq * b * hd && std::ssize(lse) == b * sh.heads * sh.sq);
  const T scale = T(1) / std::sqrt(T(d)), neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> score(sh.sk);
  for (std::int64_t j = 0; j < b; ++j)
    for (std::int64_t h = 0; h < sh.heads; ++h) {
      const std::int64_t kc = h / per_group * d;
      for (std::int64_t i = 0; i < sh.sq; ++i) {
        const T* qi = x.q.data() + (i * b + j) * x.ldq + h * d;
        T* oi = out.data() + (i * b + j) * hd + h * d;
        T& li = lse[(j * sh.heads + h) * sh.sq + i];
        const std::int64_t n = visible(sh, i);
        if (first) {
          std::fill(oi, oi + d, T(0));
          li = neg_inf;
        }
        if (n == 0) continue;
        // The blocks folded in so far weigh in as one more key, with score lse and value out.
        T m = li;
        for (std::int64_t t = 0; t < n; ++t) {
          score[t] = scale * dot(qi, x.k.data() + (t * b + j) * x.ldk + kc, d);
          m = std::max(m, score[t]);
        }
        T sum = std::exp(li - m);
        for (std::int64_t c = 0; c < d; ++c) oi[c] *= sum;
        for (std::int64_t t = 0; t < n; ++t) {
          const T w = std::exp(score[t] - m);
          const T* vt = x.v.data() + (t * b + j) * x.ldv + kc;
          sum += w;
          for (std::int64_t c = 0; c < d; ++c) oi[c] += w * vt[c];
        }
        for (std::int64_t c = 0; c < d; ++c) oi[c] /= sum;
        li = m + std::log(sum);
      }
    }
}

template <typename T>
void attention_backward(const AttentionShape& sh, const QkvView<const T>& x, std::span<const T> out,
                        std::span<const T> lse, std::span<const T> dout, const QkvView<T>& dx) {
  const std::int64_t b = sh.b, d = sh.d, hd = sh.heads * d, per_group = sh.heads / sh.groups;
  assert(fits(sh, x) && fits(sh, dx) && std::ssize(out) == sh.sq * b * hd && std::ssize(dout) == sh.sq * b * hd &&
         std::ssize(lse) == b * sh.heads * sh.sq);
  const T scale = T(1) / std::sqrt(T(d));
  for (std::int64_t j = 0; j < b; ++j)
    for (std::int64_t h = 0; h < sh.heads; ++h) {
      const std::int64_t kc = h / per_group * d;
      for (std::int64_t i = 0; i < sh.sq; ++i) {
        const std::int64_t row = i * b + j, n = visible(sh, i);
        const T* qi = x.q.data() + row * x.ldq + h * d;
        const T* oi = out.data() + row * hd + h * d;
        const T* doi = dout.data() + row * hd + h * d;
        T* dqi = dx.q.data() + row * dx.ldq + h * d;
        const T li = lse[(j * sh.heads + h) * sh.sq + i];
        // dout . out is the softmax's own term, sum_t p_t (dout . v_t), over all blocks at once.
        const T di = dot(doi, oi, d);
        for (std::int64_t t = 0; t < n; ++t) {
          const std::int64_t kr = t * b + j;
          const T* kt = x.k.data() + kr * x.ldk + kc;
          const T* vt = x.v.data() + kr * x.ldv + kc;
          T* dkt = dx.k.data() + kr * dx.ldk + kc;
          T* dvt = dx.v.data() + kr * dx.ldv + kc;
          const T p = std::exp(scale * dot(qi, kt, d) - li);
          const T ds = scale * p * (dot(doi, vt, d) - di);
          for (std::int64_t c = 0; c < d; ++c) {
            dqi[c] += ds * kt[c];
            dkt[c] += ds * qi[c];
            dvt[c] += p * doi[c];
          }
        }
      }
    }
}

template void attention_forward<float>(const AttentionShape&, const QkvView<const float>&, std::span<float>,
                                       std::span<float>, bool);
template void attention_forward<double>(const AttentionShape&, const QkvView<const double>&, std::span<double>,
                                        std::span<double>, bool);
template void attention_backward<float>(const AttentionShape&, const QkvView<const float>&, std::span<const float>,
                                        std::span<const float>, std::span<const float>, const QkvView<float>&);
template void attention_backward<double>(const AttentionShape&, const QkvView<const double>&, std::span<const double>,
                                         std::span<const double>, std::span<const double>, const QkvView<double>&);

}  // namespace px::cpu
