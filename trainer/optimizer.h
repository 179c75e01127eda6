// AdamW with decoupled weight decay over a ParameterSet, global-norm clipping, and the
// gradient-norm statistics the step-skipping rule needs. Optimizer state (m, v) is fp32 like
// the master weights.
#pragma once
#include <vector>

#include "core/config.h"
#include "model/parameter.h"
#include "parallel/communicator.h"

namespace decotron {

class AdamW {
 public:
  AdamW(ParameterSet& params, const TrainConfig& cfg);
  // Tensor parallelism: the split parameters' squares are summed over this group in grad_norm().
  void set_tensor_parallel(Communicator* tp) { tp_ = tp && tp->size() > 1 ? tp : nullptr; }
  void set_expert_parallel(Communicator* ep) { ep_ = ep && ep->size() > 1 ? ep : nullptr; }
  // sqrt(sum of squares of every trainable gradient), of the whole tensors
  double grad_norm() const;
  bool grads_finite() const;
  // One update at learning rate lr; gradients are scaled by `clip_scale` first. Increments step().
  void update(double lr, double clip_scale);
  int64_t step() const { return step_; }
  void set_step(int64_t s) { step_ = s; }
  // State tensors for checkpoints: m and v of parameter i.
  Tensor& exp_avg(size_t i) { return m_[i]; }
  Tensor& exp_avg_sq(size_t i) { return v_[i]; }
  const std::vector<Parameter*>& params() const { return params_; }

 private:
  std::vector<Parameter*> params_;
  std::vector<Tensor> m_, v_;
  TrainConfig cfg_;
  int64_t step_ = 0;
  Communicator* tp_ = nullptr;
  Communicator* ep_ = nullptr;
};

}  // namespace decotron
