// RMSNorm on the GPU (fp32, bf16 activations and weight; rstd is always fp32).
// Forward: one block per row, sum of squares in fp32 (block tree reduction), then y.
// Backward: one block per row for dx; dw by the deterministic column sum (common.cuh).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

template <class T>
__global__ void rmsnorm_forward_kernel(T* y, float* rstd, const T* x, const T* w, int64_t h, float eps) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * h;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const float v = to_float(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float rs = 1.0f / sqrtf(ss / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  T* yr = y + r * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) yr[j] = from_float<T>(to_float(xr[j]) * rs * to_float(w[j]));
}

template <class T>
__global__ void rmsnorm_backward_kernel(T* dx, const T* dy, const T* x, const T* w, const float* rstd, int64_t h) {
  const int64_t r = blockIdx.x;
  const T *xr = x + r * h, *gr = dy + r * h;
  const float rs = rstd[r];
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) dot += to_float(gr[j]) * to_float(w[j]) * to_float(xr[j]) * rs;
  dot = block_sum(dot) / static_cast<float>(h);
  T* dxr = dx + r * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const float xhat = to_float(xr[j]) * rs;
    dxr[j] = from_float<T>(rs * (to_float(gr[j]) * to_float(w[j]) - xhat * dot));
  }
}

// dw[j] += sum_r dy[r, j] * x[r, j] * rstd[r]
template <class T> struct RmsDw {
  const T *dy, *x;
  const float* rstd;
  int64_t h;
  __device__ double operator()(int64_t r, int64_t j) const {
    return static_cast<double>(to_float(dy[r * h + j])) * (to_float(x[r * h + j]) * rstd[r]);
  }
};

}  // namespace

void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps) {
  const int64_t h = w.numel(), rows = h ? x.numel() / h : 0;
  expect_numel(x, rows * h, "rmsnorm_forward", "x");
  expect_numel(y, rows * h, "rmsnorm_forward", "y");
  expect_numel(rstd, rows, "rmsnorm_forward", "rstd");
  expect_dtype(rstd, DType::f32, "rmsnorm_forward", "rstd");
  DT_ASSERT(y.dtype() == x.dtype() && w.dtype() == x.dtype(), "rmsnorm_forward: dtypes differ");
  if (rows == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), "rmsnorm_forward", T, {
    rmsnorm_forward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, context().stream>>>(
        ptr<T>(y), ptr<float>(rstd), ptr<T>(x), ptr<T>(w), h, static_cast<float>(eps));
    CUDA_CHECK_LAUNCH();
  });
}

void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd) {
  const int64_t h = w.numel(), rows = h ? x.numel() / h : 0;
  expect_numel(dx, rows * h, "rmsnorm_backward", "dx");
  expect_numel(dy, rows * h, "rmsnorm_backward", "dy");
  expect_numel(dw, h, "rmsnorm_backward", "dw");
  expect_numel(rstd, rows, "rmsnorm_backward", "rstd");
  expect_dtype(rstd, DType::f32, "rmsnorm_backward", "rstd");
  DT_ASSERT(dx.dtype() == x.dtype() && dy.dtype() == x.dtype() && w.dtype() == x.dtype(), "rmsnorm_backward: dtypes differ");
  DT_ASSERT(dw.dtype() == x.dtype() || dw.dtype() == DType::f32, "rmsnorm_backward: dw ", dtype_name(dw.dtype()));
  if (rows == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), "rmsnorm_backward", T, {
    rmsnorm_backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, context().stream>>>(
        ptr<T>(dx), ptr<T>(dy), ptr<T>(x), ptr<T>(w), ptr<float>(rstd), h);
    CUDA_CHECK_LAUNCH();
    RmsDw<T> f{ptr<T>(dy), ptr<T>(x), ptr<float>(rstd), h};
    if (dw.dtype() == DType::f32) col_sum_into(f, rows, h, ptr<float>(dw), true);
    else col_sum_into(f, rows, h, ptr<T>(dw), true);
  });
}

}  // namespace decotron::cuda
