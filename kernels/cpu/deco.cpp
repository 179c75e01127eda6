// The DECO FFN's own ops on the CPU (deco-model.md, "The DECO FFN" and "Adaptive sparsity
// regularization"): router activation and scaling, NormSiLU, expert scaling, regularizers.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/dispatch.h"

namespace decotron::cpu {

namespace {
template <class T> T silu_grad(T x) {
  T sg = sigmoid(x);
  return sg * (T(1) + x * (T(1) - sg));
}
bool uses_mean(NormSiluMode m) { return m == NormSiluMode::full || m == NormSiluMode::no_rms; }
bool uses_rms(NormSiluMode m) { return m == NormSiluMode::full || m == NormSiluMode::no_mean; }
}  // namespace

void normsilu_forward(Tensor& z, Tensor& stats, const Tensor& u, const Tensor& gamma, int64_t E, NormSiluMode mode,
                      double eps) {
  const int64_t d = gamma.numel(), n = E * d, rows = u.numel() / n;
  DT_ASSERT(u.numel() == rows * n && stats.numel() == rows * (1 + E), "normsilu shapes");
  DT_CPU_FLOAT_DISPATCH(u.dtype(), T, {
    const T* g = gamma.data<T>();
    for (int64_t t = 0; t < rows; ++t) {
      const T* ut = u.data<T>() + t * n;
      T* zt = z.data<T>() + t * n;
      T* st = stats.data<T>() + t * (1 + E);
      double mu = 0;
      if (uses_mean(mode)) {
        for (int64_t j = 0; j < n; ++j) mu += ut[j];
        mu /= n;
      }
      st[0] = static_cast<T>(mu);
      for (int64_t e = 0; e < E; ++e) {
        const T* ue = ut + e * d;
        double rs = 1;
        if (uses_rms(mode)) {
          double ss = 0;
          for (int64_t j = 0; j < d; ++j) ss += (ue[j] - mu) * (ue[j] - mu);
          rs = 1.0 / std::sqrt(ss / d + eps);
        }
        st[1 + e] = static_cast<T>(rs);
        for (int64_t j = 0; j < d; ++j) {
          T c = static_cast<T>(ue[j] - mu);
          T pre = uses_rms(mode) ? static_cast<T>(g[j] * c * rs) : c;
          zt[e * d + j] = pre * sigmoid(pre);
        }
      }
    }
  });
}

void normsilu_backward(Tensor& du, Tensor& dgamma, const Tensor& dz, const Tensor& u, const Tensor& gamma,
                       const Tensor& stats, int64_t E, NormSiluMode mode, double eps) {
  const int64_t d = gamma.numel(), n = E * d, rows = u.numel() / n;
  DT_CPU_FLOAT_DISPATCH(u.dtype(), T, {
    const T* g = gamma.data<T>();
    std::vector<T> dc(n);
    for (int64_t t = 0; t < rows; ++t) {
      const T* ut = u.data<T>() + t * n;
      const T* dzt = dz.data<T>() + t * n;
      const T* st = stats.data<T>() + t * (1 + E);
      T* dut = du.data<T>() + t * n;
      T mu = st[0];
      for (int64_t e = 0; e < E; ++e) {
        T rs = st[1 + e];
        if (!uses_rms(mode)) {
          for (int64_t j = 0; j < d; ++j) dc[e * d + j] = dzt[e * d + j] * silu_grad<T>(ut[e * d + j] - mu);
          continue;
        }
        // pre = gamma * chat, chat = c * rs.  dchat = dpre * gamma;
        // dc = rs * (dchat - chat * mean(dchat * chat)) (RMSNorm's backward within the block).
        double dot = 0;
        for (int64_t j = 0; j < d; ++j) {
          T chat = (ut[e * d + j] - mu) * rs;
          T dpre = dzt[e * d + j] * silu_grad<T>(g[j] * chat);
          dgamma.data<T>()[j] += dpre * chat;
          T dchat = dpre * g[j];
          dc[e * d + j] = dchat;
          dot += dchat * chat;
        }
        dot /= d;
        for (int64_t j = 0; j < d; ++j) {
          T chat = (ut[e * d + j] - mu) * rs;
          dc[e * d + j] = rs * (dc[e * d + j] - chat * static_cast<T>(dot));
        }
      }
      double mean_dc = 0;
      if (uses_mean(mode)) {
        for (int64_t j = 0; j < n; ++j) mean_dc += dc[j];
        mean_dc /= n;
      }
      for (int64_t j = 0; j < n; ++j) dut[j] = static_cast<T>(dc[j] - mean_dc);
    }
  });
}

void router_scale_forward(Tensor& s, const Tensor& r, const Tensor& g) {
  const int64_t E = r.dim(-1), rows = r.numel() / E, gs = g.numel() == 1 ? 0 : 1;
  DT_ASSERT(g.numel() == 1 || g.numel() == E, "router scale g ", shape_str(g.shape()));
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t e = 0; e < E; ++e) {
        T a = std::max(r.data<T>()[t * E + e], T(0));
        s.data<T>()[t * E + e] = a * g.data<T>()[e * gs];
      }
  });
}

void router_scale_backward(Tensor& dr, Tensor* dg, const Tensor& ds, const Tensor& r, const Tensor& g,
                           const Tensor* da_extra) {
  const int64_t E = r.dim(-1), rows = r.numel() / E, gs = g.numel() == 1 ? 0 : 1;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t e = 0; e < E; ++e) {
        int64_t i = t * E + e;
        T rv = r.data<T>()[i];
        T a = std::max(rv, T(0));
        if (dg) dg->data<T>()[e * gs] += ds.data<T>()[i] * a;
        T da = ds.data<T>()[i] * g.data<T>()[e * gs] + (da_extra ? da_extra->data<T>()[i] : T(0));
        dr.data<T>()[i] = rv > 0 ? da : T(0);
      }
  });
}

int64_t count_active(const Tensor& r) {
  int64_t n = 0;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t i = 0, n_ = r.numel(); i < n_; ++i) n += r.data<T>()[i] > 0;
  });
  return n;
}

int64_t count_tokens_with_active(const Tensor& r) {
  const int64_t E = r.dim(-1), rows = r.numel() / E;
  int64_t n = 0;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t t = 0; t < rows; ++t) {
      bool any = false;
      for (int64_t e = 0; e < E; ++e) any |= r.data<T>()[t * E + e] > 0;
      n += any;
    }
  });
  return n;
}

void count_active_per_expert(const Tensor& r, int64_t* counts) {
  const int64_t E = r.dim(-1), rows = r.numel() / E;
  for (int64_t e = 0; e < E; ++e) counts[e] = 0;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t e = 0; e < E; ++e) counts[e] += r.data<T>()[t * E + e] > 0;
  });
}

// The constants 1e-5 are the reference code's (deco-model.md).
double entropy_forward(const Tensor& r) {
  const int64_t E = r.dim(-1), rows = r.numel() / E;
  double total = 0;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t t = 0; t < rows; ++t) {
      const T* rt = r.data<T>() + t * E;
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::max(rt[e], T(0));
      for (int64_t e = 0; e < E; ++e) {
        double p = std::max(rt[e], T(0)) / (sum + 1e-5);
        total -= p * std::log(p + 1e-5);
      }
    }
  });
  return total;
}

void entropy_backward(Tensor& da, const Tensor& r, double coef) {
  const int64_t E = r.dim(-1), rows = r.numel() / E;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    std::vector<double> gp(E), p(E);
    for (int64_t t = 0; t < rows; ++t) {
      const T* rt = r.data<T>() + t * E;
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::max(rt[e], T(0));
      double inv = 1.0 / (sum + 1e-5), wsum = 0;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::max(rt[e], T(0)) * inv;
        gp[e] = -(std::log(p[e] + 1e-5) + p[e] / (p[e] + 1e-5));  // dH/dp_e
        wsum += gp[e] * p[e];
      }
      // dp_e/da_k = inv * (delta_ek - p_e)  =>  dH/da_k = inv * (gp_k - sum_e gp_e p_e)
      for (int64_t e = 0; e < E; ++e) da.data<T>()[t * E + e] += static_cast<T>(coef * inv * (gp[e] - wsum));
    }
  });
}

double l1_reg_forward(const Tensor& r, double target) {
  const int64_t E = r.dim(-1), rows = r.numel() / E;
  double total = 0;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t e = 0; e < E; ++e) {
      double mass = 0;
      int64_t n = 0;
      for (int64_t t = 0; t < rows; ++t) {
        T v = r.data<T>()[t * E + e];
        if (v > 0) mass += v, ++n;
      }
      total += mass * n;
    }
  });
  return total / (target * static_cast<double>(rows) * rows);
}

void routing_summary(Tensor& out, const Tensor& r) {
  const int64_t E = r.dim(-1), rows = E ? r.numel() / E : 0;
  DT_ASSERT(out.numel() == 2 * E + 2 && out.dtype() == DType::f64, "routing_summary: out ", shape_str(out.shape()),
            " ", dtype_name(out.dtype()), " should be f64 [", 2 * E + 2, "]");
  double* o = out.data<double>();
  std::vector<int64_t> counts(E);
  count_active_per_expert(r, counts.data());
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t e = 0; e < E; ++e) {
      double mass = 0;  // l1_reg_forward's sum, in its order
      for (int64_t t = 0; t < rows; ++t) {
        const T v = r.data<T>()[t * E + e];
        if (v > 0) mass += v;
      }
      o[e] = static_cast<double>(counts[e]);
      o[E + e] = mass;
    }
  });
  o[2 * E] = static_cast<double>(count_tokens_with_active(r));
  o[2 * E + 1] = entropy_forward(r);
}

void l1_reg_backward(Tensor& da, const Tensor& r, double target, double coef) {
  const int64_t E = r.dim(-1), rows = r.numel() / E;
  std::vector<int64_t> n(E);
  count_active_per_expert(r, n.data());
  double denom = target * static_cast<double>(rows) * rows;
  DT_CPU_FLOAT_DISPATCH(r.dtype(), T, {
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t e = 0; e < E; ++e) da.data<T>()[t * E + e] += static_cast<T>(coef * n[e] / denom);
  });
}

void expert_scale_forward(Tensor& y, const Tensor& z, const Tensor& s, int64_t E) {
  const int64_t n = z.dim(-1), d = n / E, rows = z.numel() / n;
  DT_CPU_FLOAT_DISPATCH(z.dtype(), T, {
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t e = 0; e < E; ++e) {
        T se = s.data<T>()[t * E + e];
        for (int64_t j = 0; j < d; ++j) y.data<T>()[t * n + e * d + j] = z.data<T>()[t * n + e * d + j] * se;
      }
  });
}

void expert_scale_backward(Tensor& dz, Tensor& ds, const Tensor& dy, const Tensor& z, const Tensor& s, int64_t E) {
  const int64_t n = z.dim(-1), d = n / E, rows = z.numel() / n;
  DT_CPU_FLOAT_DISPATCH(z.dtype(), T, {
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t e = 0; e < E; ++e) {
        T se = s.data<T>()[t * E + e];
        double acc = 0;
        for (int64_t j = 0; j < d; ++j) {
          int64_t i = t * n + e * d + j;
          acc += dy.data<T>()[i] * z.data<T>()[i];
          dz.data<T>()[i] = dy.data<T>()[i] * se;
        }
        ds.data<T>()[t * E + e] = static_cast<T>(acc);
      }
  });
}

}  // namespace decotron::cpu
