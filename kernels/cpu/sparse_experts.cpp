// DECO's routed experts on the CPU, computed on active (token, expert) pairs only.
// Cost ~ rho x the dense-masked path, plus O(E d h) per call for w_bar and the rank-one
// gradient of the mean (deco-model.md, "Identities that make sparse computation exact").
//
// Per expert e with active tokens t_1 < ... < t_n (gathered rows X_e):
//   pre_e = X_e W_pre_e^T                     [n, d]   (W_pre_e = rows e*d .. e*d+d-1)
//   c     = pre_e - mu_t,  mu_t = x_t . w_bar  (the mean over all E*d entries, exactly)
//   z     = SiLU(gamma * c * rs)  (or the ablation's variant), rs = 1/sqrt(mean(c^2) + eps)
//   y     = s_te * z  (* up_e when gated)
//   out[t] += y W_down_e^T                    (W_down_e = columns e*d .. e*d+d-1)
// Backward: per expert the transposed GEMMs on the same rows; the mean step gives every token
// g_t = sum of dc over its active blocks, and then dx_t -= g_t w_bar and every row of W_pre
// receives -(1/(E d)) sum_t g_t x_t, inactive experts' rows included.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/blas.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/dispatch.h"

namespace decotron::cpu {

namespace {

bool uses_mean(NormSiluMode m) { return m == NormSiluMode::full || m == NormSiluMode::no_rms; }
bool uses_rms(NormSiluMode m) { return m == NormSiluMode::full || m == NormSiluMode::no_mean; }
template <class T> T sig(T v) { return T(1) / (T(1) + std::exp(-v)); }

template <class T>
void gather_rows(T* dst, const T* src, const int32_t* rows, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; ++i) std::copy_n(src + static_cast<int64_t>(rows[i]) * h, h, dst + i * h);
}

template <class T>
void scatter_add_rows(T* dst, const T* src, const int32_t* rows, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; ++i) {
    T* d = dst + static_cast<int64_t>(rows[i]) * h;
    for (int64_t j = 0; j < h; ++j) d[j] += src[i * h + j];
  }
}

}  // namespace

void sparse_experts_forward(Tensor& out, SparseExperts& c, const Tensor& x, const Tensor& r, const Tensor& s,
                            const Tensor& w_pre, const Tensor* w_up_gated, const Tensor& gamma, const Tensor& w_down,
                            NormSiluMode mode, double eps) {
  const int64_t T = r.dim(0), E = r.dim(1), h = x.dim(-1), d = gamma.numel(), n_all = E * d;
  DT_ASSERT(w_pre.dim(0) == n_all && w_pre.dim(1) == h && w_down.dim(1) == n_all, "sparse experts shapes");
  // Active pairs grouped by expert (CSR), tokens ascending within an expert.
  c.offsets = Tensor::empty({E + 1}, DType::i32);
  int32_t* off = c.offsets.data<int32_t>();
  std::vector<int32_t> pairs;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T_, {
    const T_* rp = r.data<T_>();
    for (int64_t e = 0; e < E; ++e) {
      off[e] = static_cast<int32_t>(pairs.size());
      for (int64_t t = 0; t < T; ++t)
        if (rp[t * E + e] > 0) pairs.push_back(static_cast<int32_t>(t));
    }
  });
  off[E] = static_cast<int32_t>(pairs.size());
  const int64_t P = static_cast<int64_t>(pairs.size());
  c.tokens = Tensor::empty({P}, DType::i32);
  std::copy(pairs.begin(), pairs.end(), c.tokens.data<int32_t>());
  const DType dt = x.dtype();
  c.pre = Tensor::empty({P, d}, dt);
  c.up = w_up_gated ? Tensor::empty({P, d}, dt) : Tensor();
  c.rs = Tensor::empty({P}, dt);
  c.y = Tensor::empty({P, d}, dt);
  c.mu = Tensor::zeros({T}, dt);
  c.w_bar = Tensor::zeros({h}, dt);
  out.zero_();
  DT_CPU_FLOAT_DISPATCH(dt, V, {
    V* wbar = c.w_bar.data<V>();
    const V* wp = w_pre.data<V>();
    for (int64_t j = 0; j < n_all; ++j)
      for (int64_t k = 0; k < h; ++k) wbar[k] += wp[j * h + k];
    for (int64_t k = 0; k < h; ++k) wbar[k] /= static_cast<V>(n_all);
    if (uses_mean(mode)) gemm(false, false, T, 1, h, x.data<V>(), h, wbar, 1, V(0), c.mu.data<V>(), 1);
    const V* g = gamma.data<V>();
    std::vector<V> xe;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = off[e + 1] - off[e];
      if (n == 0) continue;
      const int32_t* tok = c.tokens.data<int32_t>() + off[e];
      xe.resize(n * h);
      gather_rows(xe.data(), x.data<V>(), tok, n, h);
      V* pre = c.pre.data<V>() + off[e] * d;
      gemm(false, true, n, d, h, xe.data(), h, wp + e * d * h, h, V(0), pre, d);
      V* up = w_up_gated ? c.up.data<V>() + off[e] * d : nullptr;
      if (up) gemm(false, true, n, d, h, xe.data(), h, w_up_gated->data<V>() + e * d * h, h, V(0), up, d);
      V* y = c.y.data<V>() + off[e] * d;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = tok[i];
        const V mu = c.mu.data<V>()[t];
        double rs = 1;
        if (uses_rms(mode)) {
          double ss = 0;
          for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(pre[i * d + j] - mu) * (pre[i * d + j] - mu);
          rs = 1.0 / std::sqrt(ss / d + eps);
        }
        c.rs.data<V>()[off[e] + i] = static_cast<V>(rs);
        const V se = s.data<V>()[t * E + e];
        for (int64_t j = 0; j < d; ++j) {
          V cval = pre[i * d + j] - mu;
          V p = uses_rms(mode) ? static_cast<V>(g[j] * cval * rs) : cval;
          V z = p * sig(p);
          if (up) z *= up[i * d + j];
          y[i * d + j] = se * z;
        }
      }
      // out[tok] += y W_down_e^T, W_down_e = columns [e*d, e*d+d) of W_down [h, E*d]
      xe.resize(n * h);
      gemm(false, true, n, h, d, y, d, w_down.data<V>() + e * d, n_all, V(0), xe.data(), h);
      scatter_add_rows(out.data<V>(), xe.data(), tok, n, h);
    }
  });
}

void sparse_experts_backward(Tensor& dx, Tensor& ds, Tensor& dw_pre, Tensor* dw_up_gated, Tensor& dgamma,
                             Tensor& dw_down, const Tensor& dout, const SparseExperts& c, const Tensor& x,
                             const Tensor& s, const Tensor& w_pre, const Tensor* w_up_gated, const Tensor& gamma,
                             const Tensor& w_down, NormSiluMode mode, double eps) {
  const int64_t T = s.dim(0), E = s.dim(1), h = x.dim(-1), d = gamma.numel(), n_all = E * d;
  const int32_t* off = c.offsets.data<int32_t>();
  ds.zero_();
  DT_CPU_FLOAT_DISPATCH(x.dtype(), V, {
    const V* g = gamma.data<V>();
    std::vector<double> gmean(T, 0.0);  // g_t: the gradient reaching NormSiLU's mean
    std::vector<V> xe, doe, dy, dpre, dup, dxe;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = off[e + 1] - off[e];
      if (n == 0) continue;
      const int32_t* tok = c.tokens.data<int32_t>() + off[e];
      const V* pre = c.pre.data<V>() + off[e] * d;
      const V* up = w_up_gated ? c.up.data<V>() + off[e] * d : nullptr;
      const V* y = c.y.data<V>() + off[e] * d;
      xe.resize(n * h), doe.resize(n * h), dy.resize(n * d), dpre.resize(n * d), dxe.resize(n * h);
      gather_rows(xe.data(), x.data<V>(), tok, n, h);
      gather_rows(doe.data(), dout.data<V>(), tok, n, h);
      // dY = dOut_e W_down_e; dW_down_e += dOut_e^T Y
      gemm(false, false, n, d, h, doe.data(), h, w_down.data<V>() + e * d, n_all, V(0), dy.data(), d);
      gemm(true, false, h, d, n, doe.data(), h, y, d, V(1), dw_down.data<V>() + e * d, n_all);
      if (up) dup.resize(n * d);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = tok[i];
        const V mu = c.mu.data<V>()[t], rs = c.rs.data<V>()[off[e] + i], se = s.data<V>()[t * E + e];
        double dsum = 0, dot = 0;
        for (int64_t j = 0; j < d; ++j) {
          const V cval = pre[i * d + j] - mu;
          const V chat = cval * rs;
          const V p = uses_rms(mode) ? g[j] * chat : cval;
          const V sg = sig(p), act = p * sg;
          const V z = up ? act * up[i * d + j] : act;
          dsum += static_cast<double>(dy[i * d + j]) * z;
          V dz = dy[i * d + j] * se;
          V dact = up ? dz * up[i * d + j] : dz;
          if (up) dup[i * d + j] = dz * act;
          V dp = dact * sg * (V(1) + p * (V(1) - sg));
          if (uses_rms(mode)) {
            dgamma.data<V>()[j] += dp * chat;
            dpre[i * d + j] = dp * g[j];  // d chat, turned into d c below
            dot += static_cast<double>(dpre[i * d + j]) * chat;
          } else {
            dpre[i * d + j] = dp;
          }
        }
        ds.data<V>()[t * E + e] = static_cast<V>(dsum);
        if (uses_rms(mode)) {
          const V m = static_cast<V>(dot / d);
          for (int64_t j = 0; j < d; ++j) {
            const V chat = (pre[i * d + j] - mu) * rs;
            dpre[i * d + j] = rs * (dpre[i * d + j] - chat * m);
          }
        }
        if (uses_mean(mode))
          for (int64_t j = 0; j < d; ++j) gmean[t] += dpre[i * d + j];
      }
      // The active part: dW_pre_e += dc^T X_e, dx += dc W_pre_e (the mean correction comes after).
      gemm(true, false, d, h, n, dpre.data(), d, xe.data(), h, V(1), dw_pre.data<V>() + e * d * h, h);
      gemm(false, false, n, h, d, dpre.data(), d, w_pre.data<V>() + e * d * h, h, V(0), dxe.data(), h);
      if (up) {
        gemm(true, false, d, h, n, dup.data(), d, xe.data(), h, V(1), dw_up_gated->data<V>() + e * d * h, h);
        gemm(false, false, n, h, d, dup.data(), d, w_up_gated->data<V>() + e * d * h, h, V(1), dxe.data(), h);
      }
      scatter_add_rows(dx.data<V>(), dxe.data(), tok, n, h);
    }
    if (uses_mean(mode)) {
      // du = dc - g_t / (E d) on every entry: dx_t -= g_t w_bar; every row j of W_pre gets
      // -(1/(E d)) sum_t g_t x_t (the rank-one term, inactive experts' rows included).
      std::vector<V> gx(h, V(0));
      const V* wbar = c.w_bar.data<V>();
      for (int64_t t = 0; t < T; ++t) {
        if (gmean[t] == 0) continue;
        const V gt = static_cast<V>(gmean[t]);
        V* dxt = dx.data<V>() + t * h;
        const V* xt = x.data<V>() + t * h;
        for (int64_t k = 0; k < h; ++k) {
          dxt[k] -= gt * wbar[k];
          gx[k] += gt * xt[k];
        }
      }
      const V scale = V(1) / static_cast<V>(n_all);
      V* dw = dw_pre.data<V>();
      for (int64_t j = 0; j < n_all; ++j)
        for (int64_t k = 0; k < h; ++k) dw[j * h + k] -= scale * gx[k];
    }
  });
}

}  // namespace decotron::cpu
