// GPTDataset indices and samples against the spec's section-9 vectors (taken from Megatron's
// own Python + C++ helper), split ranges against section 3's table, and the index cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "data/gpt_dataset.h"
#include "data_test_util.h"

using namespace decotron;
using namespace decotron::data;
using namespace decotron::data::testing;

namespace {
GptDatasetConfig tiny_cfg() {
  GptDatasetConfig c;
  c.seq_len = 4;
  c.seed = 1234;
  c.split = "1";
  c.use_cache = false;
  return c;
}
std::vector<int64_t> i64(std::initializer_list<int64_t> v) { return v; }
}  // namespace

TEST(GptSplit, RangesMatchSpecTable) {
  using R = std::optional<std::pair<int64_t, int64_t>>;
  auto ranges = [](const std::string& s, int64_t m) {
    auto b = parse_split_string(s);
    return std::vector<R>{split_sequence_range(b, Split::train, m), split_sequence_range(b, Split::valid, m),
                          split_sequence_range(b, Split::test, m)};
  };
  auto r = [](int64_t a, int64_t b) { return R(std::make_pair(a, b)); };
  EXPECT_EQ(ranges("99990,8,2", 1000000), (std::vector<R>{r(0, 999900), r(999900, 999980), r(999980, 1000000)}));
  EXPECT_EQ(ranges("99990,8,2", 12345), (std::vector<R>{r(0, 12344), r(12344, 12345), r(12345, 12345)}));
  EXPECT_EQ(ranges("969,30,1", 1000000), (std::vector<R>{r(0, 969000), r(969000, 999000), r(999000, 1000000)}));
  EXPECT_EQ(ranges("969,30,1", 12345), (std::vector<R>{r(0, 11962), r(11962, 12333), r(12333, 12345)}));
  EXPECT_EQ(ranges("98,2,0", 1000000), (std::vector<R>{r(0, 980000), r(980000, 1000000), std::nullopt}));
  EXPECT_EQ(ranges("98/2", 12345), (std::vector<R>{r(0, 12098), r(12098, 12345), std::nullopt}));
  EXPECT_THROW(parse_split_string("1,2,3,4"), Error);
  EXPECT_THROW(parse_split_string("0,0,0"), Error);
  EXPECT_THROW(parse_split_string("abc"), Error);
}

TEST(GptIndices, SpecVectorN6SeparateLastEpoch) {
  const std::vector<int32_t> lengths = {5, 3, 7, 2, 6};
  GptIndices g = build_gpt_indices(lengths, 0, 5, 6, 4, true, true, 1234, "tiny");
  EXPECT_EQ(g.tokens_per_epoch, 23);
  EXPECT_EQ(g.epochs, 2);
  EXPECT_TRUE(g.separate_last_epoch);
  EXPECT_EQ(g.document_index, (std::vector<int32_t>{4, 0, 1, 2, 3, 3, 2, 1, 0, 4}));
  EXPECT_EQ(g.shuffle_index, i64({2, 0, 4, 3, 1, 6, 10, 7, 5, 9, 8}));
  EXPECT_EQ(g.sample_index, i64({0, 0, 0, 4, 1, 2, 2, 1, 3, 2, 3, 6, 5, 1, 6, 3, 7, 0, 8, 1, 9, 0, 9, 4}));
}

TEST(GptIndices, SpecVectorN12ThreeEpochs) {
  const std::vector<int32_t> lengths = {5, 3, 7, 2, 6};
  GptIndices g = build_gpt_indices(lengths, 0, 5, 12, 4, true, true, 1234, "tiny");
  EXPECT_EQ(g.epochs, 3);
  EXPECT_TRUE(g.separate_last_epoch);
  EXPECT_EQ(g.document_index, (std::vector<int32_t>{2, 2, 4, 1, 0, 3, 4, 0, 1, 3, 0, 4, 3, 2, 1}));
  EXPECT_EQ(g.shuffle_index, i64({3, 9, 2, 1, 7, 5, 4, 0, 8, 6, 10, 16, 12, 15, 14, 11, 13}));
}

TEST(GptIndices, EmptySplitWithSamplesRequestedFailsInsteadOfHanging) {
  const std::vector<int32_t> lengths = {5, 3, 7};
  try {
    build_gpt_indices(lengths, 3, 3, 10, 4, true, true, 1234, "split 'test' of dataset X");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("split 'test' of dataset X"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--data-split"), std::string::npos) << e.what();
  }
  // One epoch without a request is fine (Megatron's num_samples=None) and yields nothing.
  EXPECT_EQ(build_gpt_indices(lengths, 3, 3, std::nullopt, 4, true, true, 1234, "x").num_samples(), 0);
}

TEST(GptDataset, SamplesMatchSpecAndOverlapByOneToken) {
  const std::string dir = scratch_dir("gpt_samples");
  write_dataset(dir + "/tiny", spec_tiny_sequences());
  auto data = std::make_shared<const IndexedDataset>(dir + "/tiny");
  GptDataset ds(data, Split::train, 6, tiny_cfg());
  ASSERT_EQ(ds.size(), 11);
  std::vector<int32_t> s(5);
  ds.get(0, s.data());
  EXPECT_EQ(s, (std::vector<int32_t>{102, 103, 104, 200, 201}));
  ds.get(1, s.data());
  EXPECT_EQ(s, (std::vector<int32_t>{500, 501, 502, 503, 504}));
  ds.get(2, s.data());
  EXPECT_EQ(s, (std::vector<int32_t>{302, 303, 304, 305, 306}));
  // Unshuffled consecutive samples j, j+1 share one token: check through the shuffle.
  std::vector<std::vector<int32_t>> by_j(11);
  for (int64_t i = 0; i < ds.size(); ++i) {
    by_j[ds.indices().shuffle_index[i]].resize(5);
    ds.get(i, by_j[ds.indices().shuffle_index[i]].data());
  }
  for (int j = 0; j + 1 < 11; ++j) EXPECT_EQ(by_j[j][4], by_j[j + 1][0]) << j;
}

TEST(GptDataset, AbsentSplitErrorNamesSplitAndDataset) {
  const std::string dir = scratch_dir("gpt_absent");
  write_dataset(dir + "/tiny", spec_tiny_sequences());
  auto data = std::make_shared<const IndexedDataset>(dir + "/tiny");
  GptDatasetConfig c = tiny_cfg();
  c.split = "98,2,0";
  expect_error([&] { GptDataset ds(data, Split::test, 5, c); }, {"'test'", dir + "/tiny", "--data-split"});
  c.split = "969,30,1";  // 5 sequences: valid is [5,5), empty, and samples are requested
  expect_error([&] { GptDataset ds(data, Split::valid, 5, c); }, {"'valid'", "holds no tokens"});
}

TEST(GptDataset, CacheIsReusedAndACorruptCacheIsRebuilt) {
  const std::string dir = scratch_dir("gpt_cache");
  write_dataset(dir + "/tiny", spec_tiny_sequences());
  auto data = std::make_shared<const IndexedDataset>(dir + "/tiny");
  GptDatasetConfig c = tiny_cfg();
  c.use_cache = true;
  c.cache_dir = dir + "/cache";
  GptDataset a(data, Split::train, 12, c);
  ASSERT_FALSE(a.cache_path().empty());
  ASSERT_TRUE(std::filesystem::exists(a.cache_path()));
  GptDataset b(data, Split::train, 12, c);
  EXPECT_EQ(b.indices().shuffle_index, a.indices().shuffle_index);
  EXPECT_EQ(b.indices().sample_index, a.indices().sample_index);
  EXPECT_EQ(b.indices().document_index, a.indices().document_index);
  // Different settings -> a different cache entry.
  GptDataset other(data, Split::train, 6, c);
  EXPECT_NE(other.cache_path(), a.cache_path());
  // Corrupt the shuffle index: it must be detected and rebuilt to the same result.
  std::string base = a.cache_path().substr(0, a.cache_path().size() - std::string("-description.txt").size());
  auto bytes = read_bytes(base + "-shuffle_index.npy");
  bytes.resize(bytes.size() - 8);
  write_bytes(base + "-shuffle_index.npy", bytes);
  GptDataset d(data, Split::train, 12, c);
  EXPECT_EQ(d.indices().shuffle_index, a.indices().shuffle_index);
  // The rebuilt cache is whole again.
  EXPECT_EQ(read_bytes(base + "-shuffle_index.npy").size(), bytes.size() + 8);
}

// Beyond the spec's vectors: for many random files and settings, unshuffled sample j must be
// tokens [j*S, j*S + S + 1) of the stream of sequences in document-index order, the document
// index must hold each sequence once per epoch (a separate last epoch on its own), and the shuffle index
// must be a permutation that keeps a separate last epoch apart.
TEST(GptIndices, RandomConfigsSatisfyTheSampleInvariants) {
  std::mt19937 rng(99);
  int separate_seen = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int nseq = 1 + static_cast<int>(rng() % 12);
    std::vector<int32_t> lengths(nseq);
    for (auto& l : lengths) l = static_cast<int32_t>(rng() % 4 == 0 ? 0 : rng() % 20);
    lengths[rng() % nseq] = 1 + static_cast<int32_t>(rng() % 20);  // at least one token
    const int64_t S = 1 + rng() % 9;
    const int64_t N = rng() % 40;
    GptIndices g = build_gpt_indices(lengths, 0, nseq, N, S, true, true, rng(), "random");
    separate_seen += g.separate_last_epoch;
    const int64_t n = g.num_samples();
    ASSERT_GE(n, N);
    std::vector<int32_t> stream;
    for (int32_t d : g.document_index)
      for (int k = 0; k < lengths[d]; ++k) stream.push_back(d * 1000 + k);
    for (int64_t j = 0; j < n; ++j) {
      // Rebuild sample j from the sample index, as GptDataset::get does.
      const int64_t d0 = g.sample_index[2 * j], o0 = g.sample_index[2 * j + 1];
      const int64_t d1 = g.sample_index[2 * j + 2], o1 = g.sample_index[2 * j + 3];
      std::vector<int32_t> got;
      for (int64_t d = d0; d <= d1; ++d) {
        const int32_t seq = g.document_index[d];
        const int64_t from = d == d0 ? o0 : 0, to = d == d1 ? o1 + 1 : lengths[seq];
        for (int64_t k = from; k < to; ++k) got.push_back(seq * 1000 + static_cast<int32_t>(k));
      }
      ASSERT_EQ(got, std::vector<int32_t>(stream.begin() + j * S, stream.begin() + j * S + S + 1)) << "trial " << trial << " sample " << j;
    }
    // All epochs hold each sequence E times; a separate last epoch holds each once.
    std::vector<int> count(nseq, 0), last(nseq, 0);
    for (size_t p = 0; p < g.document_index.size(); ++p) {
      ++count[g.document_index[p]];
      if (static_cast<int64_t>(p) >= (g.epochs - 1) * nseq) ++last[g.document_index[p]];
    }
    for (int i = 0; i < nseq; ++i) {
      ASSERT_EQ(count[i], g.epochs);
      if (g.separate_last_epoch) ASSERT_EQ(last[i], 1);
    }
    std::vector<int64_t> sh = g.shuffle_index;
    if (g.separate_last_epoch) {
      const int64_t A = ((g.epochs - 1) * g.tokens_per_epoch - 1) / S;
      for (int64_t i = 0; i < A; ++i) ASSERT_LT(sh[i], A);
    }
    std::sort(sh.begin(), sh.end());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(sh[i], i);
  }
  EXPECT_GT(separate_seen, 0);
}
