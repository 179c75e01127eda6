#include "kernels/op_profile.h"

#include <chrono>
#include <cstring>

#ifdef DECOTRON_WITH_CUDA
#include "core/cuda_backend.h"
#endif

namespace decotron::ops {

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
void sync(Device d) {
#ifdef DECOTRON_WITH_CUDA
  if (d == Device::cuda) cuda::synchronize();
#else
  (void)d;
#endif
}
bool starts(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }
}  // namespace

void synchronize(Device device) { sync(device); }

OpProfile& OpProfile::instance() {
  static OpProfile p;
  return p;
}

void OpProfile::record(const char* op, double seconds) {
  totals_[op] += seconds;
  calls_[op] += 1;
}

const char* op_family(const std::string& op) {
  if (starts(op, "linear")) return "gemm";
  if (starts(op, "attention")) return "attention";
  if (starts(op, "rmsnorm")) return "norm";
  if (starts(op, "rope")) return "rope";
  if (starts(op, "swiglu") || starts(op, "mul_")) return "ffn";
  if (starts(op, "grouped_experts") || starts(op, "route_pairs") || starts(op, "combine_pairs") || starts(op, "pairs_to_slots") || starts(op, "normsilu") || starts(op, "expert_scale")) return "deco_experts";
  if (starts(op, "router") || starts(op, "entropy") || starts(op, "l1_reg") || starts(op, "count_")) return "router";
  if (starts(op, "cross_entropy")) return "loss";
  if (starts(op, "embedding")) return "embedding";
  if (starts(op, "adamw") || starts(op, "sum_squares") || starts(op, "has_nonfinite")) return "optimizer";
  return "elementwise";
}

OpTimer::OpTimer(const char* op, Device device) : op_(op), device_(device), on_(OpProfile::instance().enabled()) {
  if (!on_) return;
  sync(device_);
  start_ = now();
}

OpTimer::~OpTimer() {
  if (!on_) return;
  sync(device_);
  OpProfile::instance().record(op_, now() - start_);
}

}  // namespace decotron::ops
