#include "data/indexed_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>

#include "core/error.h"

namespace decotron::data {

static_assert(std::endian::native == std::endian::little,
              "the .idx/.bin arrays are little-endian and are read/written in host order");

namespace {

constexpr unsigned char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
constexpr size_t kHeaderSize = 34;
constexpr const char* kRebuild = "Re-create it with `decotron preprocess` (or Megatron's preprocess_data.py).";

template <class T>
T load(const unsigned char* p) {  // unaligned little-endian load
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
void put(std::vector<unsigned char>& out, T v) {
  unsigned char b[sizeof v];
  std::memcpy(b, &v, sizeof v);
  out.insert(out.end(), b, b + sizeof v);
}

void write_all(std::FILE* f, const void* p, size_t n, const std::string& path) {
  if (n && std::fwrite(p, 1, n, f) != n) fail("cannot write ", path, ": ", std::strerror(errno), ". Check free disk space.");
}

// Maps a whole file read-only. Returns nullptr for an empty file.
const unsigned char* map_file(const std::string& path, size_t* size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open ", path, ": ", std::strerror(errno), ". Check the --data-prefix (it names <prefix>.bin and <prefix>.idx).");
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("cannot stat ", path, ": ", std::strerror(errno));
  }
  *size = static_cast<size_t>(st.st_size);
  if (*size == 0) {
    ::close(fd);
    return nullptr;
  }
  void* p = ::mmap(nullptr, *size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) fail("cannot mmap ", path, ": ", std::strerror(errno));
  return static_cast<const unsigned char*>(p);
}

}  // namespace

size_t dtype_code_size(uint8_t code) {
  switch (code) {
    case 1: case 2: return 1;
    case 3: case 8: return 2;
    case 4: case 7: return 4;
    case 5: case 6: return 8;
    default: return 0;
  }
}

const char* dtype_code_name(uint8_t code) {
  static const char* names[] = {"?", "uint8", "int8", "int16", "int32", "int64", "float64", "float32", "uint16"};
  return code >= 1 && code <= 8 ? names[code] : "unknown";
}

DTypeCode token_dtype_for_vocab(int64_t vocab_size) {
  return vocab_size < 65500 ? DTypeCode::u16 : DTypeCode::i32;
}

// ------------------------------------------------------------------------------------------
// Writer

IndexedDatasetWriter::IndexedDatasetWriter(std::string prefix, DTypeCode dtype)
    : prefix_(std::move(prefix)), dtype_(dtype), itemsize_(dtype_code_size(static_cast<uint8_t>(dtype))) {
  if (dtype != DTypeCode::u16 && dtype != DTypeCode::i32 && dtype != DTypeCode::u8 && dtype != DTypeCode::i64)
    fail("indexed dataset writer: token dtype ", dtype_code_name(static_cast<uint8_t>(dtype)),
         " is not supported; use uint16 or int32");
  std::string tmp = prefix_ + ".bin.tmp";
  bin_ = std::fopen(tmp.c_str(), "wb");
  if (!bin_) fail("cannot create ", tmp, ": ", std::strerror(errno), ". Check that the output directory exists and is writable.");
}

IndexedDatasetWriter::~IndexedDatasetWriter() {
  if (bin_) std::fclose(bin_);
  if (!finalized_) {
    std::remove((prefix_ + ".bin.tmp").c_str());
    std::remove((prefix_ + ".idx.tmp").c_str());
  }
}

void IndexedDatasetWriter::add_sequence(std::span<const int32_t> tokens) {
  DT_ASSERT(!finalized_);
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    fail("a sequence of ", tokens.size(), " tokens does not fit the int32 length field of ", prefix_, ".idx; split the document");
  buf_.resize(tokens.size() * itemsize_);
  unsigned char* p = buf_.data();
  for (int32_t t : tokens) {
    switch (dtype_) {
      case DTypeCode::u16: {
        if (t < 0 || t > 65535) fail("token id ", t, " does not fit uint16 in ", prefix_, ".bin; write with an int32 dtype");
        uint16_t v = static_cast<uint16_t>(t);
        std::memcpy(p, &v, 2);
        break;
      }
      case DTypeCode::u8: {
        if (t < 0 || t > 255) fail("token id ", t, " does not fit uint8 in ", prefix_, ".bin");
        *p = static_cast<unsigned char>(t);
        break;
      }
      case DTypeCode::i64: {
        int64_t v = t;
        std::memcpy(p, &v, 8);
        break;
      }
      default:
        std::memcpy(p, &t, 4);
    }
    p += itemsize_;
  }
  write_all(bin_, buf_.data(), buf_.size(), prefix_ + ".bin.tmp");
  lengths_.push_back(static_cast<int32_t>(tokens.size()));
  tokens_ += static_cast<int64_t>(tokens.size());
}

void IndexedDatasetWriter::end_document() { doc_idx_.push_back(static_cast<int64_t>(lengths_.size())); }

void IndexedDatasetWriter::add_document(std::span<const int32_t> tokens) {
  add_sequence(tokens);
  end_document();
}

void IndexedDatasetWriter::finalize() {
  DT_ASSERT(!finalized_);
  const std::string bin_tmp = prefix_ + ".bin.tmp", idx_tmp = prefix_ + ".idx.tmp";
  if (std::fflush(bin_) != 0 || std::fclose(bin_) != 0) {
    bin_ = nullptr;
    fail("cannot write ", bin_tmp, ": ", std::strerror(errno), ". Check free disk space.");
  }
  bin_ = nullptr;
  const uint64_t ns = lengths_.size(), nd = doc_idx_.size();
  std::vector<unsigned char> idx;
  idx.reserve(kHeaderSize + 12 * ns + 8 * nd);
  idx.insert(idx.end(), kMagic, kMagic + 9);
  put<uint64_t>(idx, 1);
  idx.push_back(static_cast<unsigned char>(dtype_));
  put<uint64_t>(idx, ns);
  put<uint64_t>(idx, nd);
  for (int32_t l : lengths_) put<int32_t>(idx, l);
  // Pointers are the running byte offset, as Megatron computes them.
  int64_t ptr = 0;
  for (int32_t l : lengths_) {
    put<int64_t>(idx, ptr);
    ptr += static_cast<int64_t>(l) * static_cast<int64_t>(itemsize_);
  }
  for (int64_t d : doc_idx_) put<int64_t>(idx, d);
  std::FILE* f = std::fopen(idx_tmp.c_str(), "wb");
  if (!f) fail("cannot create ", idx_tmp, ": ", std::strerror(errno));
  write_all(f, idx.data(), idx.size(), idx_tmp);
  if (std::fclose(f) != 0) fail("cannot write ", idx_tmp, ": ", std::strerror(errno));
  // .bin first: a reader that sees the new .idx always finds the matching .bin.
  if (std::rename(bin_tmp.c_str(), (prefix_ + ".bin").c_str()) != 0 ||
      std::rename(idx_tmp.c_str(), (prefix_ + ".idx").c_str()) != 0)
    fail("cannot rename the finished dataset into ", prefix_, ".{bin,idx}: ", std::strerror(errno));
  finalized_ = true;
}

// ------------------------------------------------------------------------------------------
// Reader

IndexedDataset::IndexedDataset(std::string prefix, int64_t vocab_size)
    : prefix_(std::move(prefix)), vocab_size_(vocab_size) {
  const std::string idx_path = prefix_ + ".idx", bin_path = prefix_ + ".bin";
  size_t isz = 0;
  const unsigned char* idx = map_file(idx_path, &isz);
  // The .idx is copied out and unmapped at once; only .bin stays mapped.
  struct Unmap {
    const unsigned char* p;
    size_t n;
    ~Unmap() { if (p) ::munmap(const_cast<unsigned char*>(p), n); }
  } unmap_idx{idx, isz};

  if (isz < kHeaderSize)
    fail(idx_path, " is truncated: ", isz, " bytes, less than the 34-byte header. ", kRebuild);
  if (std::memcmp(idx, kMagic, 9) != 0)
    fail(idx_path, " is not a Megatron indexed dataset index (bad magic; expected \"MMIDIDX\\0\\0\"). "
         "Check that --data-prefix names the files without the .idx/.bin extension.");
  const uint64_t version = load<uint64_t>(idx + 9);
  if (version != 1) fail(idx_path, ": unsupported .idx version ", version, " (only version 1 exists). ", kRebuild);
  dtype_ = idx[17];
  itemsize_ = dtype_code_size(dtype_);
  if (itemsize_ == 0) fail(idx_path, ": unknown dtype code ", int(dtype_), " at byte 17 (valid codes are 1..8). ", kRebuild);
  if (dtype_ == 6 || dtype_ == 7)
    fail(idx_path, ": dtype ", dtype_code_name(dtype_), " is not a token dtype. This is not a token dataset.");
  const uint64_t ns = load<uint64_t>(idx + 18), nd = load<uint64_t>(idx + 26);
  // Compare counts to the file size before multiplying, so a corrupt count cannot overflow.
  const uint64_t body = isz - kHeaderSize;
  if (ns > body / 12 || nd > body / 8 || 12 * ns + 8 * nd > body)
    fail(idx_path, ": header says ", ns, " sequences and ", nd, " document indices, which need ",
         "more than the file's ", isz, " bytes (truncated or corrupt). ", kRebuild);
  const uint64_t expect = kHeaderSize + 12 * ns + 8 * nd;
  if (isz == expect + ns && ns > 0) {
    has_modes_ = true;  // multimodal files append one int8 mode per sequence (spec 1.1)
  } else if (isz != expect) {
    fail(idx_path, ": file is ", isz, " bytes but the header (", ns, " sequences, ", nd,
         " document indices) implies exactly ", expect, ". The file is corrupt or was not fully written. ", kRebuild);
  }
  if (nd < 1) fail(idx_path, ": the document index array is empty (it must start with 0). ", kRebuild);

  lengths_.resize(ns);
  pointers_.resize(ns);
  doc_idx_.resize(nd);
  if (ns) std::memcpy(lengths_.data(), idx + kHeaderSize, 4 * ns);
  if (ns) std::memcpy(pointers_.data(), idx + kHeaderSize + 4 * ns, 8 * ns);
  std::memcpy(doc_idx_.data(), idx + kHeaderSize + 12 * ns, 8 * nd);

  if (doc_idx_[0] != 0) fail(idx_path, ": document_indices[0] is ", doc_idx_[0], ", must be 0. ", kRebuild);
  for (uint64_t k = 1; k < nd; ++k)
    if (doc_idx_[k] < doc_idx_[k - 1])
      fail(idx_path, ": document_indices decrease at entry ", k, " (", doc_idx_[k - 1], " then ", doc_idx_[k], "). ", kRebuild);
  if (static_cast<uint64_t>(doc_idx_.back()) != ns)
    fail(idx_path, ": the last document index is ", doc_idx_.back(), " but there are ", ns,
         " sequences; they must be equal. The .idx is corrupt. ", kRebuild);

  bin_data_ = map_file(bin_path, &bin_size_);
  for (uint64_t i = 0; i < ns; ++i) {
    const int64_t len = lengths_[i], ptr = pointers_[i];
    if (len < 0) fail(idx_path, ": sequence ", i, " has negative length ", len, ". ", kRebuild);
    if (ptr < 0 || ptr % static_cast<int64_t>(itemsize_) != 0 || static_cast<uint64_t>(ptr) > bin_size_ ||
        static_cast<uint64_t>(len) * itemsize_ > bin_size_ - static_cast<uint64_t>(ptr))
      fail(idx_path, ": sequence ", i, " (byte offset ", ptr, ", ", len, " tokens of ", itemsize_,
           " bytes) lies outside ", bin_path, " (", bin_size_, " bytes) or is misaligned. "
           "The .bin is truncated or does not belong to this .idx. ", kRebuild);
    total_tokens_ += len;
  }
}

IndexedDataset::~IndexedDataset() {
  if (bin_data_) ::munmap(const_cast<unsigned char*>(bin_data_), bin_size_);
}

void IndexedDataset::check_tokens(int64_t seq, int64_t offset, const int32_t* t, int64_t count, int64_t vocab) const {
  for (int64_t k = 0; k < count; ++k)
    if (t[k] < 0 || t[k] >= vocab)
      fail(prefix_, ".bin: token ", t[k], " at sequence ", seq, " position ", offset + k,
           " is outside the tokenizer's vocabulary [0, ", vocab, "). The data was made with a different "
           "tokenizer; preprocess it again with the model's tokenizer.");
}

void IndexedDataset::read(int64_t seq, int64_t offset, int64_t count, int32_t* out) const {
  DT_ASSERT(seq >= 0 && seq < num_sequences(), "sequence ", seq, " of ", num_sequences());
  DT_ASSERT(offset >= 0 && count >= 0 && offset + count <= lengths_[seq], "seq ", seq, " offset ", offset, " count ", count);
  const unsigned char* p = bin_data_ + pointers_[seq] + offset * static_cast<int64_t>(itemsize_);
  switch (dtype_) {
    case 8: for (int64_t k = 0; k < count; ++k) out[k] = load<uint16_t>(p + 2 * k); break;
    case 4: std::memcpy(out, p, 4 * count); break;
    case 1: for (int64_t k = 0; k < count; ++k) out[k] = p[k]; break;
    case 2: for (int64_t k = 0; k < count; ++k) out[k] = static_cast<int8_t>(p[k]); break;
    case 3: for (int64_t k = 0; k < count; ++k) out[k] = load<int16_t>(p + 2 * k); break;
    case 5:
      for (int64_t k = 0; k < count; ++k) {
        int64_t v = load<int64_t>(p + 8 * k);
        if (v < 0 || v > std::numeric_limits<int32_t>::max())
          fail(prefix_, ".bin: int64 token ", v, " at sequence ", seq, " does not fit int32 token ids");
        out[k] = static_cast<int32_t>(v);
      }
      break;
    default: DT_ASSERT(false, "dtype ", int(dtype_));
  }
  if (vocab_size_ > 0) check_tokens(seq, offset, out, count, vocab_size_);
}

void IndexedDataset::validate_tokens(int64_t vocab_size) const {
  std::vector<int32_t> buf;
  for (int64_t i = 0; i < num_sequences(); ++i) {
    buf.resize(lengths_[i]);
    read(i, 0, lengths_[i], buf.data());
    check_tokens(i, 0, buf.data(), lengths_[i], vocab_size);
  }
}

}  // namespace decotron::data
