#include "data/npy.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <regex>

#include "core/error.h"

namespace decotron::data {

namespace {
std::string temp_name(const std::string& path) { return cat(path, ".tmp.", ::getpid()); }

void write_atomic(const std::string& path, const std::string& head, const void* data, size_t n) {
  const std::string tmp = temp_name(path);
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail("cannot create ", tmp, ": ", std::strerror(errno));
  bool ok = std::fwrite(head.data(), 1, head.size(), f) == head.size() && (n == 0 || std::fwrite(data, 1, n, f) == n);
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail("cannot write ", path, ": ", std::strerror(errno));
  }
}
}  // namespace

void write_file_atomic(const std::string& path, const std::string& contents) {
  write_atomic(path, contents, nullptr, 0);
}

void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data, size_t nbytes) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += cat(shape[i], shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
  s += ")";
  std::string dict = cat("{'descr': '", descr, "', 'fortran_order': False, 'shape': ", s, ", }");
  // Pad with spaces so the data starts at a multiple of 64 bytes, ending in '\n' (numpy >= 1.x).
  size_t total = 10 + dict.size() + 1;
  size_t padded = (total + 63) / 64 * 64;
  dict.append(padded - total, ' ');
  dict.push_back('\n');
  std::string head = std::string("\x93NUMPY\x01\x00", 8);
  uint16_t hl = static_cast<uint16_t>(dict.size());
  head.push_back(static_cast<char>(hl & 0xff));
  head.push_back(static_cast<char>(hl >> 8));
  head += dict;
  write_atomic(path, head, data, nbytes);
}

NpyArray read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open ", path, ": ", std::strerror(errno));
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const char* bad = " is not a valid .npy index cache file; delete it and it will be rebuilt";
  if (all.size() < 10 || all.compare(0, 6, "\x93NUMPY") != 0) fail(path, bad);
  const int major = static_cast<unsigned char>(all[6]);
  size_t hl, off;
  if (major == 1) {
    hl = static_cast<unsigned char>(all[8]) | (static_cast<size_t>(static_cast<unsigned char>(all[9])) << 8);
    off = 10;
  } else if (major == 2 || major == 3) {
    if (all.size() < 12) fail(path, bad);
    uint32_t v;
    std::memcpy(&v, all.data() + 8, 4);
    hl = v;
    off = 12;
  } else {
    fail(path, bad);
  }
  if (all.size() < off + hl) fail(path, bad);
  const std::string dict = all.substr(off, hl);
  std::smatch m;
  NpyArray a;
  if (!std::regex_search(dict, m, std::regex("'descr':\\s*'([^']*)'"))) fail(path, bad);
  a.descr = m[1];
  if (dict.find("'fortran_order': False") == std::string::npos) fail(path, bad);
  if (!std::regex_search(dict, m, std::regex("'shape':\\s*\\(([^)]*)\\)"))) fail(path, bad);
  std::string shape = m[1];
  std::regex num("[0-9]+");
  size_t count = 1;
  for (auto it = std::sregex_iterator(shape.begin(), shape.end(), num); it != std::sregex_iterator(); ++it) {
    a.shape.push_back(std::stoll(it->str()));
    count *= static_cast<size_t>(a.shape.back());
  }
  size_t item = a.descr.size() >= 3 ? static_cast<size_t>(std::stoi(a.descr.substr(2))) : 0;
  if (item == 0 || all.size() - off - hl != count * item) fail(path, bad, " (size does not match its header)");
  a.bytes.assign(all.begin() + static_cast<std::ptrdiff_t>(off + hl), all.end());
  return a;
}

}  // namespace decotron::data
