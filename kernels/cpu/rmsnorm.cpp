// RMSNorm and rotary position embedding on the CPU.
#include <cmath>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/dispatch.h"

namespace decotron::cpu {

void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps) {
  int64_t h = w.numel(), rows = x.numel() / h;
  DT_CPU_FLOAT_DISPATCH(x.dtype(), T, {
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x.data<T>() + r * h;
      T* yr = y.data<T>() + r * h;
      double ss = 0;
      for (int64_t j = 0; j < h; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      double rs = 1.0 / std::sqrt(ss / h + eps);
      rstd.data<T>()[r] = static_cast<T>(rs);
      for (int64_t j = 0; j < h; ++j) yr[j] = static_cast<T>(xr[j] * rs * w.data<T>()[j]);
    }
  });
}

void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd) {
  int64_t h = w.numel(), rows = x.numel() / h;
  DT_CPU_FLOAT_DISPATCH(x.dtype(), T, {
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x.data<T>() + r * h;
      const T* gr = dy.data<T>() + r * h;
      T* dxr = dx.data<T>() + r * h;
      double rs = rstd.data<T>()[r];
      // xhat = x * rs; dxhat = dy * w; dx = rs * (dxhat - xhat * mean(dxhat * xhat))
      double dot = 0;
      for (int64_t j = 0; j < h; ++j) {
        double xhat = xr[j] * rs;
        dot += gr[j] * w.data<T>()[j] * xhat;
        dw.data<T>()[j] += static_cast<T>(gr[j] * xhat);
      }
      dot /= h;
      for (int64_t j = 0; j < h; ++j) dxr[j] = static_cast<T>(rs * (gr[j] * w.data<T>()[j] - xr[j] * rs * dot));
    }
  });
}

namespace {
// Rotates pairs (i, i + D/2) of every head by angle pos * base^(-2i/D); sign -1 rotates back
// (the backward is the transpose of the rotation).
template <class T>
void rope_apply(T* y, const T* x, int64_t batch, int64_t seq, int64_t heads, int64_t D, double base, double sign) {
  int64_t half = D / 2;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < seq; ++s)
      for (int64_t i = 0; i < half; ++i) {
        double theta = s * std::pow(base, -2.0 * i / D);
        double c = std::cos(theta), sn = sign * std::sin(theta);
        for (int64_t hh = 0; hh < heads; ++hh) {
          int64_t o = ((b * seq + s) * heads + hh) * D;
          double x1 = x[o + i], x2 = x[o + i + half];
          y[o + i] = static_cast<T>(x1 * c - x2 * sn);
          y[o + i + half] = static_cast<T>(x2 * c + x1 * sn);
        }
      }
}
}  // namespace

void rope_forward(Tensor& y, const Tensor& x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                  double base) {
  DT_ASSERT(x.numel() == batch * seq * heads * head_dim && head_dim % 2 == 0, "rope shape");
  DT_CPU_FLOAT_DISPATCH(x.dtype(), T, rope_apply<T>(y.data<T>(), x.data<T>(), batch, seq, heads, head_dim, base, 1.0));
}

void rope_backward(Tensor& dx, const Tensor& dy, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                   double base) {
  DT_CPU_FLOAT_DISPATCH(dy.dtype(), T,
                        rope_apply<T>(dx.data<T>(), dy.data<T>(), batch, seq, heads, head_dim, base, -1.0));
}

}  // namespace decotron::cpu
