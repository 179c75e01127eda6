// Perplexity with the CPU runtime, two ways (docs/inference.md states both precisely):
//  - over a Megatron dataset's samples, read by data::BatchLoader with the trainer's options,
//    so the mean cross-entropy equals the trainer's validation loss on the same samples;
//  - over a text file, in non-overlapping windows of the context, as llama.cpp's perplexity.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "inference/runtime.h"

namespace decotron::inference {

struct EvalResult {
  double nll_sum = 0;   // sum of -log p(target) over the scored tokens
  int64_t tokens = 0;   // scored tokens
  int64_t windows = 0;  // samples or windows evaluated
  double mean_nll() const { return tokens ? nll_sum / tokens : NAN; }
  double perplexity() const { return std::exp(mean_nll()); }
};

struct DatasetEvalOptions {
  std::vector<std::string> prefixes;   // Megatron dataset prefixes (PREFIX.bin / PREFIX.idx), blended if several
  std::vector<double> weights;         // blend weights, one per prefix (empty: proportional to size)
  std::string split = "valid";         // which split: train | valid | test
  std::string split_string = "969,30,1";  // the trainer's data.split
  int64_t seq_len = 0;                 // tokens per sample; 0: the model's context
  int64_t samples = 0;                 // samples to evaluate (the first ones of the split's order)
  int64_t total_samples = 0;           // Megatron's requested size of the split; 0: = samples
  uint64_t seed = 1234;                // the trainer's train.seed (it orders the samples)
  std::string cache_dir;               // index cache; empty: next to the data
};

// Each sample of seq_len + 1 ids: inputs ids[0, S), targets ids[1, S]; every position scored.
EvalResult eval_dataset(Model& model, const DatasetEvalOptions& opt);

struct TextEvalOptions {
  int64_t window = 0;         // window length W in tokens; 0: the model's context
  bool score_second_half = true;  // llama.cpp: score only predictions from positions [W/2, W-1)
};

// Non-overlapping windows [kW, (k+1)W) of `ids`; the last partial window is dropped. Inside a
// window, the logits at position j predict token j + 1; positions j in [first, W - 1) are
// scored, first = W/2 (score_second_half) or 0. The first token of a window is never scored.
EvalResult eval_tokens(Model& model, const std::vector<int32_t>& ids, const TextEvalOptions& opt);

}  // namespace decotron::inference
