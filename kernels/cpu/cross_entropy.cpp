// Softmax cross-entropy over the vocabulary on the CPU, whole or as the two local halves of
// the vocabulary-parallel one; the gradient overwrites the logits.
#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/dispatch.h"

namespace decotron::cpu {

double cross_entropy(Tensor& logits, const Tensor& targets, double grad_scale) {
  int64_t V = logits.dim(-1), rows = logits.numel() / V;
  DT_ASSERT(targets.numel() == rows, "cross_entropy targets ", shape_str(targets.shape()));
  const int32_t* tgt = targets.data<int32_t>();
  double total = 0;
  DT_CPU_FLOAT_DISPATCH(logits.dtype(), T, {
    for (int64_t r = 0; r < rows; ++r) {
      T* z = logits.data<T>() + r * V;
      DT_ASSERT(tgt[r] >= 0 && tgt[r] < V, "target id ", tgt[r], " outside the vocabulary of ", V);
      // exp in the working dtype (expf for fp32), sums in double.
      T m = z[0];
      for (int64_t j = 1; j < V; ++j) m = std::max(m, z[j]);
      double sum = 0;
      for (int64_t j = 0; j < V; ++j) sum += std::exp(z[j] - m);
      const double lse = m + std::log(sum);
      total += lse - z[tgt[r]];
      if (grad_scale != 0) {
        const T shift = static_cast<T>(lse), gs = static_cast<T>(grad_scale);
        for (int64_t j = 0; j < V; ++j) z[j] = gs * std::exp(z[j] - shift);
        z[tgt[r]] -= gs;
      }
    }
  });
  return total;
}

void vocab_parallel_ce_forward(Tensor& stats, const Tensor& logits, const Tensor& targets, int64_t vocab_start) {
  const int64_t V = logits.dim(-1), rows = logits.numel() / V;
  DT_ASSERT(targets.numel() == rows, "vocab_parallel_ce_forward targets ", shape_str(targets.shape()));
  DT_ASSERT(stats.numel() == 2 * rows && stats.dtype() == DType::f64, "vocab_parallel_ce_forward stats ",
            shape_str(stats.shape()), " ", dtype_name(stats.dtype()));
  const int32_t* tgt = targets.data<int32_t>();
  double* lse = stats.data<double>();
  double* target_logit = lse + rows;
  DT_CPU_FLOAT_DISPATCH(logits.dtype(), T, {
    for (int64_t r = 0; r < rows; ++r) {
      const T* z = logits.data<T>() + r * V;
      // As cross_entropy: exp in the working dtype, the sum in double.
      T m = z[0];
      for (int64_t j = 1; j < V; ++j) m = std::max(m, z[j]);
      double sum = 0;
      for (int64_t j = 0; j < V; ++j) sum += std::exp(z[j] - m);
      lse[r] = m + std::log(sum);
      const int64_t j = static_cast<int64_t>(tgt[r]) - vocab_start;
      target_logit[r] = (j >= 0 && j < V) ? static_cast<double>(z[j]) : 0.0;
    }
  });
}

void vocab_parallel_ce_backward(Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t vocab_start,
                                double grad_scale) {
  const int64_t V = logits.dim(-1), rows = logits.numel() / V;
  DT_ASSERT(targets.numel() == rows && lse.numel() == rows && lse.dtype() == DType::f64,
            "vocab_parallel_ce_backward: targets ", shape_str(targets.shape()), ", lse ", shape_str(lse.shape()));
  const int32_t* tgt = targets.data<int32_t>();
  DT_CPU_FLOAT_DISPATCH(logits.dtype(), T, {
    const T gs = static_cast<T>(grad_scale);
    for (int64_t r = 0; r < rows; ++r) {
      T* z = logits.data<T>() + r * V;
      const T shift = static_cast<T>(lse.data<double>()[r]);  // rounded as cross_entropy rounds it
      for (int64_t j = 0; j < V; ++j) z[j] = gs * std::exp(z[j] - shift);
      const int64_t j = static_cast<int64_t>(tgt[r]) - vocab_start;
      if (j >= 0 && j < V) z[j] -= gs;
    }
  });
}

}  // namespace decotron::cpu
