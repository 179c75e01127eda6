// Philox fills on the GPU; see kernels/cuda/random.h.
#include "core/rng.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/random.h"

namespace decotron::cuda {

namespace {

template <class T>
__global__ void fill_normal_kernel(T* out, int64_t n, uint64_t seed, uint64_t stream, float mean, float std,
                                   uint64_t first) {
  DT_GRID_STRIDE(i, n) {
    const float z = rng::normal(seed, stream, first + static_cast<uint64_t>(i));
    // No contraction into an FMA (the CPU rounds the product, then the sum), and no "+ 0" that
    // would turn -0 into +0: std * z, plus mean when there is one.
    const float scaled = __fmul_rn(std, z);
    out[i] = from_float<T>(mean == 0.0f ? scaled : __fadd_rn(mean, scaled));
  }
}

template <class T>
__global__ void fill_uniform_kernel(T* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t first) {
  DT_GRID_STRIDE(i, n) out[i] = from_float<T>(rng::uniform(seed, stream, first + static_cast<uint64_t>(i)));
}

}  // namespace

void fill_normal(Tensor& t, uint64_t seed, uint64_t stream, float mean, float std, uint64_t first_index) {
  const int64_t n = t.numel();
  if (n == 0) return;
  DT_CUDA_F32_BF16(t.dtype(), "fill_normal", T, {
    fill_normal_kernel<T><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(t), n, seed, stream, mean, std,
                                                                          first_index);
    CUDA_CHECK_LAUNCH();
  });
}

void fill_uniform(Tensor& t, uint64_t seed, uint64_t stream, uint64_t first_index) {
  const int64_t n = t.numel();
  if (n == 0) return;
  DT_CUDA_F32_BF16(t.dtype(), "fill_uniform", T, {
    fill_uniform_kernel<T><<<grid_for(n), kThreads, 0, context().stream>>>(ptr<T>(t), n, seed, stream, first_index);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace decotron::cuda
