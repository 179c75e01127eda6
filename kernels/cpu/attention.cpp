// Causal grouped-query attention on the CPU, flash-style: the forward keeps only the
// log-sum-exp of each query row, and the backward recomputes the probabilities from it.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/dispatch.h"

namespace decotron::cpu {

namespace {
template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
}  // namespace

void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const AttnShape& s) {
  const int64_t B = s.batch, S = s.seq, H = s.heads, G = s.kv_heads, D = s.head_dim, group = H / G;
  DT_ASSERT(H % G == 0 && q.numel() == B * S * H * D && k.numel() == B * S * G * D, "attention shapes");
  DT_CPU_FLOAT_DISPATCH(q.dtype(), T, {
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    std::vector<double> p(S);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        int64_t g = h / group;
        for (int64_t i = 0; i < S; ++i) {
          const T* qi = q.data<T>() + ((b * S + i) * H + h) * D;
          double m = -std::numeric_limits<double>::infinity();
          for (int64_t j = 0; j <= i; ++j) {
            p[j] = scale * dot(qi, k.data<T>() + ((b * S + j) * G + g) * D, D);
            m = std::max(m, p[j]);
          }
          double sum = 0;
          for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - m));
          lse.data<T>()[(b * H + h) * S + i] = static_cast<T>(m + std::log(sum));
          T* oi = out.data<T>() + ((b * S + i) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) {
            double acc = 0;
            for (int64_t j = 0; j <= i; ++j) acc += p[j] * v.data<T>()[((b * S + j) * G + g) * D + d];
            oi[d] = static_cast<T>(acc / sum);
          }
        }
      }
  });
}

void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnShape& s) {
  const int64_t B = s.batch, S = s.seq, H = s.heads, G = s.kv_heads, D = s.head_dim, group = H / G;
  dq.zero_();
  dk.zero_();
  dv.zero_();
  DT_CPU_FLOAT_DISPATCH(q.dtype(), T, {
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        int64_t g = h / group;
        for (int64_t i = 0; i < S; ++i) {
          int64_t qo = ((b * S + i) * H + h) * D;
          const T* qi = q.data<T>() + qo;
          const T* doi = dout.data<T>() + qo;
          T* dqi = dq.data<T>() + qo;
          T delta = dot(doi, out.data<T>() + qo, D);  // sum_j p_ij dp_ij
          T l = lse.data<T>()[(b * H + h) * S + i];
          for (int64_t j = 0; j <= i; ++j) {
            int64_t ko = ((b * S + j) * G + g) * D;
            const T* kj = k.data<T>() + ko;
            const T* vj = v.data<T>() + ko;
            T p = std::exp(scale * dot(qi, kj, D) - l);
            T dp = dot(doi, vj, D);
            T ds = p * (dp - delta) * scale;
            T* dkj = dk.data<T>() + ko;
            T* dvj = dv.data<T>() + ko;
            for (int64_t d = 0; d < D; ++d) {
              dvj[d] += p * doi[d];
              dqi[d] += ds * kj[d];
              dkj[d] += ds * qi[d];
            }
          }
        }
      }
  });
}

}  // namespace decotron::cpu
