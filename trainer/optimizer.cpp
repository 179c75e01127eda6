#include "trainer/optimizer.h"

#include <cmath>

#include "kernels/ops.h"

namespace decotron {

AdamW::AdamW(ParameterSet& params, const TrainConfig& cfg) : params_(params.all()), cfg_(cfg) {
  for (Parameter* p : params_) {
    m_.push_back(Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device()));
    v_.push_back(Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device()));
  }
}

double AdamW::grad_norm() const {
  // Whole on this rank; split over the tensor-parallel ranks; experts split over the
  // expert-parallel ranks and then the tensor-parallel ones.
  double s = 0, split = 0, experts = 0;
  for (Parameter* p : params_) {
    if (!p->trainable) continue;
    const double ss = ops::sum_squares(p->grad);
    if (p->shard_dim < 0) s += ss;
    else if (ep_ && is_expert_partition(p->partition)) experts += ss;
    else split += ss;
  }
  if (ep_) split += ep_->sum(experts);
  if (tp_) split = tp_->sum(split);
  return std::sqrt(s + split);
}

bool AdamW::grads_finite() const {
  for (Parameter* p : params_)
    if (p->trainable && ops::has_nonfinite(p->grad)) return false;
  return true;
}

void AdamW::update(double lr, double clip_scale) {
  ++step_;
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter* p = params_[i];
    if (!p->trainable) continue;
    ops::AdamWStep s{lr, cfg_.adam_beta1, cfg_.adam_beta2, cfg_.adam_eps, p->weight_decay ? cfg_.weight_decay : 0.0,
                     step_};
    ops::adamw_update(p->value, m_[i], v_[i], p->grad, s, clip_scale);
  }
}

}  // namespace decotron
