// Megatron's indexed dataset: <prefix>.idx (header + per-sequence lengths/pointers + document
// boundaries) and <prefix>.bin (raw tokens). Spec: megatron-data-format.md section 1.
//
// The writer produces files byte-identical to Megatron's MMapIndexedDatasetBuilder. The reader
// memory-maps .bin (zero copy) and copies the .idx arrays out, because they are not aligned
// (the int32 array starts at byte 34). Every structural property is checked at open time in
// O(NS); token values are checked lazily on read (a full scan of a multi-GB .bin at every start
// would be too slow) or in a full `validate_tokens` pass offered by `decotron data inspect`.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

namespace decotron::data {

// numpy dtype codes stored in byte 17 of the .idx (spec table 1.2).
enum class DTypeCode : uint8_t { u8 = 1, i8 = 2, i16 = 3, i32 = 4, i64 = 5, f64 = 6, f32 = 7, u16 = 8 };

// Bytes per item of a dtype code; 0 for an unknown code.
size_t dtype_code_size(uint8_t code);
const char* dtype_code_name(uint8_t code);

// Token dtype for a vocabulary, upstream Megatron's rule: uint16 if vocab_size < 65500, else
// int32. (The DECO fork's preprocess uses < 65535; both give int32 for DECO's 73448. We follow
// upstream so our files are what every Megatron reader expects; the 35 ids in between fit
// uint16 either way, so reading a fork-made file is unaffected.)
DTypeCode token_dtype_for_vocab(int64_t vocab_size);

class IndexedDatasetWriter {
 public:
  // Writes <prefix>.bin/.idx via temporary files renamed into place by finalize(), so a
  // crashed or interrupted run never leaves a truncated dataset that looks complete.
  IndexedDatasetWriter(std::string prefix, DTypeCode dtype);
  ~IndexedDatasetWriter();  // removes the temporaries if finalize() was not called
  IndexedDatasetWriter(const IndexedDatasetWriter&) = delete;
  IndexedDatasetWriter& operator=(const IndexedDatasetWriter&) = delete;

  // One sequence that is also one document (the no-sentence-splitting case).
  void add_document(std::span<const int32_t> tokens);
  // Sentence-level building: sequences, then end_document() closes the current document.
  void add_sequence(std::span<const int32_t> tokens);
  void end_document();
  void finalize();

  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return tokens_; }

 private:
  std::string prefix_;
  DTypeCode dtype_;
  size_t itemsize_;
  std::FILE* bin_ = nullptr;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> doc_idx_{0};
  int64_t tokens_ = 0;
  std::vector<unsigned char> buf_;
  bool finalized_ = false;
};

class IndexedDataset {
 public:
  // Opens and validates <prefix>.idx/.bin. Throws decotron::Error naming the file, the problem
  // and the fix. vocab_size > 0 makes every read() check token ids against it.
  explicit IndexedDataset(std::string prefix, int64_t vocab_size = 0);
  ~IndexedDataset();
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  const std::string& prefix() const { return prefix_; }
  uint8_t dtype_code() const { return dtype_; }
  size_t itemsize() const { return itemsize_; }
  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(doc_idx_.size()) - 1; }
  int64_t num_tokens() const { return total_tokens_; }
  const std::vector<int32_t>& sequence_lengths() const { return lengths_; }
  const std::vector<int64_t>& sequence_pointers() const { return pointers_; }
  const std::vector<int64_t>& document_indices() const { return doc_idx_; }
  bool has_sequence_modes() const { return has_modes_; }

  // Zero-copy view of sequence i's bytes inside the mapped .bin.
  const unsigned char* sequence_bytes(int64_t i) const { return bin_data_ + pointers_[i]; }

  // Copies `count` tokens of sequence `seq` starting at token `offset` into out[0..count),
  // widened to int32. Checks the range, and token ids when a vocab size was given.
  void read(int64_t seq, int64_t offset, int64_t count, int32_t* out) const;

  // Full scan: every token in [0, vocab_size). Throws naming the first bad sequence.
  void validate_tokens(int64_t vocab_size) const;

 private:
  void check_tokens(int64_t seq, int64_t offset, const int32_t* t, int64_t count, int64_t vocab) const;
  std::string prefix_;
  int64_t vocab_size_;
  uint8_t dtype_ = 0;
  size_t itemsize_ = 0;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> pointers_;
  std::vector<int64_t> doc_idx_;
  bool has_modes_ = false;
  int64_t total_tokens_ = 0;
  const unsigned char* bin_data_ = nullptr;
  size_t bin_size_ = 0;
};

}  // namespace decotron::data
