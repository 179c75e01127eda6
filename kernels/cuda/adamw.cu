// The optimizer's ops on the GPU: AdamW (fp32 parameters, moments and gradients; one
// grid-stride launch per tensor, arithmetic in double as the CPU reference), and the
// deterministic reductions the trainer needs for clipping and overflow checks (fp32, bf16).
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

__global__ void adamw_kernel(float* p, float* m, float* v, const float* g, int64_t n, double lr, double beta1, double beta2,
                             double eps, double wd, double bc1, double bc2, double grad_scale) {
  DT_GRID_STRIDE(i, n) {
    const double gi = static_cast<double>(g[i]) * grad_scale;
    const double mi = beta1 * m[i] + (1 - beta1) * gi;
    const double vi = beta2 * v[i] + (1 - beta2) * gi * gi;
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    const double pi = p[i];
    const double update = (mi / bc1) / (sqrt(vi / bc2) + eps) + wd * pi;
    p[i] = static_cast<float>(pi - lr * update);
  }
}

template <class T> struct Square {
  const T* x;
  __device__ double operator()(int64_t i) const {
    const double v = to_double(x[i]);
    return v * v;
  }
};

template <class T> struct NonFinite {
  const T* x;
  __device__ double operator()(int64_t i) const { return isfinite(to_float(x[i])) ? 0.0 : 1.0; }
};

}  // namespace

void adamw_update(Tensor& param, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStep& s, double grad_scale) {
  const int64_t n = param.numel();
  expect_numel(m, n, "adamw_update", "m");
  expect_numel(v, n, "adamw_update", "v");
  expect_numel(grad, n, "adamw_update", "grad");
  DT_ASSERT(s.step >= 1, "adamw_update: step is 1-based, got ", s.step);
  if (n == 0) return;
  const double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.step));
  const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.step));
  DT_CUDA_F32(param.dtype(), "adamw_update", T, {
    adamw_kernel<<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(param), ptr<T>(m), ptr<T>(v), ptr<T>(grad), n,
                                                                 s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, bc1,
                                                                 bc2, grad_scale);
    CUDA_CHECK_LAUNCH();
  });
}

double sum_squares(const Tensor& x) {
  if (x.numel() == 0) return 0.0;
  double r = 0;
  DT_CUDA_F32_BF16(x.dtype(), "sum_squares", T, r = sum_to_host(Square<T>{ptr<T>(x)}, x.numel()));
  return r;
}

bool has_nonfinite(const Tensor& x) {
  if (x.numel() == 0) return false;
  double r = 0;
  DT_CUDA_F32_BF16(x.dtype(), "has_nonfinite", T, r = sum_to_host(NonFinite<T>{ptr<T>(x)}, x.numel()));
  return r > 0;
}

}  // namespace decotron::cuda
