// Softmax cross-entropy over the vocabulary on the CPU; the gradient overwrites the logits.
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

}  // namespace decotron::cpu
