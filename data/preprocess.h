// `decotron preprocess`: raw documents -> Megatron .bin/.idx (one sequence = one document, as
// without --split-sentences). Tokenization runs on worker threads; the output order is the
// input order regardless of the worker count, so the files are byte-identical for any N.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace decotron::data {

struct PreprocessOptions {
  std::vector<std::string> inputs;  // processed in this order (see text_input.h for formats)
  std::string output_prefix;        // writes exactly <output_prefix>.bin/.idx
  std::string tokenizer_model;      // SentencePiece .model
  std::string json_key = "text";    // key of the document in JSONL inputs
  bool append_eod = false;          // append the tokenizer's EOD id to every document
  int workers = 0;                  // tokenizer threads; 0: all hardware threads
  bool progress = true;             // live progress line on stderr
};

struct PreprocessStats {
  int64_t documents = 0;       // written
  int64_t skipped_empty = 0;   // documents that tokenized to nothing (not written, as DECO's fork)
  int64_t tokens = 0;
  uint64_t input_bytes = 0;
  double seconds = 0;
};

PreprocessStats preprocess(const PreprocessOptions& opt);

}  // namespace decotron::data
