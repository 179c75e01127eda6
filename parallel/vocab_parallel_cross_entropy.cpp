#include "parallel/vocab_parallel_cross_entropy.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/ops.h"
#include "parallel/tensor_parallel.h"

namespace decotron {

namespace {

double combine(const double* gathered, int64_t n, int64_t T, double* lse) {
  double total = 0;
  for (int64_t t = 0; t < T; ++t) {
    // Each rank's stats block is [2, T]: its log-sum-exp, then its share of the target logit.
    double m = -INFINITY, target = 0;
    for (int64_t r = 0; r < n; ++r) m = std::max(m, gathered[r * 2 * T + t]);
    double sum = 0;
    for (int64_t r = 0; r < n; ++r) {
      sum += std::exp(gathered[r * 2 * T + t] - m);
      target += gathered[r * 2 * T + T + t];
    }
    lse[t] = m + std::log(sum);
    total += lse[t] - target;
  }
  return total;
}

}  // namespace

double combine_vocab_parallel_stats(const Tensor& gathered, Tensor& lse) {
  const int64_t T = lse.numel(), n = gathered.numel() / (2 * T);
  DT_ASSERT(gathered.numel() == n * 2 * T, "vocab-parallel stats ", shape_str(gathered.shape()), " for ", T,
            " tokens");
  return combine(gathered.data<double>(), n, T, lse.data<double>());
}

double vocab_parallel_cross_entropy(Communicator& tp, Tensor& logits, const Tensor& targets, int64_t vocab_start,
                                    double grad_scale) {
  const int64_t T = targets.numel(), V = logits.dim(-1) * tp.size();
  DT_ASSERT(logits.numel() == T * logits.dim(-1), "vocab-parallel cross-entropy: logits ", shape_str(logits.shape()),
            " for ", T, " targets");
  // A target outside the whole vocabulary would fall in no rank's range and silently add 0.
  const Tensor host_targets = targets.device() == Device::cpu ? targets : targets.to(Device::cpu);
  const int32_t* tgt = host_targets.data<int32_t>();
  for (int64_t t = 0; t < T; ++t)
    if (tgt[t] < 0 || tgt[t] >= V)
      fail("target token id ", tgt[t], " is outside the vocabulary of ", V, " ids (model.vocab_size); the data was "
           "tokenized with a larger vocabulary: raise model.vocab_size or re-tokenize");
  // The statistics where the logits are; gathered where the communicator wants them; combined
  // on the host (2 x T doubles per rank).
  Tensor stats = Tensor::empty({2, T}, DType::f64, logits.device());
  ops::vocab_parallel_ce_forward(stats, logits, targets, vocab_start);
  const Tensor send = on_comm_device(stats, tp);
  Tensor gathered = Tensor::empty({tp.size(), 2, T}, DType::f64, tp.device());
  tp.all_gather(send.raw(), gathered.raw(), 2 * T, CommType::f64);
  if (gathered.device() != Device::cpu) gathered = gathered.to(Device::cpu);
  Tensor lse = Tensor::empty({T}, DType::f64);
  const double loss = combine_vocab_parallel_stats(gathered, lse);
  if (grad_scale != 0)
    ops::vocab_parallel_ce_backward(logits, targets, logits.device() == Device::cpu ? lse : lse.to(logits.device()),
                                    vocab_start, grad_scale);
  return loss;
}

}  // namespace decotron
