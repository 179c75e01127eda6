#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <thread>
#include <unordered_map>

#include "core/error.h"
#include "data/text_input.h"

namespace decotron::data {

Tokenizer::Tokenizer(const std::string& model_path)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()), path_(model_path) {
  const auto st = sp_->Load(model_path);
  if (!st.ok())
    fail("cannot load SentencePiece model ", model_path, ": ", st.ToString(),
         ". Pass a .model file written by `decotron tokenizer train` or spm_train.");
  pieces_ = sp_->GetPieceSize();
  vocab_size_ = pieces_;
  bos_ = sp_->bos_id();
  pad_ = sp_->pad_id();
  eod_ = sp_->eos_id();
  if (eod_ < 0) {
    const int eod_piece = sp_->PieceToId("<EOD>");
    if (eod_piece != sp_->unk_id() || sp_->IdToPiece(sp_->unk_id()) == "<EOD>") {
      eod_ = eod_piece;
    } else {
      eod_ = pieces_;  // Megatron's _SentencePieceTokenizer appends <EOD> after the model's pieces
      vocab_size_ = pieces_ + 1;
    }
  }
}

Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto st = sp_->Encode(absl::string_view(text.data(), text.size()), &ids);
  if (!st.ok()) fail("SentencePiece encode failed with ", path_, ": ", st.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string Tokenizer::piece(int32_t id) const {
  if (id == eod_ && id >= pieces_) return "<EOD>";
  if (id < 0 || id >= pieces_) fail("token id ", id, " is outside the vocabulary of ", path_, " (", vocab_size_, " ids)");
  return sp_->IdToPiece(id);
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  // Decode runs of model ids; an appended EOD outside the model is written as "<EOD>".
  std::string out;
  std::vector<int> run;
  auto flush = [&] {
    if (run.empty()) return;
    std::string s;
    const auto st = sp_->Decode(run, &s);
    if (!st.ok()) fail("SentencePiece decode failed with ", path_, ": ", st.ToString());
    out += s;
    run.clear();
  };
  for (int32_t id : ids) {
    if (id == eod_ && id >= pieces_) {
      flush();
      out += "<EOD>";
      continue;
    }
    if (id < 0 || id >= pieces_) fail("token id ", id, " is outside the vocabulary of ", path_, " (", vocab_size_, " ids)");
    run.push_back(id);
  }
  flush();
  return out;
}

namespace {

// Streams every line of every input document to the trainer.
class InputSentences : public sentencepiece::SentenceIterator {
 public:
  InputSentences(const std::vector<std::string>& inputs, std::string key) : inputs_(inputs), key_(std::move(key)) { Next(); }
  bool done() const override { return done_; }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override {
    if (error_.empty()) return sentencepiece::util::Status();
    return sentencepiece::util::Status(sentencepiece::util::StatusCode::kInternal, error_);
  }
  void Next() override {
    try {
      for (;;) {
        if (line_pos_ < doc_.size()) {
          size_t nl = doc_.find('\n', line_pos_);
          if (nl == std::string::npos) nl = doc_.size();
          value_ = doc_.substr(line_pos_, nl - line_pos_);
          line_pos_ = nl + 1;
          if (value_.find_first_not_of(" \t\r") == std::string::npos) continue;
          return;
        }
        if (reader_ && reader_->next(doc_)) {
          line_pos_ = 0;
          continue;
        }
        if (file_ == inputs_.size()) {
          done_ = true;
          return;
        }
        reader_ = std::make_unique<DocumentReader>(inputs_[file_++], key_);
        doc_.clear();
        line_pos_ = 0;
      }
    } catch (const Error& e) {
      error_ = e.what();
      done_ = true;
    }
  }

 private:
  const std::vector<std::string>& inputs_;
  std::string key_;
  size_t file_ = 0, line_pos_ = 0;
  std::unique_ptr<DocumentReader> reader_;
  std::string doc_, value_, error_;
  bool done_ = false;
};

}  // namespace

void train_tokenizer(const TokenizerTrainOptions& opt) {
  if (opt.inputs.empty()) fail("tokenizer train: no --input files given");
  if (opt.model_prefix.empty()) fail("tokenizer train: --model-prefix is required");
  if (opt.vocab_size < 16) fail("tokenizer train: --vocab-size ", opt.vocab_size, " is too small");
  if (opt.model_type != "bpe" && opt.model_type != "unigram")
    fail("tokenizer train: --model-type must be bpe or unigram, got ", opt.model_type);
  if (opt.normalization != "identity" && opt.normalization != "nmt_nfkc")
    fail("tokenizer train: --normalization must be identity or nmt_nfkc, got ", opt.normalization);
  total_file_bytes(opt.inputs);  // fail early on a missing file
  const int threads = opt.threads > 0 ? opt.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::unordered_map<std::string, std::string> kw = {
      {"model_prefix", opt.model_prefix},
      {"vocab_size", std::to_string(opt.vocab_size)},
      {"model_type", opt.model_type},
      {"character_coverage", std::to_string(opt.character_coverage)},
      {"byte_fallback", opt.byte_fallback ? "true" : "false"},
      {"input_sentence_size", std::to_string(opt.input_sentence_size)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(threads)},
      {"unk_id", "0"}, {"bos_id", "1"}, {"eos_id", "2"}, {"pad_id", "-1"},
      // Split digits so numbers do not eat vocabulary; keeps the model small-vocab friendly.
      {"split_digits", "true"},
      {"normalization_rule_name", opt.normalization},
      {"remove_extra_whitespaces", opt.normalization == "identity" ? "false" : "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"minloglevel", "1"},
  };
  InputSentences it(opt.inputs, opt.json_key);
  const auto st = sentencepiece::SentencePieceTrainer::Train(kw, &it);
  if (!it.status().ok()) fail("tokenizer train: ", it.status().ToString());
  if (!st.ok()) fail("tokenizer train: SentencePiece failed: ", st.ToString());
}

}  // namespace decotron::data
