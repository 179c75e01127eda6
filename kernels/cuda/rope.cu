// Rotary position embedding on the GPU (fp32, bf16), rotate-half convention on [B, S, heads, D].
// One thread per rotated pair (i, i + D/2); the angle s * base^(-2i/D) and its sine and cosine
// in double, as the CPU reference computes them (angles reach thousands of radians at long
// sequence lengths, where fp32 would lose digits). y may alias x: a thread reads its pair
// before writing it.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

template <class T>
__global__ void rope_kernel(T* y, const T* x, int64_t seq, int64_t heads, int64_t D, double base, double sign,
                            int64_t pairs) {
  const int64_t half = D / 2;
  DT_GRID_STRIDE(p, pairs) {
    const int64_t i = p % half;
    const int64_t row = p / half;  // (b * seq + s) * heads + hh
    const int64_t s = (row / heads) % seq;
    const double theta = static_cast<double>(s) * pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(D));
    double sn, c;
    sincos(theta, &sn, &c);
    sn *= sign;
    const int64_t o = row * D;
    const double x1 = to_double(x[o + i]), x2 = to_double(x[o + i + half]);
    y[o + i] = from_double<T>(x1 * c - x2 * sn);
    y[o + i + half] = from_double<T>(x2 * c + x1 * sn);
  }
}

void rope_apply(Tensor& y, const Tensor& x, int64_t batch, int64_t seq, int64_t heads, int64_t D, double base,
                double sign, const char* op) {
  DT_ASSERT(D % 2 == 0 && x.numel() == batch * seq * heads * D && y.numel() == x.numel() && y.dtype() == x.dtype(),
            op, ": shape ", shape_str(x.shape()), " for B ", batch, " S ", seq, " heads ", heads, " D ", D);
  const int64_t pairs = batch * seq * heads * (D / 2);
  if (pairs == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), op, T, {
    rope_kernel<T><<<grid_for(pairs), kThreads, 0, context().stream>>>(ptr<T>(y), ptr<T>(x), seq, heads, D, base,
                                                                       sign, pairs);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

void rope_forward(Tensor& y, const Tensor& x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, double base) {
  rope_apply(y, x, batch, seq, heads, head_dim, base, 1.0, "rope_forward");
}

void rope_backward(Tensor& dx, const Tensor& dy, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                   double base) {
  rope_apply(dx, dy, batch, seq, heads, head_dim, base, -1.0, "rope_backward");
}

}  // namespace decotron::cuda
