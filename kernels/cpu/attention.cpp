// Causal grouped-query attention on the CPU, flash-style in what it keeps: the forward stores
// only the log-sum-exp of each query row and the backward recomputes the probabilities from
// it. Per (batch, head) the work is three GEMMs forward and five backward through OpenBLAS on
// strided views of the [B, S, heads, D] layout; the causal mask zeroes the upper triangle.
// tests/test_op_gradients.cpp checks it against a loop-by-loop reference and finite differences.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/blas.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/dispatch.h"

namespace decotron::cpu {

namespace {

// P = softmax(scale * Q K^T) with the causal mask, for one (b, h): rows i, columns j <= i.
// When lse_out is set, writes each row's log-sum-exp; otherwise uses lse_in to rebuild P.
template <class T>
void causal_probs(T* P, const T* q, const T* k, int64_t S, int64_t D, int64_t ldq, int64_t ldk, T scale,
                  T* lse_out, const T* lse_in) {
  gemm(false, true, S, S, D, q, ldq, k, ldk, T(0), P, S, scale);
  for (int64_t i = 0; i < S; ++i) {
    T* row = P + i * S;
    if (lse_out) {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j <= i; ++j) m = std::max(m, row[j]);
      double sum = 0;
      for (int64_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - m));
      T inv = static_cast<T>(1.0 / sum);
      for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
      lse_out[i] = static_cast<T>(m + std::log(sum));
    } else {
      for (int64_t j = 0; j <= i; ++j) row[j] = std::exp(row[j] - lse_in[i]);
    }
    std::fill(row + i + 1, row + S, T(0));
  }
}

}  // namespace

void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const AttnShape& s) {
  const int64_t B = s.batch, S = s.seq, H = s.heads, G = s.kv_heads, D = s.head_dim, group = H / G;
  DT_ASSERT(H % G == 0 && q.numel() == B * S * H * D && k.numel() == B * S * G * D, "attention shapes");
  DT_CPU_FLOAT_DISPATCH(q.dtype(), T, {
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
    std::vector<T> P(S * S);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / group;
        const T* qb = q.data<T>() + (b * S * H + h) * D;
        const T* kb = k.data<T>() + (b * S * G + g) * D;
        const T* vb = v.data<T>() + (b * S * G + g) * D;
        T* ob = out.data<T>() + (b * S * H + h) * D;
        causal_probs(P.data(), qb, kb, S, D, H * D, G * D, scale, lse.data<T>() + (b * H + h) * S, static_cast<const T*>(nullptr));
        gemm(false, false, S, D, S, P.data(), S, vb, G * D, T(0), ob, H * D);  // O = P V
      }
  });
}

void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnShape& s) {
  const int64_t B = s.batch, S = s.seq, H = s.heads, G = s.kv_heads, D = s.head_dim, group = H / G;
  dk.zero_();
  dv.zero_();
  DT_CPU_FLOAT_DISPATCH(q.dtype(), T, {
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
    std::vector<T> P(S * S), dP(S * S);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / group, lq = H * D, lk = G * D;
        const T* qb = q.data<T>() + (b * S * H + h) * D;
        const T* kb = k.data<T>() + (b * S * G + g) * D;
        const T* vb = v.data<T>() + (b * S * G + g) * D;
        const T* ob = out.data<T>() + (b * S * H + h) * D;
        const T* dob = dout.data<T>() + (b * S * H + h) * D;
        T* dqb = dq.data<T>() + (b * S * H + h) * D;
        T* dkb = dk.data<T>() + (b * S * G + g) * D;
        T* dvb = dv.data<T>() + (b * S * G + g) * D;
        causal_probs(P.data(), qb, kb, S, D, lq, lk, scale, static_cast<T*>(nullptr),
                     lse.data<T>() + (b * H + h) * S);
        gemm(true, false, S, D, S, P.data(), S, dob, lq, T(1), dvb, lk);        // dV += P^T dO
        gemm(false, true, S, S, D, dob, lq, vb, lk, T(0), dP.data(), S);        // dP = dO V^T
        for (int64_t i = 0; i < S; ++i) {
          T delta = 0;  // sum_j P_ij dP_ij = dO_i . O_i
          for (int64_t d = 0; d < D; ++d) delta += dob[i * lq + d] * ob[i * lq + d];
          for (int64_t j = 0; j <= i; ++j) dP[i * S + j] = P[i * S + j] * (dP[i * S + j] - delta);
          std::fill(dP.begin() + i * S + i + 1, dP.begin() + (i + 1) * S, T(0));
        }
        gemm(false, false, S, D, S, dP.data(), S, kb, lk, T(0), dqb, lq, scale);  // dQ = scale dS K
        gemm(true, false, S, D, S, dP.data(), S, qb, lq, T(1), dkb, lk, scale);   // dK += scale dS^T Q
      }
  });
}

}  // namespace decotron::cpu
