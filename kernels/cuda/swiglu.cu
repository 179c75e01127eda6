// SwiGLU on the GPU (fp32, bf16): h = SiLU(gate) * up, elementwise in fp32, grid-stride.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

template <class T> __global__ void swiglu_forward_kernel(T* h, const T* gate, const T* up, int64_t n) {
  DT_GRID_STRIDE(i, n) {
    const float g = to_float(gate[i]);
    h[i] = from_float<T>(g * sigmoidf_(g) * to_float(up[i]));
  }
}

template <class T>
__global__ void swiglu_backward_kernel(T* dgate, T* dup, const T* dh, const T* gate, const T* up, int64_t n) {
  DT_GRID_STRIDE(i, n) {
    const float g = to_float(gate[i]), sg = sigmoidf_(g), d = to_float(dh[i]);
    dup[i] = from_float<T>(d * g * sg);
    // d/dg [g sigmoid(g)] = sigmoid(g) (1 + g (1 - sigmoid(g)))
    dgate[i] = from_float<T>(d * to_float(up[i]) * sg * (1.0f + g * (1.0f - sg)));
  }
}

}  // namespace

void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) {
  const int64_t n = h.numel();
  expect_numel(gate, n, "swiglu_forward", "gate");
  expect_numel(up, n, "swiglu_forward", "up");
  if (n == 0) return;
  DT_CUDA_F32_BF16(h.dtype(), "swiglu_forward", T, {
    swiglu_forward_kernel<T><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(h), ptr<T>(gate), ptr<T>(up), n);
    CUDA_CHECK_LAUNCH();
  });
}

void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate, const Tensor& up) {
  const int64_t n = dh.numel();
  expect_numel(gate, n, "swiglu_backward", "gate");
  expect_numel(up, n, "swiglu_backward", "up");
  expect_numel(dgate, n, "swiglu_backward", "dgate");
  expect_numel(dup, n, "swiglu_backward", "dup");
  if (n == 0) return;
  DT_CUDA_F32_BF16(dh.dtype(), "swiglu_backward", T, {
    swiglu_backward_kernel<T><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(dgate), ptr<T>(dup), ptr<T>(dh),
                                                                             ptr<T>(gate), ptr<T>(up), n);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace decotron::cuda
