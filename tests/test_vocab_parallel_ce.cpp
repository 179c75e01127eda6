// The vocabulary-parallel cross-entropy's pieces (ops::vocab_parallel_ce_forward/backward and
// the combination of the ranks' stats) in one process: the vocabulary split into n parts as n
// tensor-parallel ranks hold it, the all-gather emulated by copying each part's stats. Against
// the whole-vocabulary ops::cross_entropy (loss and gradient) and float64 finite differences.
// The same code over real ranks: MpiWorker.VocabParallelCrossEntropy (test_parallel_mpi.cpp).
#include <gtest/gtest.h>

#include <cstring>

#include "grad_check.h"
#include "kernels/ops.h"
#include "parallel/tensor_parallel.h"
#include "parallel/vocab_parallel_cross_entropy.h"

using namespace decotron;
using decotron::testing::expect_gradient;
using decotron::testing::randn64;

namespace {

// Loss sum over the tokens with the vocabulary split in `n` equal parts; with grad_scale != 0
// the parts' gradients are written into `grad` [T, V] (the columns put back together).
double emulated_vocab_parallel_ce(const Tensor& logits, const Tensor& targets, int n, double grad_scale,
                                  Tensor* grad = nullptr) {
  const int64_t T = logits.dim(0), V_l = logits.dim(1) / n, es = dtype_size(logits.dtype());
  std::vector<Tensor> parts;
  Tensor gathered = Tensor::empty({n, 2, T}, DType::f64);
  for (int r = 0; r < n; ++r) {
    parts.push_back(tp_slice_columns(logits, r, n));
    Tensor stats = Tensor::empty({2, T}, DType::f64);
    ops::vocab_parallel_ce_forward(stats, parts[r], targets, r * V_l);
    Tensor slot = gathered.rows(r, 1);
    slot.copy_from(stats.view({1, 2, T}));
  }
  Tensor lse = Tensor::empty({T}, DType::f64);
  const double loss = combine_vocab_parallel_stats(gathered, lse);
  if (grad_scale == 0) return loss;
  for (int r = 0; r < n; ++r) {
    ops::vocab_parallel_ce_backward(parts[r], targets, lse, r * V_l, grad_scale);
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(static_cast<char*>(grad->raw()) + (t * logits.dim(1) + r * V_l) * es,
                  static_cast<const char*>(parts[r].raw()) + t * V_l * es, V_l * es);
  }
  return loss;
}

// Targets on every part, its first and last ids included.
Tensor spread_targets(int64_t T, int64_t V) {
  Tensor t = Tensor::empty({T}, DType::i32);
  for (int64_t i = 0; i < T; ++i)
    t.data<int32_t>()[i] = static_cast<int32_t>(i == 0 ? 0 : i == 1 ? V - 1 : (i * 5) % V);
  return t;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  double d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::fabs(a.item(i) - b.item(i)));
  return d;
}

}  // namespace

TEST(VocabParallelCrossEntropy, EmulatedRanksEqualWholeCrossEntropy) {
  const int64_t T = 9, V = 24;
  // Logits of different scales and a large shift: the combination must stay stable.
  for (double shift : {0.0, 300.0}) {
    Tensor logits = randn64({T, V}, 1, 3.0);
    for (int64_t i = 0; i < logits.numel(); ++i) logits.data<double>()[i] += shift;
    Tensor targets = spread_targets(T, V);
    Tensor want = logits.clone();
    const double gs = 0.37;
    const double loss_want = ops::cross_entropy(want, targets, gs);
    for (int n : {1, 2, 3, 4, 6}) {
      Tensor got = Tensor::empty({T, V}, DType::f64);
      const double loss = emulated_vocab_parallel_ce(logits, targets, n, gs, &got);
      EXPECT_NEAR(loss, loss_want, 1e-12 * std::fabs(loss_want)) << n << " parts, shift " << shift;
      // exp(z - lse) is exact to the rounding of lse (an ulp of 300 is 6e-14).
      EXPECT_LE(max_abs_diff(got, want), 1e-13) << n << " parts, shift " << shift;
      EXPECT_NEAR(emulated_vocab_parallel_ce(logits, targets, n, 0.0), loss, 1e-12 * std::fabs(loss));
    }
  }
  // fp32: the log-sum-exp combined in double and rounded once, as cross_entropy rounds it.
  Tensor l32 = cast_cpu(randn64({T, V}, 2, 3.0), DType::f32), targets = spread_targets(T, V);
  Tensor want = l32.clone(), got = Tensor::empty({T, V}, DType::f32);
  const double loss_want = ops::cross_entropy(want, targets, 1.0 / T);
  const double loss = emulated_vocab_parallel_ce(l32, targets, 4, 1.0 / T, &got);
  EXPECT_NEAR(loss, loss_want, 1e-6 * std::fabs(loss_want));
  EXPECT_LE(max_abs_diff(got, want), 1e-7);
}

// The gradient the parts write equals central differences of the combined loss.
TEST(VocabParallelCrossEntropy, GradientMatchesFiniteDifferences) {
  const int64_t T = 5, V = 12;
  Tensor logits = randn64({T, V}, 3, 2.0), targets = spread_targets(T, V);
  Tensor grad = Tensor::empty({T, V}, DType::f64);
  emulated_vocab_parallel_ce(logits, targets, 3, 1.0, &grad);
  expect_gradient("dlogits (3 vocabulary parts)", logits, grad,
                  [&] { return emulated_vocab_parallel_ce(logits, targets, 3, 0.0); });
}

// Stats of a part: row 0 its log-sum-exp, row 1 the target's logit where the target is in its
// range, else 0.
TEST(VocabParallelCrossEntropy, StatsOfOnePart) {
  Tensor logits = Tensor::empty({2, 3}, DType::f64), targets = Tensor::empty({2}, DType::i32);
  const double z[6] = {0.0, 1.0, 2.0, -1.0, 0.5, 3.0};
  std::memcpy(logits.raw(), z, sizeof z);
  targets.data<int32_t>()[0] = 11;  // ids 10..12 here: column 1
  targets.data<int32_t>()[1] = 4;   // another part's
  Tensor stats = Tensor::empty({2, 2}, DType::f64);
  ops::vocab_parallel_ce_forward(stats, logits, targets, 10);
  EXPECT_NEAR(stats.item(0), std::log(std::exp(0.0) + std::exp(1.0) + std::exp(2.0)), 1e-15);
  EXPECT_NEAR(stats.item(1), std::log(std::exp(-1.0) + std::exp(0.5) + std::exp(3.0)), 1e-15);
  EXPECT_EQ(stats.item(2), 1.0);
  EXPECT_EQ(stats.item(3), 0.0);
}
