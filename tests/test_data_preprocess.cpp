// preprocess: formats, determinism across worker counts, EOD, errors.
#include <gtest/gtest.h>
#include <zlib.h>

#include <nlohmann/json.hpp>

#include "data/preprocess.h"
#include "data/text_input.h"
#include "data/tokenizer.h"
#include "data_test_util.h"

using namespace decotron;
using namespace decotron::data;
using namespace decotron::data::testing;

const std::string& tiny_model();  // test_data_tokenizer.cpp

namespace {
void write_gz(const std::string& path, const std::string& s) {
  gzFile gz = gzopen(path.c_str(), "wb");
  gzwrite(gz, s.data(), static_cast<unsigned>(s.size()));
  gzclose(gz);
}
}  // namespace

TEST(DataPreprocess, FormatsOrderEodAndWorkerIndependence) {
  const std::string dir = scratch_dir("prep");
  std::string jsonl;
  std::vector<std::string> docs;
  for (int i = 0; i < 3000; ++i) {
    docs.push_back("the kernel " + std::to_string(i) + " maps a page.\nsecond line of doc " + std::to_string(i));
    jsonl += nlohmann::json{{"text", docs.back()}}.dump() + "\n";
    if (i == 10) jsonl += "\n   \n";  // blank lines are skipped
    if (i == 20) jsonl += "{\"text\": \"\", \"id\": 1}\n";  // empty document: skipped
  }
  std::ofstream(dir + "/a.jsonl") << jsonl;
  write_gz(dir + "/b.rst.gz", "Title\n=====\n\nthe whole file is one document.\n");
  std::ofstream(dir + "/c.txt") << "another file, another document";
  Tokenizer tok(tiny_model());
  PreprocessOptions o;
  o.inputs = {dir + "/a.jsonl", dir + "/b.rst.gz", dir + "/c.txt"};
  o.tokenizer_model = tiny_model();
  o.append_eod = true;
  o.progress = false;
  o.workers = 1;
  o.output_prefix = dir + "/w1";
  PreprocessStats s1 = preprocess(o);
  o.workers = 3;
  o.output_prefix = dir + "/w3";
  PreprocessStats s3 = preprocess(o);
  EXPECT_EQ(s1.documents, 3002);
  EXPECT_EQ(s1.skipped_empty, 1);
  EXPECT_EQ(s3.tokens, s1.tokens);
  EXPECT_EQ(read_bytes(dir + "/w1.bin"), read_bytes(dir + "/w3.bin"));
  EXPECT_EQ(read_bytes(dir + "/w1.idx"), read_bytes(dir + "/w3.idx"));

  IndexedDataset ds(dir + "/w3", tok.vocab_size());
  ASSERT_EQ(ds.num_sequences(), 3002);
  EXPECT_EQ(ds.dtype_code(), static_cast<uint8_t>(DTypeCode::u16));
  auto seq = [&](int64_t i) {
    std::vector<int32_t> v(ds.sequence_lengths()[i]);
    ds.read(i, 0, static_cast<int64_t>(v.size()), v.data());
    return v;
  };
  for (int64_t i : {0, 11, 1234, 2999}) {
    auto v = seq(i);
    ASSERT_EQ(v.back(), tok.eod_id());
    v.pop_back();
    EXPECT_EQ(v, tok.encode(docs[i]));
  }
  auto rst = seq(3000);
  rst.pop_back();
  EXPECT_EQ(rst, tok.encode("Title\n=====\n\nthe whole file is one document."));
  EXPECT_EQ(ds.document_indices().back(), 3002);
}

TEST(DataPreprocess, BadInputsAreErrorsNamingFileAndLine) {
  const std::string dir = scratch_dir("prep_bad");
  std::ofstream(dir + "/bad.jsonl") << "{\"text\": \"ok\"}\n{not json\n";
  std::ofstream(dir + "/key.jsonl") << "{\"body\": \"ok\"}\n";
  PreprocessOptions o;
  o.tokenizer_model = tiny_model();
  o.progress = false;
  o.output_prefix = dir + "/out";
  o.inputs = {dir + "/bad.jsonl"};
  expect_error([&] { preprocess(o); }, {dir + "/bad.jsonl:2", "JSON"});
  EXPECT_FALSE(std::filesystem::exists(dir + "/out.idx"));  // nothing half-written is left
  EXPECT_FALSE(std::filesystem::exists(dir + "/out.bin.tmp"));
  o.inputs = {dir + "/key.jsonl"};
  expect_error([&] { preprocess(o); }, {dir + "/key.jsonl:1", "body", "--json-keys"});
  write_gz(dir + "/trunc.txt.gz", std::string(100000, 'a'));
  auto b = read_bytes(dir + "/trunc.txt.gz");
  b.resize(b.size() / 2);
  write_bytes(dir + "/trunc.txt.gz", b);
  o.inputs = {dir + "/trunc.txt.gz"};
  expect_error([&] { preprocess(o); }, {dir + "/trunc.txt.gz"});
}
