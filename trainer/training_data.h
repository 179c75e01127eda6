// What the trainer reads: micro-batches of samples of seq_len + 1 tokens (inputs are the first
// seq_len, targets the last seq_len), in a fixed order that depends only on the settings and
// the number of samples consumed, so that a resumed run sees exactly the samples it would have.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace decotron {

struct Config;

// Under data parallelism (dp_size > 1) each rank reads its slice of every micro-step, as
// Megatron's sampler does: micro-step m covers global samples [m*mb*dp, (m+1)*mb*dp) and rank r
// takes [m*mb*dp + r*mb, m*mb*dp + (r+1)*mb). consumed_samples() counts global samples.
class TrainingData {
 public:
  virtual ~TrainingData() = default;
  // This rank's next micro_batch training samples, row-major [micro_batch, seq_len + 1].
  virtual std::vector<int32_t> next_train(int64_t micro_batch) = 0;
  virtual int64_t consumed_samples() const = 0;
  // Validation micro-batch k of a fixed sequence (the same samples at every evaluation, on any
  // rank: data-parallel ranks split the k's between them).
  virtual bool has_valid() const = 0;
  virtual std::vector<int32_t> valid_batch(int64_t k, int64_t micro_batch) = 0;
  // One line for the log: what is being read.
  virtual std::string describe() const = 0;
};

// A synthetic corpus for tests: token streams from a fixed random first-order Markov chain
// (each token has a few likely successors), so a model can learn it and the loss falls well
// below log(V). Deterministic in (seed, sample index).
std::unique_ptr<TrainingData> make_synthetic_data(int64_t vocab_size, int64_t seq_len, uint64_t seed,
                                                  int64_t consumed_samples, int dp_rank = 0, int dp_size = 1);

// The data named by cfg.data (Megatron indexed datasets), starting after consumed_samples.
std::unique_ptr<TrainingData> make_training_data(const Config& cfg, int64_t consumed_samples, int dp_rank = 0,
                                                 int dp_size = 1);

}  // namespace decotron
