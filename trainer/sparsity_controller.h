// The adaptive sparsity controller (deco-model.md, "Adaptive sparsity regularization"):
// once per optimizer step, rho = active (token, expert) pairs / all pairs over every DECO layer
// and the whole global batch; above target lambda *= m, else lambda = max(lambda / m, lambda0).
#pragma once
#include <cstdint>

namespace decotron {

class SparsityController {
 public:
  SparsityController(double target, double lambda0, double multiplier)
      : target_(target), lambda0_(lambda0), multiplier_(multiplier), lambda_(lambda0) {}
  double lambda() const { return lambda_; }
  void set_lambda(double v) { lambda_ = v; }  // restored from a checkpoint
  double target() const { return target_; }
  // Called once per (non-skipped) optimizer step with the step's global activation ratio.
  void step(double rho) {
    if (rho > target_) lambda_ *= multiplier_;
    else lambda_ = lambda_ / multiplier_ > lambda0_ ? lambda_ / multiplier_ : lambda0_;
  }

 private:
  double target_, lambda0_, multiplier_, lambda_;
};

}  // namespace decotron
