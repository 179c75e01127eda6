// Errors. Two kinds:
//  - decotron::Error: something the user can fix (a config key, a data file, a flag).
//    The message names the file/key and says what to do. `decotron` prints it and exits 1.
//  - DT_ASSERT: an internal invariant; a failure is a bug in Decotron, reported with file:line.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace decotron {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Concatenates its arguments with operator<< (g++ 12 has no <format>).
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(cat(args...));
}

[[noreturn]] void assertion_failed(const char* expr, const char* file, int line, const std::string& msg);

}  // namespace decotron

#define DT_ASSERT(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond)) ::decotron::assertion_failed(#cond, __FILE__, __LINE__, ::decotron::cat("", ##__VA_ARGS__)); \
  } while (0)
