// Blending against the spec's section-9 vectors, plus zero/extreme weights and the top-level
// builder.
#include <gtest/gtest.h>

#include <cmath>

#include "data/blended_dataset.h"
#include "data_test_util.h"

using namespace decotron;
using namespace decotron::data;
using namespace decotron::data::testing;

TEST(BlendIndices, WeightedSpecVector) {
  std::vector<double> w = {0.2, 0.5, 0.3};
  auto b = build_blending_indices(w, 10);
  EXPECT_EQ(b.dataset_index, (std::vector<int16_t>{1, 2, 0, 1, 2, 1, 0, 1, 2, 1}));
  EXPECT_EQ(b.dataset_sample_index, (std::vector<int64_t>{0, 0, 0, 1, 1, 2, 1, 3, 2, 4}));
}

TEST(BlendIndices, ExhaustiveSpecVector) {
  std::vector<int64_t> sizes = {2, 5};
  auto b = build_exhaustive_blending_indices(sizes);
  EXPECT_EQ(b.dataset_index, (std::vector<int16_t>{1, 0, 1, 1, 0, 1, 1}));
  EXPECT_EQ(b.dataset_sample_index, (std::vector<int64_t>{0, 0, 1, 2, 1, 3, 4}));
}

TEST(BlendIndices, ZeroWeightIsNeverChosenAndOthersKeepMegatronOrder) {
  // Megatron's greedy would pick dataset 0 (weight 0) at sample 2, where all errors are 0.
  std::vector<double> with_zero = {0.0, 0.5, 0.5}, without = {0.5, 0.5};
  auto a = build_blending_indices(with_zero, 50), b = build_blending_indices(without, 50);
  for (size_t s = 0; s < 50; ++s) {
    EXPECT_NE(a.dataset_index[s], 0);
    EXPECT_EQ(a.dataset_index[s], b.dataset_index[s] + 1);
    EXPECT_EQ(a.dataset_sample_index[s], b.dataset_sample_index[s]);
  }
  // A tiny weight still gets its fair share (about w * size), never more than ceil + 1.
  std::vector<double> skew = normalize_weights(std::vector<double>{1e-9, 1.0});
  auto c = build_blending_indices(skew, 1000);
  int64_t n0 = 0;
  for (auto k : c.dataset_index) n0 += (k == 0);
  EXPECT_LE(n0, 1);
}

TEST(BlendIndices, InvalidWeightsAreErrors) {
  EXPECT_THROW(normalize_weights(std::vector<double>{0.0, 0.0}), Error);
  EXPECT_THROW(normalize_weights(std::vector<double>{1.0, -1.0}), Error);
  EXPECT_THROW(normalize_weights(std::vector<double>{1.0, NAN}), Error);
  EXPECT_THROW(normalize_weights(std::vector<double>{1.0, INFINITY}), Error);
}

TEST(BlendDataset, WeightedBlendSizesAndSamples) {
  const std::string dir = scratch_dir("blend");
  write_dataset(dir + "/a", spec_tiny_sequences());
  write_dataset(dir + "/b", spec_tiny_sequences({4, 9, 3, 8}, 1000));
  BlendSpec spec;
  spec.prefixes = {dir + "/a", dir + "/b"};
  spec.weights = {0.3, 0.7};
  spec.gpt.seq_len = 4;
  spec.gpt.split = "1";
  spec.gpt.use_cache = false;
  auto ds = build_split_dataset(spec, Split::train, 20);
  // Sizes: t = ceil(20 * w) per component (6 and 14 here), the blend has sum t samples.
  const std::vector<double> w = normalize_weights(spec.weights);
  EXPECT_EQ(ds->size(), static_cast<int64_t>(std::ceil(20 * w[0]) + std::ceil(20 * w[1])));
  // Component k was built with ceil(t * 1.005) samples requested -> at least that many.
  EXPECT_GE(ds->part(0).size(), static_cast<int64_t>(std::ceil(std::ceil(20 * w[0]) * 1.005)));
  auto expect_idx = build_blending_indices(normalize_weights(w), ds->size());
  std::vector<int32_t> got(5), want(5);
  for (int64_t s = 0; s < ds->size(); ++s) {
    auto [k, j] = ds->locate(s);
    EXPECT_EQ(k, expect_idx.dataset_index[s]);
    EXPECT_EQ(j, expect_idx.dataset_sample_index[s]);
    ds->get(s, got.data());
    ds->part(k).get(j, want.data());
    EXPECT_EQ(got, want);
    EXPECT_EQ(got[0] >= 1000, k == 1);  // tokens really come from that file
  }
  // Zero weight for a dataset whose train split would be empty: not built, never used.
  spec.weights = {0.0, 1.0};
  spec.gpt.split = "1";
  auto only_b = build_split_dataset(spec, Split::train, 10);
  for (int64_t s = 0; s < only_b->size(); ++s) EXPECT_EQ(only_b->locate(s).first, 1);
  // Unweighted: weights are the component sizes.
  spec.weights.clear();
  auto unweighted = build_split_dataset(spec, Split::train, 10);
  EXPECT_EQ(unweighted->size(), 10);
  auto exhaustive = build_split_dataset(spec, Split::train, std::nullopt);
  EXPECT_EQ(exhaustive->size(), exhaustive->part(0).size() + exhaustive->part(1).size());
}
