// Blending several GPTDatasets into one sample stream, as Megatron's BlendedDataset and
// BlendedMegatronDatasetBuilder do (spec section 4), plus the top-level "dataset for a split"
// builder the loader and `data inspect` use.
//
// Deviation from Megatron (zero weights): Megatron's greedy assignment picks the lowest index
// on ties, so a dataset with weight 0 placed before the others wins whenever every other
// error is <= 0 (e.g. weights 0,1,1 at sample 2) although it was built with 0 samples; Megatron
// then fails its size assertion or indexes out of range. We keep the weight vector (and so
// every floating-point step) unchanged but never let a zero-weight dataset win; when Megatron
// would not have picked it our order is identical to Megatron's. Negative, NaN or infinite
// weights, and all-zero weights, are errors.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "data/gpt_dataset.h"

namespace decotron::data {

// w / numpy.sum(w) in float64, as Megatron's `normalize`.
std::vector<double> normalize_weights(std::span<const double> w);

struct BlendIndices {
  std::vector<int16_t> dataset_index;         // which component each top-level sample comes from
  std::vector<int64_t> dataset_sample_index;  // the sample within that component
};

// Megatron's build_blending_indices: greedy, s' = max(s, 1), strict argmax (ties -> lowest k).
// Components with weight exactly 0 are never chosen (see above).
BlendIndices build_blending_indices(std::span<const double> weights, int64_t size);
// Megatron's build_exhaustive_blending_indices: every sample of every component exactly once.
BlendIndices build_exhaustive_blending_indices(std::span<const int64_t> sizes);

// One top-level dataset: a single GptDataset, or a blend of several.
class BlendedDataset {
 public:
  // Single component, identity mapping.
  explicit BlendedDataset(std::shared_ptr<const GptDataset> only);
  // Checks that no component is asked for more samples than it has.
  BlendedDataset(std::vector<std::shared_ptr<const GptDataset>> parts, BlendIndices idx);

  int64_t size() const { return size_; }
  int64_t sample_tokens() const { return parts_[0]->sample_tokens(); }
  void get(int64_t i, int32_t* out) const;
  // (component, sample within component) of top-level sample i.
  std::pair<int, int64_t> locate(int64_t i) const;
  const GptDataset& part(int k) const { return *parts_[k]; }
  int num_parts() const { return static_cast<int>(parts_.size()); }

 private:
  std::vector<std::shared_ptr<const GptDataset>> parts_;
  BlendIndices idx_;
  int64_t size_;
};

struct BlendSpec {
  std::vector<std::string> prefixes;
  std::vector<double> weights;  // empty: unweighted (one prefix: plain GPTDataset)
  GptDatasetConfig gpt;
  int64_t vocab_size = 0;       // > 0: token ids are checked on read
};

// Megatron's BlendedMegatronDatasetBuilder for one split with `num_samples` requested
// (nullopt = Megatron's None): one unweighted prefix -> plain GPTDataset; weights -> weighted
// blend with the 1.005 surplus (also for one weighted prefix, as Megatron); several unweighted
// prefixes -> blend weighted by component sizes (exhaustive when num_samples is nullopt).
std::shared_ptr<BlendedDataset> build_split_dataset(const BlendSpec& spec, Split split, std::optional<int64_t> num_samples);

}  // namespace decotron::data
