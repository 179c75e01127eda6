// GPTDataset: Megatron-Core's fixed-length samples over one indexed dataset and one split, with
// the document index, sample index and shuffle index built exactly as Megatron builds them
// (spec sections 2, 3, 7), so a Decotron run sees the same samples in the same order.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "data/indexed_dataset.h"

namespace decotron::data {

enum class Split { train = 0, valid = 1, test = 2 };
const char* split_name(Split s);
Split parse_split_name(const std::string& name);  // "train" | "valid" | "test"

// Cumulative bookends of a split string such as "969,30,1" (spec section 3). A split whose
// width is zero is absent (nullopt).
using SplitBookends = std::array<std::optional<std::pair<double, double>>, 3>;
SplitBookends parse_split_string(const std::string& split);
// Sequence range [first, second) of split `s` for a file of `num_sequences` sequences, or
// nullopt if the split is absent. Uses round-half-to-even on the cumulative bounds.
std::optional<std::pair<int64_t, int64_t>> split_sequence_range(const SplitBookends& b, Split s, int64_t num_sequences);

struct GptIndices {
  int64_t tokens_per_epoch = 0;
  int64_t epochs = 1;
  bool separate_last_epoch = false;
  std::vector<int32_t> document_index;  // positions -> sequence ids
  std::vector<int64_t> sample_index;    // (n+1) x 2, row-major: (position in document_index, offset)
  std::vector<int64_t> shuffle_index;   // n entries
  int64_t num_samples() const { return static_cast<int64_t>(shuffle_index.size()); }
};

// Builds Megatron's three indices for sequences [begin, end) of a file whose per-sequence
// lengths are `lengths`. num_samples = nullopt means one epoch (Megatron's None). `what` names
// the dataset and split for error messages (an empty split with samples requested is an error;
// Megatron loops forever there).
GptIndices build_gpt_indices(std::span<const int32_t> lengths, int64_t begin, int64_t end,
                             std::optional<int64_t> num_samples, int64_t seq_len, bool add_extra_token,
                             bool drop_last_partial, uint32_t seed, const std::string& what);

struct GptDatasetConfig {
  int64_t seq_len = 0;            // tokens per sample (S); samples hold S + 1 tokens
  uint64_t seed = 1234;           // numpy RandomState seed; must be in [0, 2^32-1]
  std::string split = "969,30,1"; // Megatron split string
  bool add_extra_token = true;    // x in the spec; Megatron's default (and DECO's) is true
  bool drop_last_partial = true;  // drop the final partial sample (Megatron default)
  std::string cache_dir;          // empty: <prefix>/cache/GPTDataset_indices, as Megatron
  bool use_cache = true;          // false: build in memory only (tests, inspect)
  int32_t pad_id = -1;            // used only when drop_last_partial is false
};

class GptDataset {
 public:
  GptDataset(std::shared_ptr<const IndexedDataset> data, Split split, std::optional<int64_t> num_samples,
             const GptDatasetConfig& cfg);

  // Number of samples (n), which can exceed the number requested.
  int64_t size() const { return idx_.num_samples(); }
  int64_t sample_tokens() const { return cfg_.seq_len + (cfg_.add_extra_token ? 1 : 0); }
  // Writes sample i (after shuffling) as sample_tokens() int32 ids into out.
  void get(int64_t i, int32_t* out) const;

  // Where sample i comes from: consecutive pieces of sequences, for `decotron data inspect`.
  struct Piece {
    int64_t sequence;
    int64_t offset;
    int64_t count;
  };
  std::vector<Piece> pieces(int64_t i) const;

  const GptIndices& indices() const { return idx_; }
  const IndexedDataset& data() const { return *data_; }
  Split split() const { return split_; }
  std::pair<int64_t, int64_t> sequence_range() const { return range_; }
  // Path of the cache description file when the indices came from / went to the cache.
  const std::string& cache_path() const { return cache_path_; }

 private:
  std::shared_ptr<const IndexedDataset> data_;
  Split split_;
  GptDatasetConfig cfg_;
  std::pair<int64_t, int64_t> range_;
  GptIndices idx_;
  std::string cache_path_;
};

}  // namespace decotron::data
