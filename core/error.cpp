#include "core/error.h"

namespace decotron {

void assertion_failed(const char* expr, const char* file, int line, const std::string& msg) {
  throw std::logic_error(cat("internal error (a Decotron bug): ", expr, " failed at ", file, ":", line,
                             msg.empty() ? "" : ": ", msg));
}

}  // namespace decotron
