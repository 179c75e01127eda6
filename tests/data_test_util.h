// Helpers shared by the data tests: a scratch directory and the spec's tiny dataset.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/indexed_dataset.h"

namespace decotron::data::testing {

inline std::string scratch_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("decotron_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

inline std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::vector<unsigned char>& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Spec section 9: sequences of lengths 5 3 7 2 6; sequence i holds 100(i+1)+k.
inline std::vector<std::vector<int32_t>> spec_tiny_sequences(std::vector<int> lengths = {5, 3, 7, 2, 6},
                                                             int base = 100) {
  std::vector<std::vector<int32_t>> seqs;
  for (size_t i = 0; i < lengths.size(); ++i) {
    std::vector<int32_t> s;
    for (int k = 0; k < lengths[i]; ++k) s.push_back(base * static_cast<int>(i + 1) + k);
    seqs.push_back(s);
  }
  return seqs;
}

inline void write_dataset(const std::string& prefix, const std::vector<std::vector<int32_t>>& seqs,
                          DTypeCode dtype = DTypeCode::u16) {
  IndexedDatasetWriter w(prefix, dtype);
  for (const auto& s : seqs) w.add_document(s);
  w.finalize();
}

// Runs a shell command, returns (exit code, stdout+stderr).
inline std::pair<int, std::string> run_command(const std::string& cmd) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int st = pclose(p);
  return {WEXITSTATUS(st), out};
}

// Runs f, expects a decotron::Error whose message contains every needle.
template <class F>
void expect_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected decotron::Error mentioning " << needles[0];
  } catch (const Error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "message: " << e.what() << "\nmissing: " << n;
  }
}

}  // namespace decotron::data::testing
