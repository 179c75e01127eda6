// Elementwise ops on the GPU (fp32, bf16): grid-stride loops, arithmetic in fp32 (scale_ in
// double, as the CPU reference does).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

template <class T> __global__ void add_kernel(T* y, const T* x, int64_t n) {
  DT_GRID_STRIDE(i, n) y[i] = from_float<T>(to_float(y[i]) + to_float(x[i]));
}

template <class T> __global__ void scale_kernel(T* y, double alpha, int64_t n) {
  DT_GRID_STRIDE(i, n) y[i] = from_double<T>(to_double(y[i]) * alpha);
}

template <class T> __global__ void mul_kernel(T* y, const T* a, const T* b, int64_t n) {
  DT_GRID_STRIDE(i, n) y[i] = from_float<T>(to_float(a[i]) * to_float(b[i]));
}

template <class T> __global__ void mul_backward_kernel(T* da, T* db, const T* dy, const T* a, const T* b, int64_t n) {
  DT_GRID_STRIDE(i, n) {
    const float g = to_float(dy[i]);
    da[i] = from_float<T>(g * to_float(b[i]));
    db[i] = from_float<T>(g * to_float(a[i]));
  }
}

template <class To, class From> __global__ void convert_kernel(To* y, const From* x, int64_t n) {
  DT_GRID_STRIDE(i, n) y[i] = from_float<To>(to_float(x[i]));
}

void expect_same(const Tensor& a, const Tensor& b, const char* op) {
  DT_ASSERT(a.numel() == b.numel() && a.dtype() == b.dtype(), op, ": ", shape_str(a.shape()), " ",
            dtype_name(a.dtype()), " vs ", shape_str(b.shape()), " ", dtype_name(b.dtype()));
}

}  // namespace

void add_(Tensor& y, const Tensor& x) {
  expect_same(y, x, "add_");
  const int64_t n = y.numel();
  if (n == 0) return;
  DT_CUDA_F32_BF16(y.dtype(), "add_", T, {
    add_kernel<T><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(y), ptr<T>(x), n);
    CUDA_CHECK_LAUNCH();
  });
}

void convert(Tensor& y, const Tensor& x) {
  DT_ASSERT(y.numel() == x.numel(), "convert: ", shape_str(y.shape()), " from ", shape_str(x.shape()));
  const int64_t n = y.numel();
  if (n == 0) return;
  if (x.dtype() == y.dtype()) {
    CUDA_CHECK(cudaMemcpyAsync(y.raw(), x.raw(), x.nbytes(), cudaMemcpyDeviceToDevice, context().stream));
    return;
  }
  DT_CUDA_F32_BF16(y.dtype(), "convert", To, {
    DT_CUDA_F32_BF16(x.dtype(), "convert", From, {
      convert_kernel<To, From><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<To>(y), ptr<From>(x), n);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void scale_(Tensor& y, double alpha) {
  const int64_t n = y.numel();
  if (n == 0) return;
  DT_CUDA_F32_BF16(y.dtype(), "scale_", T, {
    scale_kernel<T><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(y), alpha, n);
    CUDA_CHECK_LAUNCH();
  });
}

void mul_forward(Tensor& y, const Tensor& a, const Tensor& b) {
  expect_same(a, b, "mul_forward");
  expect_same(y, a, "mul_forward");
  const int64_t n = y.numel();
  if (n == 0) return;
  DT_CUDA_F32_BF16(y.dtype(), "mul_forward", T, {
    mul_kernel<T><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(y), ptr<T>(a), ptr<T>(b), n);
    CUDA_CHECK_LAUNCH();
  });
}

void mul_backward(Tensor& da, Tensor& db, const Tensor& dy, const Tensor& a, const Tensor& b) {
  expect_same(a, b, "mul_backward");
  expect_same(dy, a, "mul_backward");
  expect_same(da, a, "mul_backward");
  expect_same(db, a, "mul_backward");
  const int64_t n = dy.numel();
  if (n == 0) return;
  DT_CUDA_F32_BF16(dy.dtype(), "mul_backward", T, {
    mul_backward_kernel<T><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(da), ptr<T>(db), ptr<T>(dy),
                                                                          ptr<T>(a), ptr<T>(b), n);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace decotron::cuda
