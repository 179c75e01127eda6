// The trainer's view of the data: micro-batches of token ids in Megatron's sample order.
//
// A BatchLoader builds the top-level dataset of one split (plain GPTDataset or blend, exactly
// as Megatron would for the same prefixes, weights, split string, seq_len, seed and number of
// samples), then reads micro-batches on a background thread into a bounded queue, so the
// training loop never waits on disk while the queue is full. Sample order follows Megatron's
// default "single" sampler: global batch g holds top-level samples [g*gbs, (g+1)*gbs), and
// data-parallel rank r takes the slice [r*mb, (r+1)*mb) of each micro-step's mb*dp samples.
// next() and reset() are meant for one consumer thread (the training loop).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/blended_dataset.h"
#include "data/gpt_dataset.h"

namespace decotron::data {

struct DataOptions {
  std::vector<std::string> prefixes;  // dataset path prefixes (<prefix>.bin / <prefix>.idx)
  std::vector<double> weights;        // one blend weight per prefix, or empty (unweighted)
  std::string split = "969,30,1";     // Megatron split string: train,valid,test shares
  int64_t seq_len = 0;                // tokens per sample; a sample row holds seq_len + 1 ids
  uint64_t seed = 1234;               // Megatron --seed (numpy RandomState), in [0, 2^32-1]
  std::string cache_dir;              // index cache; empty: <prefix>/cache/GPTDataset_indices
  std::string tokenizer_model;        // if set, token ids are checked against its vocabulary
  int64_t vocab_size = 0;             // if > 0 and no tokenizer_model: ids checked against it
  int prefetch = 4;                   // micro-batches read ahead by the background thread
};

class BatchLoader {
 public:
  // total_samples: Megatron's requested size N of this split (it decides the epoch count and
  // so the order; compute it as Megatron does, see docs/data.md). consumed_samples: global
  // samples already consumed (resume). dp_rank/dp_size: this rank's slice of each micro-step.
  BatchLoader(const DataOptions& opt, Split split, int64_t micro_batch, int64_t total_samples,
              int64_t consumed_samples = 0, int dp_rank = 0, int dp_size = 1);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // The next micro-batch: int32 ids [micro_batch, seq_len + 1], row-major; inputs are
  // row[0:seq_len], labels row[1:seq_len+1]. Advances consumed_samples() by micro_batch*dp_size.
  // Re-throws any error of the background thread (bad token id, exhausted split, ...).
  std::vector<int32_t> next();
  // Global samples consumed by the batches returned so far (what a checkpoint stores).
  int64_t consumed_samples() const { return consumed_; }
  // Restart at a global sample (0: the beginning, e.g. for a repeated validation pass).
  void reset(int64_t consumed_samples = 0);

  int64_t micro_batch() const { return micro_batch_; }
  int64_t seq_len() const { return seq_len_; }
  // Samples available in the split's top-level dataset (>= total_samples when that is > 0).
  int64_t num_samples() const { return dataset_->size(); }
  const BlendedDataset& dataset() const { return *dataset_; }

 private:
  struct Item {
    std::vector<int32_t> tokens;
    std::exception_ptr error;
  };
  void start(int64_t from);
  void stop();
  void produce(int64_t from);

  std::shared_ptr<BlendedDataset> dataset_;
  Split split_;
  int64_t micro_batch_, seq_len_, total_samples_;
  int dp_rank_, dp_size_;
  size_t capacity_;
  int64_t consumed_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool stop_ = false;
  std::thread thread_;
};

// Megatron's requested split sizes (spec section 5), to pass as total_samples.
int64_t megatron_train_samples(int64_t train_iters, int64_t global_batch);
int64_t megatron_valid_samples(int64_t train_iters, int64_t eval_interval, int64_t eval_iters, int64_t global_batch);
int64_t megatron_test_samples(int64_t eval_iters, int64_t global_batch);

}  // namespace decotron::data
