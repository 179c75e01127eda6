// Reading raw documents for `decotron preprocess` and `decotron tokenizer train`.
//
// Which file is what (by extension, after stripping an optional .gz):
//   .jsonl / .json : one JSON object per line; the document is the string under the JSON key
//                    (--json-keys, default "text"). Blank lines are skipped. A line that is not
//                    valid JSON, or lacks the key, is an error naming file:line (upstream
//                    Megatron aborts too; the DECO fork silently skips, which hides wrong keys).
//   anything else  : (.txt, .rst, .md, no extension, ...) the whole file is ONE document.
//                    Megatron's fork treats each line of a text file as a document instead;
//                    for prose such as the kernel docs, a line is not a document, and cutting
//                    there would put an EOD between every two lines.
// .gz files are decompressed on the fly (zlib also reads uncompressed files transparently).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace decotron::data {

class DocumentReader {
 public:
  DocumentReader(std::string path, std::string json_key);
  ~DocumentReader();
  DocumentReader(const DocumentReader&) = delete;
  DocumentReader& operator=(const DocumentReader&) = delete;

  // The next document's text; false at the end of the file. Empty documents are returned
  // (the caller decides to skip them).
  bool next(std::string& text);
  // Bytes of the file on disk consumed so far (compressed bytes for .gz): progress and ETA.
  uint64_t bytes_read() const;
  const std::string& path() const { return path_; }
  bool is_jsonl() const { return jsonl_; }

 private:
  bool read_line(std::string& line);
  std::string path_, key_;
  bool jsonl_;
  void* gz_ = nullptr;  // gzFile
  std::vector<char> buf_;
  size_t pos_ = 0, end_ = 0;
  bool eof_ = false, whole_done_ = false;
  int64_t line_no_ = 0;
};

// Sum of the on-disk sizes of the files (for the progress bar); throws naming a missing file.
uint64_t total_file_bytes(const std::vector<std::string>& paths);

}  // namespace decotron::data
