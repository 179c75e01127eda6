// Softmax cross-entropy on the GPU (fp32, bf16 logits), fused: one block per row computes the
// max, the sum of exponentials and the row's loss, then (grad_scale != 0) overwrites the row
// with grad_scale * (softmax - onehot). Row losses are summed on the device in a fixed order
// and returned to the host (this op synchronizes the stream).
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

template <class T>
__global__ void cross_entropy_kernel(T* logits, const int32_t* targets, double* row_loss, int64_t V, float grad_scale,
                                     unsigned* flags) {
  const int64_t r = blockIdx.x;
  T* z = logits + r * V;
  const int32_t tgt = targets[r];
  const bool bad = tgt < 0 || tgt >= V;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, to_float(z[j]));
  m = block_max(m);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += expf(to_float(z[j]) - m);
  s = block_sum(s);
  const double lse = static_cast<double>(m) + log(static_cast<double>(s));
  if (threadIdx.x == 0) {
    if (bad) {
      atomicOr(flags, static_cast<unsigned>(kBadTargetId));
      row_loss[r] = 0.0;
    } else {
      row_loss[r] = lse - static_cast<double>(to_float(z[tgt]));
    }
  }
  if (grad_scale == 0.0f) return;
  __syncthreads();  // z[tgt] is read above before the row is overwritten
  const float lse_f = static_cast<float>(lse);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float g = grad_scale * expf(to_float(z[j]) - lse_f);
    if (j == tgt) g -= grad_scale;
    z[j] = from_float<T>(g);
  }
}

struct ReadDouble {
  const double* p;
  __device__ double operator()(int64_t i) const { return p[i]; }
};

}  // namespace

double cross_entropy(Tensor& logits, const Tensor& targets, double grad_scale) {
  const int64_t V = logits.dim(-1), rows = V ? logits.numel() / V : 0;
  expect_dtype(targets, DType::i32, "cross_entropy", "targets");
  expect_numel(targets, rows, "cross_entropy", "targets");
  if (rows == 0) return 0.0;
  Context& ctx = context();
  Tensor row_loss = scratch(rows, DType::f64);
  DT_CUDA_F32_BF16(logits.dtype(), "cross_entropy", T, {
    cross_entropy_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, ctx.stream>>>(
        ptr<T>(logits), ptr<int32_t>(targets), ptr<double>(row_loss), V, static_cast<float>(grad_scale),
        ctx.error_flags);
    CUDA_CHECK_LAUNCH();
  });
  const double total = sum_to_host(ReadDouble{ptr<double>(row_loss)}, rows);
  check_device_errors();
  return total;
}

}  // namespace decotron::cuda
