// The routed experts' pair ops on the GPU. sum_rows and add_rows_ are plain kernels;
// route_pairs builds the pair lists on the host from a copy of the router logits (one
// synchronizing [T, E] copy per layer: correct, not yet fast). The grouped expert GEMMs have no
// CUDA kernel yet (issue 5: grouped GEMMs over the experts' pair blocks): they refuse loudly
// rather than fall back silently, and GPU runs use model.expert_compute: dense.
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

// One thread per column, rows summed in order: deterministic.
template <class T> __global__ void sum_rows_kernel(T* out, const T* x, int64_t rows, int64_t cols) {
  DT_GRID_STRIDE(k, cols) {
    float s = 0.0f;
    for (int64_t i = 0; i < rows; ++i) s += to_float(x[i * cols + k]);
    out[k] = from_float<T>(s);
  }
}

template <class T> __global__ void add_rows_kernel(T* x, const T* row, float alpha, int64_t rows, int64_t cols) {
  DT_GRID_STRIDE(i, rows * cols) x[i] = from_float<T>(to_float(x[i]) + alpha * to_float(row[i % cols]));
}

}  // namespace

void sum_rows(Tensor& out, const Tensor& x) {
  const int64_t rows = x.dim(0), cols = x.numel() / std::max<int64_t>(rows, 1);
  expect_numel(out, cols, "sum_rows", "out");
  if (cols == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), "sum_rows", T, {
    sum_rows_kernel<T><<<grid_for(cols), kThreads, 0, context().stream>>>(ptr<T>(out), ptr<T>(x), rows, cols);
    CUDA_CHECK_LAUNCH();
  });
}

void add_rows_(Tensor& x, const Tensor& row, double alpha) {
  const int64_t rows = x.dim(0), cols = x.numel() / std::max<int64_t>(rows, 1);
  expect_numel(row, cols, "add_rows_", "row");
  if (x.numel() == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), "add_rows_", T, {
    add_rows_kernel<T><<<grid_for(rows * cols), kThreads, 0, context().stream>>>(
        ptr<T>(x), ptr<T>(row), static_cast<float>(alpha), rows, cols);
    CUDA_CHECK_LAUNCH();
  });
}

void route_pairs(RoutedPairs& pairs, const Tensor& r, int64_t e_begin, int64_t e_end, bool all_pairs) {
  RoutedPairs host;
  cpu::route_pairs(host, r.to(Device::cpu), e_begin, e_end, all_pairs);
  pairs.offsets = std::move(host.offsets);
  pairs.tokens = host.tokens.to(Device::cuda);
  pairs.slots = host.slots.to(Device::cuda);
}

void grouped_experts_forward(Tensor&, GroupedExperts&, const Tensor&, const std::vector<int64_t>&, const Tensor&,
                             const Tensor&, const Tensor&, const Tensor*, const Tensor&, const Tensor&, NormSiluMode,
                             double) {
  fail("the sparse expert path has no CUDA kernel yet: set model.expert_compute: dense for GPU runs");
}

void grouped_experts_backward(Tensor&, Tensor&, Tensor&, Tensor&, Tensor*, Tensor&, Tensor&, const Tensor&,
                              const GroupedExperts&, const Tensor&, const std::vector<int64_t>&, const Tensor&,
                              const Tensor&, const Tensor&, const Tensor*, const Tensor&, const Tensor&,
                              NormSiluMode, double) {
  fail("the sparse expert path has no CUDA kernel yet: set model.expert_compute: dense for GPU runs");
}

}  // namespace decotron::cuda
