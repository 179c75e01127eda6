// SentencePiece wrapper: train a tiny model on text written here, round-trip, special ids.
#include <gtest/gtest.h>
#include <zlib.h>

#include "data/tokenizer.h"
#include "data_test_util.h"

using namespace decotron;
using namespace decotron::data;
using namespace decotron::data::testing;

namespace {

// A few KB of varied sentences from a small vocabulary (deterministic).
std::string tiny_corpus() {
  const char* words[] = {"the", "kernel", "memory", "driver", "page", "table", "lock", "thread", "device", "queue",
                         "scheduler", "interrupt", "buffer", "cache", "file", "system", "reads", "writes", "maps", "frees"};
  std::string s;
  uint32_t x = 12345;
  for (int line = 0; line < 200; ++line) {
    for (int w = 0; w < 8; ++w) {
      x = x * 1103515245u + 12345u;
      s += words[(x >> 16) % 20];
      s += w == 7 ? ".\n" : " ";
    }
  }
  return s;
}

}  // namespace

// Trains once per test binary run; the model lands in a scratch dir.
const std::string& tiny_model() {
  static std::string path = [] {
    const std::string dir = scratch_dir("tok_model");
    {
      std::ofstream(dir + "/a.txt") << tiny_corpus();
      gzFile gz = gzopen((dir + "/b.jsonl.gz").c_str(), "wb");
      std::string line = "{\"text\": \"Ünïcode déjà vu, naïve café.\\nA second line.\"}\n";
      gzwrite(gz, line.data(), static_cast<unsigned>(line.size()));
      gzclose(gz);
    }
    TokenizerTrainOptions o;
    o.inputs = {dir + "/a.txt", dir + "/b.jsonl.gz"};
    o.model_prefix = dir + "/tiny";
    o.vocab_size = 360;
    o.threads = 1;
    train_tokenizer(o);
    return dir + "/tiny.model";
  }();
  return path;
}

TEST(Tokenizer, TrainsAndRoundTrips) {
  Tokenizer t(tiny_model());
  EXPECT_EQ(t.vocab_size(), 360);
  EXPECT_EQ(t.eod_id(), 2);  // the model's EOS
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.pad_id(), -1);
  for (std::string s : {"the kernel maps a page table.", "scheduler interrupt buffer", "naïve café 42 ✓ 日本", "two lines\n  indented  twice\n"}) {
    auto ids = t.encode(s);
    ASSERT_FALSE(ids.empty());
    for (int32_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, t.vocab_size());
      EXPECT_NE(id, 0) << "byte fallback should make <unk> impossible: " << s;
    }
    EXPECT_EQ(t.decode(ids), s);
  }
  // The model learned merges from the corpus: its text compresses, unseen letters do not.
  const std::string line = tiny_corpus().substr(0, tiny_corpus().find('\n'));
  EXPECT_LT(t.encode(line).size(), line.size() / 2) << line;
  EXPECT_GE(t.encode("zqxwv").size(), 5u);
}

TEST(Tokenizer, ErrorsNameTheFile) {
  expect_error([] { Tokenizer t("/nonexistent/dir/m.model"); }, {"/nonexistent/dir/m.model"});
  Tokenizer t(tiny_model());
  std::vector<int32_t> bad = {5, 360};
  expect_error([&] { t.decode(bad); }, {"360", tiny_model()});
  TokenizerTrainOptions o;
  o.inputs = {"/nonexistent/x.txt"};
  o.model_prefix = scratch_dir("tok_bad") + "/m";
  expect_error([&] { train_tokenizer(o); }, {"/nonexistent/x.txt"});
}

#include <sentencepiece_trainer.h>

TEST(Tokenizer, ModelWithoutEosGetsMegatronsAppendedEod) {
  // Megatron's _SentencePieceTokenizer appends <EOD> after the model's pieces when absent.
  const std::string dir = scratch_dir("tok_noeos");
  std::ofstream(dir + "/a.txt") << tiny_corpus();
  const auto st = sentencepiece::SentencePieceTrainer::Train(std::unordered_map<std::string, std::string>{
      {"input", dir + "/a.txt"}, {"model_prefix", dir + "/m"}, {"vocab_size", "300"}, {"model_type", "bpe"},
      {"byte_fallback", "true"}, {"eos_id", "-1"}, {"num_threads", "1"}, {"minloglevel", "2"}});
  ASSERT_TRUE(st.ok()) << st.ToString();
  Tokenizer t(dir + "/m.model");
  EXPECT_EQ(t.eod_id(), 300);
  EXPECT_EQ(t.vocab_size(), 301);
  std::vector<int32_t> ids = t.encode("the kernel");
  ids.push_back(t.eod_id());
  EXPECT_EQ(t.decode(ids), "the kernel<EOD>");
}
