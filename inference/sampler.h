// Choosing the next token from logits: greedy, or temperature with top-k and top-p (nucleus)
// filtering, from a seeded generator (the same seed and logits give the same tokens on any run).
#pragma once
#include <cstdint>
#include <random>

namespace decotron::inference {

struct SamplingOptions {
  double temperature = 0.8;  // 0: greedy (argmax)
  int64_t top_k = 0;         // keep the k most likely tokens; 0: all
  double top_p = 1.0;        // keep the smallest set of most likely tokens whose probability reaches p; 1: all
  uint64_t seed = 0;         // seed of the sampler's generator
};

// The index of the largest logit (the first one on ties).
int32_t argmax(const float* logits, int64_t n);

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& opt);
  // Picks a token among logits[0, n). Order: temperature, top-k, softmax, top-p, draw.
  int32_t sample(const float* logits, int64_t n);

 private:
  SamplingOptions opt_;
  std::mt19937_64 rng_;
};

}  // namespace decotron::inference
