// The pair path's token-side reductions on the GPU, through route_pairs' token-major view
// (RoutedPairs::slot_pair, [T, E_l]: each token's pairs in expert order, -1 where inactive);
// kernels/cpu/grouped_experts.cpp is the reference. STATUS: emulator-verified (tools/cuda_emu),
// not yet run on a GPU.
//
// combine_pairs: one warp per token reads its E_l slot entries 32 at a time, ballots the active
// ones and adds their rows in pair order, fp32 accumulators in registers (kCols columns a pass),
// one rounding per output: the sums of embedding_backward's bucketed scatter-add, bit for bit
// (same order), without its count / scan / place / order passes (7 launches and a [T] or
// [T * E] zeroed table per call). Deterministic, no atomics.
// pairs_to_slots: a plain map over [T, E]; add_outer_: x += alpha a b^T; weighted_col_sum_:
// common.cuh's deterministic column sum of w_i x_i.
// A slot entry outside [-1, P) sets kBadPairIndex (check_device_errors) and is skipped: a bug
// upstream, never an out-of-bounds read.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

constexpr int kSlotsPerLane = 8;                // columns per lane and pass
constexpr int kCols = 32 * kSlotsPerLane;       // columns per pass of a warp

template <class T>
__global__ void combine_pairs_kernel(T* out, const int32_t* slot_pair, const T* rows, int64_t T_, int64_t El,
                                     int64_t c, int64_t P, unsigned* flags) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t t = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; t < T_; t += warps) {
    const int32_t* sp = slot_pair + t * El;
    for (int64_t k0 = 0; k0 < c; k0 += kCols) {
      float acc[kSlotsPerLane];
#pragma unroll
      for (int s = 0; s < kSlotsPerLane; ++s) acc[s] = 0.0f;
      for (int64_t i0 = 0; i0 < El; i0 += 32) {
        const int64_t i = i0 + lane;
        int32_t p = i < El ? sp[i] : -1;
        if (p < -1 || p >= P) {
          if (k0 == 0) atomicOr(flags, static_cast<unsigned>(kBadPairIndex));
          p = -1;
        }
        unsigned active = __ballot_sync(0xffffffffu, p >= 0);
        while (active) {  // the token's pairs in expert order: ascending pair index
          const int src = __ffs(active) - 1;
          active &= active - 1;
          const int64_t q = __shfl_sync(0xffffffffu, p, src);
          const T* row = rows + q * c;
#pragma unroll
          for (int s = 0; s < kSlotsPerLane; ++s) {
            const int64_t k = k0 + lane + 32 * s;
            if (k < c) acc[s] += to_float(row[k]);
          }
        }
      }
#pragma unroll
      for (int s = 0; s < kSlotsPerLane; ++s) {
        const int64_t k = k0 + lane + 32 * s;
        if (k < c) out[t * c + k] = from_float<T>(acc[s]);
      }
    }
  }
}

template <class T>
__global__ void pairs_to_slots_kernel(T* out, const int32_t* slot_pair, const T* values, int64_t T_, int64_t E,
                                      int64_t El, int64_t e_begin, int64_t P, unsigned* flags) {
  DT_GRID_STRIDE(idx, T_ * E) {
    const int64_t t = idx / E, i = idx - t * E - e_begin;
    float v = 0.0f;
    if (i >= 0 && i < El) {
      const int32_t p = slot_pair[t * El + i];
      if (p >= 0 && p < P) v = to_float(values[p]);
      else if (p != -1) atomicOr(flags, static_cast<unsigned>(kBadPairIndex));
    }
    out[idx] = from_float<T>(v);
  }
}

template <class T>
__global__ void add_outer_kernel(T* x, const float* a, const T* row, float alpha, int64_t n, int64_t cols) {
  DT_GRID_STRIDE(idx, n * cols) {
    const int64_t i = idx / cols, k = idx - i * cols;
    x[idx] = from_float<T>(to_float(x[idx]) + alpha * a[i] * to_float(row[k]));
  }
}

// (i, k) -> w_i x[i, k], column-summed.
template <class T> struct WeightedRow {
  const float* w;
  const T* x;
  int64_t cols;
  __device__ double operator()(int64_t i, int64_t k) const {
    return static_cast<double>(w[i]) * static_cast<double>(to_float(x[i * cols + k]));
  }
};

void check_slot_pair(const Tensor& slot_pair, int64_t T, const char* op) {
  expect_dtype(slot_pair, DType::i32, op, "slot_pair");
  DT_ASSERT(slot_pair.dim(0) == T, op, ": slot_pair ", shape_str(slot_pair.shape()), " for ", T, " tokens");
}

}  // namespace

void combine_pairs(Tensor& out, const Tensor& slot_pair, const Tensor& rows) {
  static const char* op = "combine_pairs";
  const int64_t T = out.dim(0), c = out.numel() / std::max<int64_t>(T, 1), P = rows.dim(0);
  const int64_t El = slot_pair.numel() / std::max<int64_t>(T, 1);
  check_slot_pair(slot_pair, T, op);
  expect_numel(rows, P * c, op, "rows");
  expect_dtype(rows, out.dtype(), op, "rows");
  if (T * c == 0) return;
  Context& ctx = context();
  DT_CUDA_F32_BF16(out.dtype(), op, V, {
    combine_pairs_kernel<V><<<grid_for(T * 32), kThreads, 0, ctx.stream>>>(
        ptr<V>(out), ptr<int32_t>(slot_pair), ptr<V>(rows), T, El, c, P, ctx.error_flags);
    CUDA_CHECK_LAUNCH();
  });
}

void pairs_to_slots(Tensor& out, const Tensor& slot_pair, const Tensor& values, int64_t e_begin) {
  static const char* op = "pairs_to_slots";
  const int64_t T = out.dim(0), E = out.numel() / std::max<int64_t>(T, 1), P = values.numel();
  const int64_t El = slot_pair.numel() / std::max<int64_t>(T, 1);
  check_slot_pair(slot_pair, T, op);
  expect_dtype(values, out.dtype(), op, "values");
  DT_ASSERT(0 <= e_begin && e_begin + El <= E, op, ": experts [", e_begin, ", ", e_begin + El, ") of ", E);
  if (T * E == 0) return;
  Context& ctx = context();
  DT_CUDA_F32_BF16(out.dtype(), op, V, {
    pairs_to_slots_kernel<V><<<grid_for(T * E), kThreads, 0, ctx.stream>>>(
        ptr<V>(out), ptr<int32_t>(slot_pair), ptr<V>(values), T, E, El, e_begin, P, ctx.error_flags);
    CUDA_CHECK_LAUNCH();
  });
}

void add_outer_(Tensor& x, const Tensor& a, const Tensor& row, double alpha) {
  static const char* op = "add_outer_";
  const int64_t n = x.dim(0), cols = x.numel() / std::max<int64_t>(n, 1);
  expect_numel(a, n, op, "a");
  expect_numel(row, cols, op, "row");
  expect_dtype(a, DType::f32, op, "a");
  expect_dtype(row, x.dtype(), op, "row");
  if (x.numel() == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), op, T, {
    add_outer_kernel<T><<<grid_for(n * cols), kThreads, 0, context().stream>>>(
        ptr<T>(x), ptr<float>(a), ptr<T>(row), static_cast<float>(alpha), n, cols);
    CUDA_CHECK_LAUNCH();
  });
}

void weighted_col_sum_(Tensor& out, const Tensor& w, const Tensor& x) {
  static const char* op = "weighted_col_sum_";
  const int64_t n = x.dim(0), cols = x.numel() / std::max<int64_t>(n, 1);
  expect_numel(w, n, op, "w");
  expect_numel(out, cols, op, "out");
  expect_dtype(w, DType::f32, op, "w");
  DT_ASSERT(out.dtype() == DType::f32 || out.dtype() == x.dtype(), op, ": out is ", dtype_name(out.dtype()), " for ",
            dtype_name(x.dtype()), " x");
  if (n == 0 || cols == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), op, T, {
    WeightedRow<T> f{ptr<float>(w), ptr<T>(x), cols};
    if (out.dtype() == DType::f32) col_sum_into(f, n, cols, ptr<float>(out), true);
    else col_sum_into(f, n, cols, ptr<T>(out), true);
  });
}

}  // namespace decotron::cuda
