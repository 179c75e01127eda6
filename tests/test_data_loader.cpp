// BatchLoader: Megatron order from consumed_samples, data-parallel slices, reset, error
// propagation from the background thread.
#include <gtest/gtest.h>

#include "data/loader.h"
#include "data_test_util.h"

using namespace decotron;
using namespace decotron::data;
using namespace decotron::data::testing;

namespace {
DataOptions opts(const std::string& dir) {
  DataOptions o;
  o.prefixes = {dir + "/a"};
  o.split = "1";
  o.seq_len = 4;
  o.cache_dir = dir + "/cache";
  return o;
}
std::vector<int32_t> expected_rows(const BlendedDataset& ds, int64_t from, int64_t count) {
  std::vector<int32_t> out(static_cast<size_t>(count * ds.sample_tokens()));
  for (int64_t i = 0; i < count; ++i) ds.get(from + i, out.data() + i * ds.sample_tokens());
  return out;
}
}  // namespace

TEST(DataLoader, SpecOrderFromConsumedSamplesAndReset) {
  const std::string dir = scratch_dir("loader");
  write_dataset(dir + "/a", spec_tiny_sequences());
  BatchLoader l(opts(dir), Split::train, 2, 6, 0);
  ASSERT_EQ(l.num_samples(), 11);
  // The spec's first three samples (N=6, seed 1234), then the rest in dataset order.
  auto b0 = l.next();
  EXPECT_EQ(b0, (std::vector<int32_t>{102, 103, 104, 200, 201, 500, 501, 502, 503, 504}));
  auto b1 = l.next();
  EXPECT_EQ(std::vector<int32_t>(b1.begin(), b1.begin() + 5), (std::vector<int32_t>{302, 303, 304, 305, 306}));
  EXPECT_EQ(b1, expected_rows(l.dataset(), 2, 2));
  EXPECT_EQ(l.consumed_samples(), 4);
  l.reset(0);
  EXPECT_EQ(l.next(), b0);
  // Resuming at consumed_samples = 2 gives batch 1.
  BatchLoader resumed(opts(dir), Split::train, 2, 6, 2);
  EXPECT_EQ(resumed.next(), b1);
}

TEST(DataLoader, DataParallelRanksTakeTheirSlices) {
  const std::string dir = scratch_dir("loader_dp");
  write_dataset(dir + "/a", spec_tiny_sequences());
  BatchLoader r0(opts(dir), Split::train, 2, 8, 0, 0, 2), r1(opts(dir), Split::train, 2, 8, 0, 1, 2);
  const auto& ds = r0.dataset();
  EXPECT_EQ(r0.next(), expected_rows(ds, 0, 2));
  EXPECT_EQ(r1.next(), expected_rows(ds, 2, 2));
  EXPECT_EQ(r0.next(), expected_rows(ds, 4, 2));
  EXPECT_EQ(r1.next(), expected_rows(ds, 6, 2));
  EXPECT_EQ(r0.consumed_samples(), 8);
}

TEST(DataLoader, BackgroundErrorsAreRethrownInNext) {
  const std::string dir = scratch_dir("loader_err");
  write_dataset(dir + "/a", spec_tiny_sequences());
  // Exhaustion: 11 samples, batches of 4 -> the third batch cannot be formed.
  BatchLoader l(opts(dir), Split::train, 4, 6, 0);
  l.next();
  l.next();
  expect_error([&] { l.next(); }, {"exhausted", "train"});
  expect_error([&] { l.next(); }, {"exhausted"});
  // Token ids above the vocabulary: the error names the .bin file.
  DataOptions o = opts(dir);
  o.vocab_size = 300;
  BatchLoader v(o, Split::train, 2, 6, 0);
  bool thrown = false;
  try {
    for (int k = 0; k < 5; ++k) v.next();
  } catch (const Error& e) {
    thrown = true;
    EXPECT_NE(std::string(e.what()).find(dir + "/a.bin"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(thrown);
  // An empty split fails at construction, naming it.
  o = opts(dir);
  o.split = "969,30,1";
  expect_error([&] { BatchLoader t(o, Split::valid, 2, 4, 0); }, {"'valid'"});
}

TEST(DataLoader, MegatronSplitSizes) {
  EXPECT_EQ(megatron_train_samples(1000, 32), 32000);
  // (train_iters // eval_interval + 1) * eval_iters * gbs
  EXPECT_EQ(megatron_valid_samples(2500, 1000, 100, 8), 3 * 100 * 8);
  EXPECT_EQ(megatron_test_samples(100, 8), 800);
}
