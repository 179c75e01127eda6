#include "data/loader.h"

#include "core/error.h"
#include "data/tokenizer.h"

namespace decotron::data {

BatchLoader::BatchLoader(const DataOptions& opt, Split split, int64_t micro_batch, int64_t total_samples,
                         int64_t consumed_samples, int dp_rank, int dp_size)
    : split_(split), micro_batch_(micro_batch), seq_len_(opt.seq_len), total_samples_(total_samples),
      dp_rank_(dp_rank), dp_size_(dp_size), capacity_(static_cast<size_t>(std::max(1, opt.prefetch))) {
  if (micro_batch <= 0) fail("data loader: micro batch size must be positive, got ", micro_batch);
  if (opt.seq_len <= 0) fail("data loader: seq_len must be positive, got ", opt.seq_len);
  if (dp_size <= 0 || dp_rank < 0 || dp_rank >= dp_size) fail("data loader: bad data-parallel rank ", dp_rank, " of ", dp_size);
  if (total_samples < 0 || consumed_samples < 0) fail("data loader: negative sample count");
  BlendSpec spec;
  spec.prefixes = opt.prefixes;
  spec.weights = opt.weights;
  spec.gpt.seq_len = opt.seq_len;
  spec.gpt.seed = opt.seed;
  spec.gpt.split = opt.split;
  spec.gpt.cache_dir = opt.cache_dir;
  spec.vocab_size = opt.vocab_size;
  if (!opt.tokenizer_model.empty()) spec.vocab_size = Tokenizer(opt.tokenizer_model).vocab_size();
  dataset_ = build_split_dataset(spec, split, total_samples);
  DT_ASSERT(dataset_->sample_tokens() == seq_len_ + 1);
  start(consumed_samples);
}

BatchLoader::~BatchLoader() { stop(); }

void BatchLoader::start(int64_t from) {
  consumed_ = from;
  stop_ = false;
  queue_.clear();
  thread_ = std::thread([this, from] { produce(from); });
}

void BatchLoader::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void BatchLoader::reset(int64_t consumed_samples) {
  if (consumed_samples < 0) fail("data loader: cannot reset to negative sample ", consumed_samples);
  stop();
  start(consumed_samples);
}

void BatchLoader::produce(int64_t pos) {
  const int64_t row = seq_len_ + 1;
  for (;;) {
    Item item;
    try {
      item.tokens.resize(static_cast<size_t>(micro_batch_ * row));
      const int64_t first = pos + static_cast<int64_t>(dp_rank_) * micro_batch_;
      if (pos + micro_batch_ * dp_size_ > dataset_->size())
        fail("the ", split_name(split_), " data is exhausted: this micro-batch needs samples up to ",
             pos + micro_batch_ * dp_size_, " but the split's dataset has ", dataset_->size(), " (built for ", total_samples_,
             " requested samples). Pass the total number of samples the run consumes as total_samples "
             "(train: train_iters * global_batch).");
      for (int64_t b = 0; b < micro_batch_; ++b) dataset_->get(first + b, item.tokens.data() + b * row);
      pos += micro_batch_ * dp_size_;
    } catch (...) {
      item.tokens.clear();
      item.error = std::current_exception();
    }
    const bool failed = static_cast<bool>(item.error);
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return stop_ || queue_.size() < capacity_; });
    if (stop_) return;
    queue_.push_back(std::move(item));
    cv_.notify_all();
    if (failed) return;  // the error is delivered once next() reaches it
  }
}

std::vector<int32_t> BatchLoader::next() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return !queue_.empty(); });
  if (queue_.front().error) std::rethrow_exception(queue_.front().error);  // stays queued: later calls fail too
  Item item = std::move(queue_.front());
  queue_.pop_front();
  cv_.notify_all();
  consumed_ += micro_batch_ * dp_size_;
  return std::move(item.tokens);
}

int64_t megatron_train_samples(int64_t train_iters, int64_t global_batch) { return train_iters * global_batch; }

int64_t megatron_valid_samples(int64_t train_iters, int64_t eval_interval, int64_t eval_iters, int64_t global_batch) {
  if (eval_interval <= 0) fail("eval_interval must be positive");
  return (train_iters / eval_interval + 1) * eval_iters * global_batch;
}

int64_t megatron_test_samples(int64_t eval_iters, int64_t global_batch) { return eval_iters * global_batch; }

}  // namespace decotron::data
