// DECO's routed experts on the CPU, on (token, expert) pairs: the reference of the sparse path.
// Cost ~ rho x the dense-masked path (deco-model.md, "Identities that make sparse computation
// exact"); model/expert_dispatch.cpp composes these with the gather, the scatter and, under
// expert parallelism, the all-to-all.
//
// Per local expert e with pairs p_1 .. p_n (X_e: their rows of x_rows, gathered through index):
//   pre_e = X_e W_pre_e^T                     [n, d]   (W_pre_e = rows e*d .. e*d+d-1)
//   c     = pre_e - mu_p,  mu_p = x_p . w_bar  (the mean over all E*d entries, exactly; given)
//   z     = SiLU(gamma * c * rs)  (or the ablation's variant), rs = 1/sqrt(mean(c^2) + eps)
//   y     = s_p * z  (* up_e when gated)
//   outp  = y W_down_e^T                      (W_down_e = columns e*d .. e*d+d-1)
// Backward: per expert the transposed GEMMs on the same rows. The mean step gives each pair
// g_p = sum of dc over its block: dx_p -= g_p w_bar, and every row of W_pre (inactive experts'
// included, on every rank) receives -(1/(E d)) sum_p g_p x_p. Both are linear in g_p and the same
// for every pair of a token, so the caller applies them per token (T x h, not P x h): the kernel
// returns g_p.
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

void check_offsets(const std::vector<int64_t>& off, int64_t P, int64_t d, const Tensor& w_pre, const Tensor& w_down) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  DT_ASSERT(E >= 1 && off.front() == 0 && off.back() == P, "grouped experts: offsets do not cover the ", P, " pairs");
  DT_ASSERT(w_pre.dim(0) == E * d && w_down.dim(1) == E * d, "grouped experts: ", E, " experts of width ", d,
            " but W_pre has ", w_pre.dim(0), " rows and W_down ", w_down.dim(1), " columns");
}

}  // namespace

void route_pairs(RoutedPairs& pairs, const Tensor& r, int64_t e_begin, int64_t e_end, bool all_pairs) {
  const int64_t T = r.dim(0), E = r.dim(1);
  DT_ASSERT(0 <= e_begin && e_begin <= e_end && e_end <= E, "route_pairs: experts [", e_begin, ", ", e_end,
            ") of ", E);
  DT_ASSERT(T * E < (int64_t(1) << 31), "route_pairs: ", T, " x ", E, " router entries overflow i32 slots");
  std::vector<int32_t> tok, slot;
  pairs.offsets.assign(1, 0);
  const int64_t El = e_end - e_begin;
  pairs.slot_pair = Tensor::empty({T, El}, DType::i32);
  int32_t* sp = pairs.slot_pair.data<int32_t>();
  std::fill_n(sp, T * El, -1);
  DT_CPU_FLOAT_DISPATCH(r.dtype(), V, {
    const V* rp = r.data<V>();
    for (int64_t e = e_begin; e < e_end; ++e) {
      for (int64_t t = 0; t < T; ++t)
        if (all_pairs || rp[t * E + e] > 0) {
          sp[t * El + (e - e_begin)] = static_cast<int32_t>(tok.size());
          tok.push_back(static_cast<int32_t>(t));
          slot.push_back(static_cast<int32_t>(t * E + e));
        }
      pairs.offsets.push_back(static_cast<int64_t>(tok.size()));
    }
  });
  const int64_t P = static_cast<int64_t>(tok.size());
  pairs.tokens = Tensor::empty({P}, DType::i32);
  pairs.slots = Tensor::empty({P}, DType::i32);
  std::copy(tok.begin(), tok.end(), pairs.tokens.data<int32_t>());
  std::copy(slot.begin(), slot.end(), pairs.slots.data<int32_t>());
}

namespace {

// slot_pair [T, E_l] with entries -1 or in [0, P): checked, as a bad index would read past rows.
void check_slot_pair(const Tensor& slot_pair, int64_t T, int64_t P, const char* op) {
  DT_ASSERT(slot_pair.dtype() == DType::i32 && slot_pair.dim(0) == T, op, ": slot_pair ",
            shape_str(slot_pair.shape()), " ", dtype_name(slot_pair.dtype()), " for ", T, " tokens");
  const int32_t* sp = slot_pair.data<int32_t>();
  for (int64_t i = 0, n = slot_pair.numel(); i < n; ++i)
    DT_ASSERT(sp[i] >= -1 && sp[i] < P, op, ": slot_pair names pair ", sp[i], " of ", P);
}

}  // namespace

void combine_pairs(Tensor& out, const Tensor& slot_pair, const Tensor& rows) {
  const int64_t T = out.dim(0), c = out.numel() / std::max<int64_t>(T, 1), P = rows.dim(0);
  const int64_t El = slot_pair.numel() / std::max<int64_t>(T, 1);
  check_slot_pair(slot_pair, T, P, "combine_pairs");
  DT_ASSERT(rows.numel() == P * c, "combine_pairs: rows ", shape_str(rows.shape()), " for ", c, " columns");
  const int32_t* sp = slot_pair.data<int32_t>();
  DT_CPU_FLOAT_DISPATCH(out.dtype(), V, {
    V* o = out.data<V>();
    const V* src = rows.data<V>();
    std::fill_n(o, T * c, V(0));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < El; ++i) {
        const int32_t p = sp[t * El + i];
        if (p < 0) continue;
        for (int64_t k = 0; k < c; ++k) o[t * c + k] += src[p * c + k];
      }
  });
}

void pairs_to_slots(Tensor& out, const Tensor& slot_pair, const Tensor& values, int64_t e_begin) {
  const int64_t T = out.dim(0), E = out.numel() / std::max<int64_t>(T, 1), P = values.numel();
  const int64_t El = slot_pair.numel() / std::max<int64_t>(T, 1);
  check_slot_pair(slot_pair, T, P, "pairs_to_slots");
  DT_ASSERT(0 <= e_begin && e_begin + El <= E, "pairs_to_slots: experts [", e_begin, ", ", e_begin + El, ") of ", E);
  const int32_t* sp = slot_pair.data<int32_t>();
  DT_CPU_FLOAT_DISPATCH(out.dtype(), V, {
    V* o = out.data<V>();
    const V* v = values.data<V>();
    std::fill_n(o, T * E, V(0));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < El; ++i)
        if (sp[t * El + i] >= 0) o[t * E + e_begin + i] = v[sp[t * El + i]];
  });
}

namespace {

// The pairs' rows, gathered: the reference reads them as a [P, h] matrix.
Tensor gather_pair_rows(const Tensor& rows, const Tensor& index) {
  DT_ASSERT(rows.ndim() == 2 && index.dtype() == DType::i32, "grouped experts: rows ", shape_str(rows.shape()),
            ", index ", dtype_name(index.dtype()), " (expected [R, h] rows and an i32 index)");
  Tensor xp = Tensor::empty({index.numel(), rows.dim(1)}, rows.dtype());
  if (index.numel() > 0) embedding_forward(xp, index, rows);
  return xp;
}

}  // namespace

void grouped_experts_forward(Tensor& outp, GroupedExperts& c, const Tensor& x_rows, const Tensor& index,
                             const std::vector<int64_t>& off, const Tensor& sp, const Tensor* mu_in,
                             const Tensor& w_pre, const Tensor* w_up_gated, const Tensor& gamma, const Tensor& w_down,
                             NormSiluMode mode, double eps) {
  const Tensor xp = gather_pair_rows(x_rows, index);
  const int64_t P = xp.dim(0), h = xp.dim(1), d = gamma.numel(), E = static_cast<int64_t>(off.size()) - 1;
  check_offsets(off, P, d, w_pre, w_down);
  const DType dt = xp.dtype();
  DT_ASSERT(uses_mean(mode) == (mu_in != nullptr), "grouped_experts_forward: mu is ",
            mu_in ? "given" : "missing", " for NormSiLU mode ", static_cast<int>(mode));
  if (mu_in)
    DT_ASSERT(mu_in->numel() == P && mu_in->dtype() == sp.dtype(), "grouped_experts_forward: mu ",
              shape_str(mu_in->shape()), " ", dtype_name(mu_in->dtype()), " for ", P, " pairs of ",
              dtype_name(sp.dtype()));
  c.mu = mu_in ? *mu_in : Tensor::zeros({P}, sp.dtype());
  c.pre = Tensor::empty({P, d}, dt);
  c.up = w_up_gated ? Tensor::empty({P, d}, dt) : Tensor();
  c.rs = Tensor::empty({P}, dt);
  c.y = Tensor::empty({P, d}, dt);
  if (P == 0) return;
  DT_ASSERT(c.mu.dtype() == dt, "grouped_experts_forward: mu ", dtype_name(c.mu.dtype()), " for ", dtype_name(dt),
            " activations (the CPU computes in one dtype)");
  DT_CPU_FLOAT_DISPATCH(dt, V, {
    const V* g = gamma.data<V>();
    const V* mu = c.mu.data<V>();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = off[e + 1] - off[e];
      if (n == 0) continue;
      const V* xe = xp.data<V>() + off[e] * h;
      V* pre = c.pre.data<V>() + off[e] * d;
      gemm(false, true, n, d, h, xe, h, w_pre.data<V>() + e * d * h, h, V(0), pre, d);
      V* up = w_up_gated ? c.up.data<V>() + off[e] * d : nullptr;
      if (up) gemm(false, true, n, d, h, xe, h, w_up_gated->data<V>() + e * d * h, h, V(0), up, d);
      V* y = c.y.data<V>() + off[e] * d;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = off[e] + i;
        double rs = 1;
        if (uses_rms(mode)) {
          double ss = 0;
          for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(pre[i * d + j] - mu[p]) * (pre[i * d + j] - mu[p]);
          rs = 1.0 / std::sqrt(ss / d + eps);
        }
        c.rs.data<V>()[p] = static_cast<V>(rs);
        const V se = sp.data<V>()[p];
        for (int64_t j = 0; j < d; ++j) {
          const V cval = pre[i * d + j] - mu[p];
          const V a = uses_rms(mode) ? static_cast<V>(g[j] * cval * rs) : cval;
          V z = a * sig(a);
          if (up) z *= up[i * d + j];
          y[i * d + j] = se * z;
        }
      }
      gemm(false, true, n, h, d, y, d, w_down.data<V>() + e * d, E * d, V(0), outp.data<V>() + off[e] * h, h);
    }
  });
}

void grouped_experts_backward(Tensor& dxp, Tensor& dsp, Tensor& gmean, Tensor& dw_pre, Tensor* dw_up_gated,
                              Tensor& dgamma, Tensor& dw_down, const Tensor& dout_rows, const GroupedExperts& c,
                              const Tensor& x_rows, const Tensor& index, const std::vector<int64_t>& off,
                              const Tensor& sp, const Tensor& w_pre, const Tensor* w_up_gated, const Tensor& gamma,
                              const Tensor& w_down, NormSiluMode mode, double eps) {
  (void)eps;  // rs is cached
  const Tensor xp = gather_pair_rows(x_rows, index), doutp = gather_pair_rows(dout_rows, index);
  const int64_t P = xp.dim(0), h = xp.dim(1), d = gamma.numel(), E = static_cast<int64_t>(off.size()) - 1;
  check_offsets(off, P, d, w_pre, w_down);
  DT_ASSERT(gmean.numel() == P && gmean.dtype() == dsp.dtype(), "grouped_experts_backward: gmean ",
            shape_str(gmean.shape()), " ", dtype_name(gmean.dtype()), " for ", P, " pairs of ", dtype_name(dsp.dtype()));
  if (P == 0) return;
  DT_CPU_FLOAT_DISPATCH(xp.dtype(), V, {
    const V* g = gamma.data<V>();
    std::vector<V> dy(P * d), dpre(P * d), dup(w_up_gated ? P * d : 0);
    V* gm = gmean.data<V>();  // g_p: the gradient reaching NormSiLU's mean
    std::fill_n(gm, P, V(0));
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = off[e + 1] - off[e];
      if (n == 0) continue;
      const V* xe = xp.data<V>() + off[e] * h;
      const V* doe = doutp.data<V>() + off[e] * h;
      const V* pre = c.pre.data<V>() + off[e] * d;
      const V* up = w_up_gated ? c.up.data<V>() + off[e] * d : nullptr;
      const V* y = c.y.data<V>() + off[e] * d;
      V* dye = dy.data() + off[e] * d;
      V* dpe = dpre.data() + off[e] * d;
      V* due = w_up_gated ? dup.data() + off[e] * d : nullptr;
      // dY = dOut_e W_down_e; dW_down_e += dOut_e^T Y
      gemm(false, false, n, d, h, doe, h, w_down.data<V>() + e * d, E * d, V(0), dye, d);
      gemm(true, false, h, d, n, doe, h, y, d, V(1), dw_down.data<V>() + e * d, E * d);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = off[e] + i;
        const V mu = c.mu.data<V>()[p], rs = c.rs.data<V>()[p], se = sp.data<V>()[p];
        double dsum = 0, dot = 0;
        for (int64_t j = 0; j < d; ++j) {
          const V cval = pre[i * d + j] - mu;
          const V chat = cval * rs;
          const V a = uses_rms(mode) ? g[j] * chat : cval;
          const V sg = sig(a), act = a * sg;
          const V z = up ? act * up[i * d + j] : act;
          dsum += static_cast<double>(dye[i * d + j]) * z;
          const V dz = dye[i * d + j] * se;
          const V dact = up ? dz * up[i * d + j] : dz;
          if (up) due[i * d + j] = dz * act;
          const V da = dact * sg * (V(1) + a * (V(1) - sg));
          if (uses_rms(mode)) {
            dgamma.data<V>()[j] += da * chat;
            dpe[i * d + j] = da * g[j];  // d chat, turned into d c below
            dot += static_cast<double>(dpe[i * d + j]) * chat;
          } else {
            dpe[i * d + j] = da;
          }
        }
        dsp.data<V>()[p] = static_cast<V>(dsum);
        if (uses_rms(mode)) {
          const V m = static_cast<V>(dot / d);
          for (int64_t j = 0; j < d; ++j) dpe[i * d + j] = rs * (dpe[i * d + j] - (pre[i * d + j] - mu) * rs * m);
        }
        if (uses_mean(mode)) {
          double gs = 0;
          for (int64_t j = 0; j < d; ++j) gs += dpe[i * d + j];
          gm[p] = static_cast<V>(gs);
        }
      }
      // dW_pre_e += dc^T X_e, dx_p = dc W_pre_e (+ the gated up-projection's terms)
      V* dxe = dxp.data<V>() + off[e] * h;
      gemm(true, false, d, h, n, dpe, d, xe, h, V(1), dw_pre.data<V>() + e * d * h, h);
      gemm(false, false, n, h, d, dpe, d, w_pre.data<V>() + e * d * h, h, V(0), dxe, h);
      if (up) {
        gemm(true, false, d, h, n, due, d, xe, h, V(1), dw_up_gated->data<V>() + e * d * h, h);
        gemm(false, false, n, h, d, due, d, w_up_gated->data<V>() + e * d * h, h, V(1), dxe, h);
      }
    }
  });
}

void sum_rows(Tensor& out, const Tensor& x) {
  const int64_t n = x.dim(0), cols = x.numel() / std::max<int64_t>(n, 1);
  DT_ASSERT(out.numel() == cols, "sum_rows: out has ", out.numel(), " entries for ", cols, " columns");
  DT_CPU_FLOAT_DISPATCH(x.dtype(), V, {
    V* o = out.data<V>();
    const V* xp = x.data<V>();
    std::fill_n(o, cols, V(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < cols; ++k) o[k] += xp[i * cols + k];
  });
}

void add_outer_(Tensor& x, const Tensor& a, const Tensor& row, double alpha) {
  const int64_t n = x.dim(0), cols = x.numel() / std::max<int64_t>(n, 1);
  DT_ASSERT(a.numel() == n && row.numel() == cols, "add_outer_: a has ", a.numel(), " entries for ", n,
            " rows, row ", row.numel(), " for ", cols, " columns");
  DT_ASSERT(a.dtype() == x.dtype() && row.dtype() == x.dtype(), "add_outer_: x ", dtype_name(x.dtype()), ", a ",
            dtype_name(a.dtype()), ", row ", dtype_name(row.dtype()));
  DT_CPU_FLOAT_DISPATCH(x.dtype(), V, {
    V* xp = x.data<V>();
    const V* ap = a.data<V>();
    const V* rp = row.data<V>();
    for (int64_t i = 0; i < n; ++i) {
      const V s = static_cast<V>(alpha * ap[i]);
      for (int64_t k = 0; k < cols; ++k) xp[i * cols + k] += s * rp[k];
    }
  });
}

void weighted_col_sum_(Tensor& out, const Tensor& w, const Tensor& x) {
  const int64_t n = x.dim(0), cols = x.numel() / std::max<int64_t>(n, 1);
  DT_ASSERT(w.numel() == n && out.numel() == cols, "weighted_col_sum_: w has ", w.numel(), " entries for ", n,
            " rows, out ", out.numel(), " for ", cols, " columns");
  DT_ASSERT(w.dtype() == x.dtype() && out.dtype() == x.dtype(), "weighted_col_sum_: out ", dtype_name(out.dtype()),
            ", w ", dtype_name(w.dtype()), ", x ", dtype_name(x.dtype()));
  DT_CPU_FLOAT_DISPATCH(x.dtype(), V, {
    std::vector<double> acc(cols, 0.0);
    const V* wp = w.data<V>();
    const V* xp = x.data<V>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < cols; ++k) acc[k] += static_cast<double>(wp[i]) * xp[i * cols + k];
    V* o = out.data<V>();
    for (int64_t k = 0; k < cols; ++k) o[k] += static_cast<V>(acc[k]);
  });
}

void add_rows_(Tensor& x, const Tensor& row, double alpha) {
  const int64_t n = x.dim(0), cols = x.numel() / std::max<int64_t>(n, 1);
  DT_ASSERT(row.numel() == cols, "add_rows_: row has ", row.numel(), " entries for ", cols, " columns");
  DT_CPU_FLOAT_DISPATCH(x.dtype(), V, {
    V* xp = x.data<V>();
    const V* rp = row.data<V>();
    const V a = static_cast<V>(alpha);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < cols; ++k) xp[i * cols + k] += a * rp[k];
  });
}

}  // namespace decotron::cpu
