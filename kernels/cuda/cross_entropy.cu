// Softmax cross-entropy on the GPU (fp32, bf16 logits), fused: one block per row computes the
// max, the sum of exponentials and the row's loss, then (grad_scale != 0) overwrites the row
// with grad_scale * (softmax - onehot). Row losses are summed on the device in a fixed order
// and returned to the host (this op synchronizes the stream).
//
// The vocabulary-parallel halves (vocab_parallel_ce_forward/backward, one block per row, fp32 or
// bf16 logits, fp64 stats) have NEVER RUN ON A GPU: they compile, and tests/test_cuda_ops.cpp
// passes under tools/cuda_emu (host threads), which is not a pass on a GPU.
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

// stats[r] = log-sum-exp of row r's local logits, stats[rows + r] = the target's logit if in range.
template <class T>
__global__ void vocab_parallel_ce_forward_kernel(double* stats, const T* logits, const int32_t* targets, int64_t rows,
                                                 int64_t V, int64_t vocab_start) {
  const int64_t r = blockIdx.x;
  const T* z = logits + r * V;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, to_float(z[j]));
  m = block_max(m);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += expf(to_float(z[j]) - m);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    stats[r] = static_cast<double>(m) + log(static_cast<double>(s));
    const int64_t t = static_cast<int64_t>(targets[r]) - vocab_start;
    stats[rows + r] = (t >= 0 && t < V) ? static_cast<double>(to_float(z[t])) : 0.0;
  }
}

template <class T>
__global__ void vocab_parallel_ce_backward_kernel(T* logits, const int32_t* targets, const double* lse, int64_t V,
                                                  int64_t vocab_start, float grad_scale) {
  const int64_t r = blockIdx.x;
  T* z = logits + r * V;
  const float shift = static_cast<float>(lse[r]);
  const int64_t t = static_cast<int64_t>(targets[r]) - vocab_start;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float g = grad_scale * expf(to_float(z[j]) - shift);
    if (j == t) g -= grad_scale;
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

void vocab_parallel_ce_forward(Tensor& stats, const Tensor& logits, const Tensor& targets, int64_t vocab_start) {
  const int64_t V = logits.dim(-1), rows = V ? logits.numel() / V : 0;
  expect_dtype(targets, DType::i32, "vocab_parallel_ce_forward", "targets");
  expect_numel(targets, rows, "vocab_parallel_ce_forward", "targets");
  expect_dtype(stats, DType::f64, "vocab_parallel_ce_forward", "stats");
  expect_numel(stats, 2 * rows, "vocab_parallel_ce_forward", "stats");
  if (rows == 0) return;
  Context& ctx = context();
  DT_CUDA_F32_BF16(logits.dtype(), "vocab_parallel_ce_forward", T, {
    vocab_parallel_ce_forward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, ctx.stream>>>(
        ptr<double>(stats), ptr<T>(logits), ptr<int32_t>(targets), rows, V, vocab_start);
    CUDA_CHECK_LAUNCH();
  });
}

void vocab_parallel_ce_backward(Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t vocab_start,
                                double grad_scale) {
  const int64_t V = logits.dim(-1), rows = V ? logits.numel() / V : 0;
  expect_dtype(targets, DType::i32, "vocab_parallel_ce_backward", "targets");
  expect_numel(targets, rows, "vocab_parallel_ce_backward", "targets");
  expect_dtype(lse, DType::f64, "vocab_parallel_ce_backward", "lse");
  expect_numel(lse, rows, "vocab_parallel_ce_backward", "lse");
  if (rows == 0) return;
  Context& ctx = context();
  DT_CUDA_F32_BF16(logits.dtype(), "vocab_parallel_ce_backward", T, {
    vocab_parallel_ce_backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, ctx.stream>>>(
        ptr<T>(logits), ptr<int32_t>(targets), ptr<double>(lse), V, vocab_start, static_cast<float>(grad_scale));
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace decotron::cuda
