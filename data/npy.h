// Minimal .npy (numpy format 1.0) reader/writer for the index caches, so a cache written by
// Decotron can be inspected with numpy.load and arrays keep numpy's descriptors ('<i4' ...).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace decotron::data {

struct NpyArray {
  std::string descr;            // e.g. "<i8"
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;  // C order
};

// Writes atomically: a temporary file in the same directory, then rename.
void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data, size_t nbytes);
// Throws decotron::Error naming the file when it is not a well-formed version-1/2 .npy.
NpyArray read_npy(const std::string& path);

// Writes a whole file atomically (temporary + rename).
void write_file_atomic(const std::string& path, const std::string& contents);

}  // namespace decotron::data
