// SentencePiece tokenizer, as Megatron's GPTSentencePieceTokenizer / Llama2Tokenizer use it.
//
// EOD (the id appended after each document with --append-eod, and the only separator
// between documents inside a sample) is the model's EOS id, as in Megatron's
// GPTSentencePieceTokenizer and Llama2Tokenizer. If the model has no EOS (eos_id = -1), we fall
// back as Megatron's _SentencePieceTokenizer does: the piece "<EOD>" if the model has one,
// else a new id one past the model's pieces, which then counts in vocab_size(). bos_id() and
// pad_id() are the model's (-1 when absent); encode() never adds BOS or EOS.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace decotron::data {

class Tokenizer {
 public:
  // Throws decotron::Error naming the file if it cannot be loaded.
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Thread-safe: the processor is immutable after loading.
  std::vector<int32_t> encode(std::string_view text) const;
  // Ids outside the model (the appended EOD) decode to "<EOD>"... ids < 0 or >= vocab_size()
  // are an error.
  std::string decode(std::span<const int32_t> ids) const;
  std::string piece(int32_t id) const;

  int64_t vocab_size() const { return vocab_size_; }
  int32_t eod_id() const { return eod_; }
  int32_t bos_id() const { return bos_; }
  int32_t pad_id() const { return pad_; }
  const std::string& path() const { return path_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string path_;
  int64_t vocab_size_ = 0;
  int32_t eod_ = -1, bos_ = -1, pad_ = -1;
  int32_t pieces_ = 0;
};

struct TokenizerTrainOptions {
  std::vector<std::string> inputs;   // text / jsonl files, optionally .gz (see text_input.h)
  std::string json_key = "text";     // key of the document in JSONL inputs
  std::string model_prefix;          // writes <prefix>.model and <prefix>.vocab
  int vocab_size = 4096;
  std::string model_type = "bpe";    // bpe | unigram
  double character_coverage = 0.9999;
  bool byte_fallback = true;         // unknown characters become byte pieces, never <unk>
  // "identity" (default) keeps text exactly: newlines become byte pieces and runs of spaces
  // survive, as in Llama 2's tokenizer, so a model can learn line structure (rst, code).
  // "nmt_nfkc" is SentencePiece's default: NFKC, and whitespace (including newlines)
  // collapsed to single spaces.
  std::string normalization = "identity";
  int64_t input_sentence_size = 1000000;  // lines sampled for training (caps time and memory)
  int threads = 0;                   // 0: all hardware threads
};

// Trains a SentencePiece model. Inputs are streamed to the trainer line by line through a
// SentenceIterator (so .gz and JSONL need no temporary file); ids: unk 0, bos 1, eos 2, no pad.
void train_tokenizer(const TokenizerTrainOptions& opt);

}  // namespace decotron::data
