// Indexed dataset writer/reader: bytes from the spec, round trips, and corruption detection.
#include <gtest/gtest.h>

#include <cstring>

#include "data_test_util.h"

using namespace decotron;
using namespace decotron::data;
using namespace decotron::data::testing;

namespace {

template <class T>
void append(std::vector<unsigned char>& b, T v) {
  unsigned char tmp[sizeof v];
  std::memcpy(tmp, &v, sizeof v);
  b.insert(b.end(), tmp, tmp + sizeof v);
}

std::vector<unsigned char> from_hex(const std::string& hex) {
  std::vector<unsigned char> out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(static_cast<unsigned char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

// The .idx of the spec's tiny dataset, assembled from the spec's section 9 description.
std::vector<unsigned char> spec_idx_bytes() {
  auto b = from_hex("4d4d494449445800" "00" "0100000000000000" "08" "0500000000000000" "0600000000000000");
  for (int32_t l : {5, 3, 7, 2, 6}) append<int32_t>(b, l);
  for (int64_t p : {0, 10, 16, 30, 34}) append<int64_t>(b, p);
  for (int64_t d : {0, 1, 2, 3, 4, 5}) append<int64_t>(b, d);
  return b;
}

}  // namespace

TEST(IndexedDataset, WriterIsByteIdenticalToSpec) {
  const std::string dir = scratch_dir("idx_bytes");
  write_dataset(dir + "/tiny", spec_tiny_sequences());
  const auto idx = read_bytes(dir + "/tiny.idx");
  EXPECT_EQ(idx.size(), 142u);
  EXPECT_EQ(idx, spec_idx_bytes());
  std::vector<unsigned char> bin;
  for (const auto& s : spec_tiny_sequences())
    for (int32_t t : s) append<uint16_t>(bin, static_cast<uint16_t>(t));
  EXPECT_EQ(bin.size(), 46u);
  EXPECT_EQ(read_bytes(dir + "/tiny.bin"), bin);
  EXPECT_FALSE(std::filesystem::exists(dir + "/tiny.bin.tmp"));
}

TEST(IndexedDataset, ReaderRoundTripsBothDtypes) {
  const std::string dir = scratch_dir("idx_rt");
  for (DTypeCode dt : {DTypeCode::u16, DTypeCode::i32}) {
    auto seqs = spec_tiny_sequences({5, 0, 7, 2, 6}, dt == DTypeCode::i32 ? 20000 : 100);
    write_dataset(dir + "/d", seqs, dt);
    IndexedDataset ds(dir + "/d");
    EXPECT_EQ(ds.dtype_code(), static_cast<uint8_t>(dt));
    ASSERT_EQ(ds.num_sequences(), 5);
    EXPECT_EQ(ds.num_documents(), 5);
    EXPECT_EQ(ds.num_tokens(), 20);
    for (int i = 0; i < 5; ++i) {
      std::vector<int32_t> got(seqs[i].size());
      ds.read(i, 0, static_cast<int64_t>(got.size()), got.data());
      EXPECT_EQ(got, seqs[i]);
    }
    int32_t two[2];
    ds.read(2, 3, 2, two);
    EXPECT_EQ(two[0], seqs[2][3]);
    EXPECT_EQ(two[1], seqs[2][4]);
  }
}

TEST(IndexedDataset, SentenceLevelDocumentsAndDtypeRule) {
  EXPECT_EQ(token_dtype_for_vocab(65499), DTypeCode::u16);
  EXPECT_EQ(token_dtype_for_vocab(65500), DTypeCode::i32);
  EXPECT_EQ(token_dtype_for_vocab(73448), DTypeCode::i32);
  const std::string dir = scratch_dir("idx_sent");
  {
    IndexedDatasetWriter w(dir + "/s", DTypeCode::i32);
    std::vector<int32_t> a = {1, 2}, b = {73447};
    w.add_sequence(a);
    w.add_sequence(b);
    w.end_document();
    w.end_document();  // an empty document repeats the boundary
    w.add_document(a);
    w.finalize();
  }
  IndexedDataset ds(dir + "/s");
  EXPECT_EQ(ds.document_indices(), (std::vector<int64_t>{0, 2, 2, 3}));
  EXPECT_EQ(ds.sequence_pointers(), (std::vector<int64_t>{0, 8, 12}));
  int32_t t;
  ds.read(1, 0, 1, &t);
  EXPECT_EQ(t, 73447);
  expect_error([&] { IndexedDatasetWriter w(dir + "/u", DTypeCode::u16); std::vector<int32_t> big = {70000}; w.add_document(big); }, {"70000", "uint16"});
}

TEST(IndexedDataset, TokenIdsCheckedAgainstVocab) {
  const std::string dir = scratch_dir("idx_vocab");
  write_dataset(dir + "/t", spec_tiny_sequences());
  IndexedDataset ok(dir + "/t", 1000);
  int32_t buf[8];
  ok.read(4, 0, 6, buf);
  IndexedDataset small(dir + "/t", 500);
  small.read(3, 0, 2, buf);  // 400, 401 are fine
  expect_error([&] { small.read(4, 0, 6, buf); }, {dir + "/t.bin", "500", "vocabulary"});
  expect_error([&] { ok.validate_tokens(300); }, {dir + "/t.bin", "sequence 2"});
}

TEST(IndexedDataset, EveryCorruptionIsDetectedAndNamesTheFile) {
  const std::string dir = scratch_dir("idx_corrupt");
  const std::string p = dir + "/c";
  write_dataset(p, spec_tiny_sequences());
  const auto idx = read_bytes(p + ".idx"), bin = read_bytes(p + ".bin");
  struct Case {
    const char* what;
    std::vector<unsigned char> idx, bin;
    std::string needle;
  };
  auto patched = [&](size_t off, std::vector<unsigned char> bytes) {
    auto b = idx;
    std::copy(bytes.begin(), bytes.end(), b.begin() + static_cast<long>(off));
    return b;
  };
  auto u64 = [](uint64_t v) { std::vector<unsigned char> b; append(b, v); return b; };
  auto i64 = [](int64_t v) { std::vector<unsigned char> b; append(b, v); return b; };
  auto i32 = [](int32_t v) { std::vector<unsigned char> b; append(b, v); return b; };
  const size_t lens = 34, ptrs = 34 + 4 * 5, docs = 34 + 12 * 5;
  std::vector<Case> cases = {
      {"bad magic", patched(0, {'X'}), bin, "magic"},
      {"version 2", patched(9, u64(2)), bin, "version"},
      {"dtype 9", patched(17, {9}), bin, "dtype code"},
      {"float dtype", patched(17, {7}), bin, "not a token dtype"},
      {"huge NS", patched(18, u64(1ull << 61)), bin, "sequences"},
      {"NS off by one", patched(18, u64(4)), bin, "implies exactly"},
      {"ND off by one", patched(26, u64(7)), bin, "document indices"},
      {"last doc idx", patched(docs + 8 * 5, i64(4)), bin, "last document index"},
      {"first doc idx", patched(docs, i64(1)), bin, "document_indices[0]"},
      {"decreasing doc idx", patched(docs + 8 * 2, i64(0)), bin, "decrease"},
      {"negative length", patched(lens + 4, i32(-3)), bin, "negative length"},
      {"length past bin", patched(lens + 16, i32(7)), bin, "outside"},
      {"pointer past bin", patched(ptrs + 8 * 3, i64(1000)), bin, "outside"},
      {"misaligned pointer", patched(ptrs + 8 * 1, i64(11)), bin, "misaligned"},
      {"truncated idx header", std::vector<unsigned char>(idx.begin(), idx.begin() + 20), bin, "truncated"},
      {"truncated idx body", std::vector<unsigned char>(idx.begin(), idx.end() - 8), bin, "bytes"},
      {"trailing idx bytes", [&] { auto b = idx; b.push_back(0); b.push_back(0); return b; }(), bin, "implies exactly"},
      {"truncated bin", idx, std::vector<unsigned char>(bin.begin(), bin.end() - 2), "truncated"},
      {"empty bin", idx, {}, "outside"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    write_bytes(p + ".idx", c.idx);
    write_bytes(p + ".bin", c.bin);
    const bool bin_problem = c.idx == idx;
    expect_error([&] { IndexedDataset ds(p); }, {bin_problem ? p + ".bin" : p + ".idx", c.needle});
  }
  write_bytes(p + ".idx", idx);
  std::filesystem::remove(p + ".bin");
  expect_error([&] { IndexedDataset ds(p); }, {p + ".bin", "cannot open"});
  expect_error([&] { IndexedDataset ds(dir + "/missing"); }, {dir + "/missing.idx", "--data-prefix"});
}
