// The data CLI end to end: preprocess -> data inspect, and errors reported with exit code 1.
#include <gtest/gtest.h>

#include "data_test_util.h"

using namespace decotron::data::testing;

const std::string& tiny_model();  // test_data_tokenizer.cpp

TEST(DataCli, PreprocessThenInspect) {
  const std::string dir = scratch_dir("cli");
  std::ofstream(dir + "/docs.jsonl") << "{\"text\": \"the kernel maps a page table.\"}\n{\"text\": \"the scheduler reads the queue.\"}\n";
  const std::string bin = DECOTRON_BINARY;
  auto [rc, out] = run_command(bin + " preprocess --input " + dir + "/docs.jsonl --output-prefix " + dir + "/d --tokenizer-model " +
                       tiny_model() + " --append-eod --no-progress");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("2 documents"), std::string::npos) << out;
  std::tie(rc, out) = run_command(bin + " data inspect --data-prefix " + dir + "/d --data-split 1 --seq-len 4 --samples 0:2 --tokenizer-model " +
                          tiny_model() + " --validate --cache-dir " + dir + "/cache");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("sample 1: dataset 0"), std::string::npos) << out;
  EXPECT_NE(out.find("covers: doc "), std::string::npos) << out;
  EXPECT_NE(out.find("text: \""), std::string::npos) << out;
  // A user error: exit code 1 and a message naming the split.
  std::tie(rc, out) = run_command(bin + " data inspect --data-prefix " + dir + "/d --split test --data-split 1,0,0 --seq-len 4");
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("split 'test'"), std::string::npos) << out;
}
