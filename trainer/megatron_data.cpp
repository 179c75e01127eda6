// TrainingData over Megatron indexed datasets (data/loader.h): the train split in Megatron's
// sample order from consumed_samples on, and a fixed validation subset.
#include "core/config.h"
#include "core/error.h"
#include "data/loader.h"
#include "trainer/training_data.h"

namespace decotron {

namespace {

class MegatronData final : public TrainingData {
 public:
  MegatronData(const Config& cfg, int64_t consumed, int dp_rank, int dp_size) {
    if (cfg.data.prefixes.empty())
      fail(cfg.where("data.prefixes"),
           " is empty: name a Megatron dataset prefix (PREFIX.bin + PREFIX.idx, made by `decotron preprocess`), "
           "or pass --synthetic-data for a smoke test");
    data::DataOptions opt;
    opt.prefixes = cfg.data.prefixes;
    opt.weights = cfg.data.weights;
    opt.split = cfg.data.split;
    opt.seq_len = cfg.model.seq_len;
    opt.seed = cfg.train.seed;
    opt.cache_dir = cfg.data.cache_dir;
    opt.vocab_size = cfg.model.vocab_size;  // every id must index the embedding
    const TrainConfig& t = cfg.train;
    train_ = std::make_unique<data::BatchLoader>(opt, data::Split::train, t.micro_batch,
                                                 data::megatron_train_samples(t.iters, t.global_batch), consumed,
                                                 dp_rank, dp_size);
    if (t.eval_interval > 0) {
      valid_ = std::make_unique<data::BatchLoader>(
          opt, data::Split::valid, t.micro_batch,
          std::max(data::megatron_valid_samples(t.iters, t.eval_interval, t.eval_iters, t.global_batch),
                   t.eval_iters * t.micro_batch),
          0);
    }
    describe_ = cat(cfg.data.prefixes.size(), " Megatron dataset(s), first ", cfg.data.prefixes[0], ", split ",
                    cfg.data.split, ", ", train_->num_samples(), " train samples");
  }

  std::vector<int32_t> next_train(int64_t micro_batch) override {
    DT_ASSERT(micro_batch == train_->micro_batch(), "micro batch changed");
    return train_->next();
  }
  int64_t consumed_samples() const override { return train_->consumed_samples(); }
  bool has_valid() const override { return valid_ != nullptr; }
  std::vector<int32_t> valid_batch(int64_t k, int64_t micro_batch) override {
    // Evaluations read the validation split's first eval_iters micro-batches; a rank reads
    // its share of them (k = dp_rank, dp_rank + dp_size, ...), jumping where k is not the next.
    if (k != next_valid_) valid_->reset(k * micro_batch);
    next_valid_ = k + 1;
    return valid_->next();
  }
  std::string describe() const override { return describe_; }

 private:
  std::unique_ptr<data::BatchLoader> train_, valid_;
  std::string describe_;
  int64_t next_valid_ = -1;
};

}  // namespace

std::unique_ptr<TrainingData> make_training_data(const Config& cfg, int64_t consumed_samples, int dp_rank,
                                                 int dp_size) {
  return std::make_unique<MegatronData>(cfg, consumed_samples, dp_rank, dp_size);
}

}  // namespace decotron
