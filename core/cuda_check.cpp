#include "core/cuda_check.h"

#include <cstdlib>
#include <unistd.h>

namespace decotron {

void device_call_failed(const char* lib, const char* call, const std::string& what, const char* file, int line) {
  throw std::runtime_error(cat(lib, " call failed: ", call, ": ", what, " at ", file, ":", line));
}

std::string rank_and_host() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  if (!rank) rank = std::getenv("PMI_RANK");
  if (!rank) rank = std::getenv("SLURM_PROCID");
  return cat("rank ", rank ? rank : "0", " on ", host);
}

}  // namespace decotron
