// Elementwise ops, embedding and the reductions the trainer needs (norms, finiteness).
#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/dispatch.h"

namespace decotron::cpu {

void add_(Tensor& y, const Tensor& x) {
  expect_same(y, x, "add_");
  DT_CPU_FLOAT_DISPATCH(y.dtype(), T, {
    T* a = y.data<T>();
    const T* b = x.data<T>();
    for (int64_t i = 0, n_ = y.numel(); i < n_; ++i) a[i] += b[i];
  });
}

void scale_(Tensor& y, double alpha) {
  DT_CPU_FLOAT_DISPATCH(y.dtype(), T, {
    T* a = y.data<T>();
    for (int64_t i = 0, n_ = y.numel(); i < n_; ++i) a[i] = static_cast<T>(a[i] * alpha);
  });
}

void mul_forward(Tensor& y, const Tensor& a, const Tensor& b) {
  expect_same(a, b, "mul");
  DT_CPU_FLOAT_DISPATCH(y.dtype(), T, {
    for (int64_t i = 0, n_ = y.numel(); i < n_; ++i) y.data<T>()[i] = a.data<T>()[i] * b.data<T>()[i];
  });
}

void mul_backward(Tensor& da, Tensor& db, const Tensor& dy, const Tensor& a, const Tensor& b) {
  DT_CPU_FLOAT_DISPATCH(dy.dtype(), T, {
    for (int64_t i = 0, n_ = dy.numel(); i < n_; ++i) {
      T g = dy.data<T>()[i];
      da.data<T>()[i] = g * b.data<T>()[i];
      db.data<T>()[i] = g * a.data<T>()[i];
    }
  });
}

void convert(Tensor& y, const Tensor& x) {
  DT_ASSERT(y.numel() == x.numel(), "convert: ", shape_str(y.shape()), " from ", shape_str(x.shape()));
  auto is_float = [](DType d) { return d == DType::f32 || d == DType::f64 || d == DType::bf16; };
  DT_ASSERT(is_float(x.dtype()) && is_float(y.dtype()), "convert: ", dtype_name(x.dtype()), " to ",
            dtype_name(y.dtype()), " (floating dtypes only)");
  y.copy_from(cast_cpu(x, y.dtype()).view(y.shape()));  // cast_cpu rounds fp32 -> bf16 to nearest even
}

void embedding_forward(Tensor& y, const Tensor& tokens, const Tensor& table) {
  int64_t h = table.dim(1), V = table.dim(0), n = tokens.numel();
  const int32_t* tok = tokens.data<int32_t>();
  DT_CPU_FLOAT_DISPATCH(table.dtype(), T, {
    for (int64_t t = 0; t < n; ++t) {
      DT_ASSERT(tok[t] >= 0 && tok[t] < V, "token id ", tok[t], " outside the vocabulary of ", V);
      std::copy_n(table.data<T>() + tok[t] * h, h, y.data<T>() + t * h);
    }
  });
}

void embedding_backward(Tensor& dtable, const Tensor& tokens, const Tensor& dy) {
  int64_t h = dtable.dim(1), n = tokens.numel();
  const int32_t* tok = tokens.data<int32_t>();
  DT_CPU_FLOAT_DISPATCH(dtable.dtype(), T, {
    for (int64_t t = 0; t < n; ++t) {
      T* row = dtable.data<T>() + tok[t] * h;
      const T* g = dy.data<T>() + t * h;
      for (int64_t j = 0; j < h; ++j) row[j] += g[j];
    }
  });
}

void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) {
  expect_same(gate, up, "swiglu");
  DT_CPU_FLOAT_DISPATCH(h.dtype(), T, {
    for (int64_t i = 0, n_ = h.numel(); i < n_; ++i) {
      T g = gate.data<T>()[i];
      h.data<T>()[i] = g * sigmoid(g) * up.data<T>()[i];
    }
  });
}

void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate, const Tensor& up) {
  DT_CPU_FLOAT_DISPATCH(dh.dtype(), T, {
    for (int64_t i = 0, n_ = dh.numel(); i < n_; ++i) {
      T g = gate.data<T>()[i], sg = sigmoid(g), d = dh.data<T>()[i];
      dup.data<T>()[i] = d * g * sg;
      // d/dg [g * sigmoid(g)] = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
      dgate.data<T>()[i] = d * up.data<T>()[i] * sg * (T(1) + g * (T(1) - sg));
    }
  });
}

double sum_squares(const Tensor& x) {
  double s = 0;
  DT_CPU_FLOAT_DISPATCH(x.dtype(), T, {
    const T* p = x.data<T>();
    for (int64_t i = 0, n_ = x.numel(); i < n_; ++i) s += static_cast<double>(p[i]) * p[i];
  });
  return s;
}

bool has_nonfinite(const Tensor& x) {
  bool bad = false;
  DT_CPU_FLOAT_DISPATCH(x.dtype(), T, {
    const T* p = x.data<T>();
    for (int64_t i = 0, n_ = x.numel(); i < n_; ++i) bad |= !std::isfinite(p[i]);
  });
  return bad;
}

void adamw_update(Tensor& param, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStep& s, double grad_scale) {
  double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.step));
  double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.step));
  DT_CPU_FLOAT_DISPATCH(param.dtype(), T, {
    T* p = param.data<T>();
    T* mm = m.data<T>();
    T* vv = v.data<T>();
    const T* g = grad.data<T>();
    for (int64_t i = 0, n_ = param.numel(); i < n_; ++i) {
      double gi = g[i] * grad_scale;
      double mi = s.beta1 * mm[i] + (1 - s.beta1) * gi;
      double vi = s.beta2 * vv[i] + (1 - s.beta2) * gi * gi;
      mm[i] = static_cast<T>(mi);
      vv[i] = static_cast<T>(vi);
      double update = (mi / bc1) / (std::sqrt(vi / bc2) + s.eps) + s.weight_decay * p[i];
      p[i] = static_cast<T>(p[i] - s.lr * update);
    }
  });
}

}  // namespace decotron::cpu
