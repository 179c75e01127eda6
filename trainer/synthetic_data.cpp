#include <algorithm>

#include "core/rng.h"
#include "trainer/training_data.h"

namespace decotron {

namespace {

class SyntheticData final : public TrainingData {
 public:
  SyntheticData(int64_t vocab, int64_t seq_len, uint64_t seed, int64_t consumed, int dp_rank, int dp_size)
      : vocab_(vocab), seq_len_(seq_len), seed_(seed), consumed_(consumed), dp_rank_(dp_rank), dp_size_(dp_size) {}

  std::vector<int32_t> next_train(int64_t micro_batch) override {
    std::vector<int32_t> out;
    const int64_t first = consumed_ + dp_rank_ * micro_batch;  // this rank's slice of the micro-step
    for (int64_t b = 0; b < micro_batch; ++b) append_sample(out, 1, first + b);
    consumed_ += micro_batch * dp_size_;
    return out;
  }
  int64_t consumed_samples() const override { return consumed_; }
  bool has_valid() const override { return true; }
  std::vector<int32_t> valid_batch(int64_t k, int64_t micro_batch) override {
    std::vector<int32_t> out;
    for (int64_t b = 0; b < micro_batch; ++b) append_sample(out, 2, k * micro_batch + b);
    return out;
  }
  std::string describe() const override { return "synthetic Markov-chain tokens (tests only)"; }

 private:
  // Successor j of token t (4 candidates, fixed by the seed); the chain picks one per step.
  int32_t successor(int32_t t, uint32_t pick) const {
    return static_cast<int32_t>(rng::random4(seed_, 1000 + t, pick % 4).v[0] % vocab_);
  }
  void append_sample(std::vector<int32_t>& out, uint64_t stream, int64_t index) const {
    rng::U32x4 r0 = rng::random4(seed_, stream, index * (seq_len_ + 1));
    int32_t t = static_cast<int32_t>(r0.v[0] % vocab_);
    for (int64_t s = 0; s <= seq_len_; ++s) {
      out.push_back(t);
      t = successor(t, rng::random4(seed_, stream, index * (seq_len_ + 1) + s + 1).v[1]);
    }
  }
  int64_t vocab_, seq_len_;
  uint64_t seed_;
  int64_t consumed_;
  int dp_rank_, dp_size_;
};

}  // namespace

std::unique_ptr<TrainingData> make_synthetic_data(int64_t vocab, int64_t seq_len, uint64_t seed, int64_t consumed,
                                                  int dp_rank, int dp_size) {
  return std::make_unique<SyntheticData>(vocab, seq_len, seed, consumed, dp_rank, dp_size);
}

}  // namespace decotron
