// Wall time per op, for `decotron bench` (kernels benchmarked where they run, through the same
// dispatch the trainer uses). Off by default, when it costs one branch per op call. On CUDA the
// timer synchronizes the stream before and after each op, so the split is exact but the total
// is slower than an unprofiled run: bench reports throughput from an unprofiled pass.
#pragma once
#include <map>
#include <string>

#include "core/backend.h"

namespace decotron::ops {

class OpProfile {
 public:
  static OpProfile& instance();
  void enable(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }
  void record(const char* op, double seconds);
  void reset() { totals_.clear(); calls_.clear(); }
  const std::map<std::string, double>& totals() const { return totals_; }
  const std::map<std::string, long>& calls() const { return calls_; }

 private:
  bool enabled_ = false;
  std::map<std::string, double> totals_;
  std::map<std::string, long> calls_;
};

// The op family a kernel belongs to, for the bench table: gemm, attention, norm, rope, ffn,
// deco_experts, router, loss, embedding, optimizer, elementwise.
const char* op_family(const std::string& op);

// Waits for the device's queued work (a no-op on the CPU): benchmarks time between two of these.
void synchronize(Device device);

class OpTimer {
 public:
  OpTimer(const char* op, Device device);
  ~OpTimer();

 private:
  const char* op_;
  Device device_;
  double start_ = 0;
  bool on_;
};

}  // namespace decotron::ops
