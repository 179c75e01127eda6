// Vocabulary-parallel cross-entropy (Megatron's VocabParallelCrossEntropy): under tensor
// parallelism each rank holds the logits of its vocabulary range only, [T, V/TP], and no rank
// ever holds [T, V].
//
//   1. each rank: per token, the log-sum-exp of its logits and the target's logit if the target
//      id is in its range, else 0 (ops::vocab_parallel_ce_forward): stats [2, T] in fp64;
//   2. one all-gather of the stats ([TP, 2, T]; Megatron uses three all-reduces: max, target
//      logit, sum of exponentials); every rank combines them the same way:
//      lse = M + log(sum_r exp(lse_r - M)) with M = max_r lse_r, target logit = sum_r;
//   3. loss = sum_t (lse_t - target logit_t), the same on every rank; with grad_scale != 0 the
//      gradient grad_scale * (softmax - onehot) overwrites the local logits in place
//      (ops::vocab_parallel_ce_backward), as the whole-vocabulary ops::cross_entropy does.
#pragma once
#include "core/tensor.h"
#include "parallel/communicator.h"

namespace decotron {

// logits [T, V_l]: this rank's columns, vocabulary ids [vocab_start, vocab_start + V_l) with
// V_l the same on every rank; targets i32 [T] global ids. Returns the sum over the T tokens
// of -log softmax(whole logits)[target]. Host tensors, fp32 or fp64.
double vocab_parallel_cross_entropy(Communicator& tp, Tensor& logits, const Tensor& targets, int64_t vocab_start,
                                    double grad_scale);

// Step 2 without the collective: `gathered` [n, 2, T] (fp64) holds each rank's stats;
// overwrites lse [T] (fp64) with the whole vocabulary's log-sum-exp and returns the loss sum
// (for tests that emulate the ranks in one process).
double combine_vocab_parallel_stats(const Tensor& gathered, Tensor& lse);

}  // namespace decotron
