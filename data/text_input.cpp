#include "data/text_input.h"

#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace decotron::data {

namespace {
bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
}  // namespace

DocumentReader::DocumentReader(std::string path, std::string json_key) : path_(std::move(path)), key_(std::move(json_key)) {
  std::string base = ends_with(path_, ".gz") ? path_.substr(0, path_.size() - 3) : path_;
  jsonl_ = ends_with(base, ".jsonl") || ends_with(base, ".json");
  gz_ = gzopen(path_.c_str(), "rb");
  if (!gz_) fail("cannot open input ", path_, ": ", std::strerror(errno ? errno : ENOMEM));
  gzbuffer(static_cast<gzFile>(gz_), 1 << 20);
  buf_.resize(1 << 20);
}

DocumentReader::~DocumentReader() {
  if (gz_) gzclose(static_cast<gzFile>(gz_));
}

uint64_t DocumentReader::bytes_read() const {
  const z_off_t off = gzoffset(static_cast<gzFile>(gz_));
  return off < 0 ? 0 : static_cast<uint64_t>(off);
}

bool DocumentReader::read_line(std::string& line) {
  line.clear();
  for (;;) {
    if (pos_ == end_) {
      if (eof_) return !line.empty();
      const int n = gzread(static_cast<gzFile>(gz_), buf_.data(), static_cast<unsigned>(buf_.size()));
      if (n < 0) {
        int code = 0;
        const char* msg = gzerror(static_cast<gzFile>(gz_), &code);
        fail("cannot read ", path_, ": ", msg, ". The file is corrupt or truncated (re-download or re-compress it).");
      }
      if (n == 0) {
        // zlib reports a truncated .gz only through gzerror (Z_BUF_ERROR), not as n < 0.
        int code = Z_OK;
        const char* msg = gzerror(static_cast<gzFile>(gz_), &code);
        if (code != Z_OK)
          fail("cannot read ", path_, ": ", msg, ". The file is corrupt or truncated (re-download or re-compress it).");
        eof_ = true;
        continue;
      }
      pos_ = 0;
      end_ = static_cast<size_t>(n);
    }
    const char* start = buf_.data() + pos_;
    const char* nl = static_cast<const char*>(std::memchr(start, '\n', end_ - pos_));
    if (nl) {
      line.append(start, static_cast<size_t>(nl - start));
      pos_ += static_cast<size_t>(nl - start) + 1;
      ++line_no_;
      return true;
    }
    line.append(start, end_ - pos_);
    pos_ = end_;
  }
}

bool DocumentReader::next(std::string& text) {
  if (!jsonl_) {
    if (whole_done_) return false;
    whole_done_ = true;
    text.clear();
    std::string line;
    bool first = true;
    while (read_line(line)) {
      if (!first) text.push_back('\n');
      text += line;
      first = false;
    }
    return true;
  }
  std::string line;
  while (read_line(line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank line
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail(path_, ":", line_no_, ": not valid JSON (", e.what(), "). Each line of a .jsonl file must be one JSON object; "
           "fix or drop the line, or rename the file to .txt to use it as plain text.");
    }
    auto it = j.is_object() ? j.find(key_) : j.end();
    if (!j.is_object() || it == j.end()) {
      std::string keys;
      if (j.is_object())
        for (auto& [k, v] : j.items()) keys += (keys.empty() ? "" : ", ") + k;
      fail(path_, ":", line_no_, ": no key \"", key_, "\" in this JSON line (keys present: ", keys.empty() ? "none" : keys,
           "). Pass the right key with --json-keys.");
    }
    if (!it->is_string())
      fail(path_, ":", line_no_, ": the value of \"", key_, "\" is not a string; only string documents are supported");
    text = it->get<std::string>();
    return true;
  }
  return false;
}

uint64_t total_file_bytes(const std::vector<std::string>& paths) {
  uint64_t total = 0;
  for (const auto& p : paths) {
    std::error_code ec;
    auto sz = std::filesystem::file_size(p, ec);
    if (ec) fail("cannot read input ", p, ": ", ec.message(), ". Check the --input path.");
    total += sz;
  }
  return total;
}

}  // namespace decotron::data
