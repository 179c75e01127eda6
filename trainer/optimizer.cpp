#include "trainer/optimizer.h"

#include <array>
#include <cmath>
#include <unordered_map>

#include "kernels/ops.h"

namespace decotron {

AdamW::AdamW(ParameterSet& params, const TrainConfig& cfg, GradientSync* sync)
    : params_(params.all()), cfg_(cfg), sync_(sync && sync->distributed() ? sync : nullptr) {
  std::unordered_map<const Parameter*, size_t> index;
  for (size_t i = 0; i < params_.size(); ++i) index[params_[i]] = i;
  std::vector<std::vector<Segment>> per_param(params_.size());
  std::vector<bool> sharded(params_.size(), false);
  if (sync_) {
    const auto& buffers = sync_->buffers();
    m_shard_.resize(buffers.size());
    v_shard_.resize(buffers.size());
    for (size_t k = 0; k < buffers.size(); ++k) {
      const GradBuffer& buf = *buffers[k];
      if (!buf.distributed()) continue;
      const BufferLayout& l = buf.layout();
      const Tensor& g = buf.grad_shard();
      m_shard_[k] = Tensor::zeros({l.local_numel()}, g.dtype(), g.device());
      v_shard_[k] = Tensor::zeros({l.local_numel()}, g.dtype(), g.device());
      for (const Parameter* p : buf.params()) sharded[index.at(p)] = true;
      for (const BufferLayout::Piece& pc : l.pieces(buf.group().rank())) {
        Parameter* p = buf.params()[pc.param];
        const int64_t n = pc.in_param.size();
        auto local = [&](const Tensor& t) { return t.rows(pc.in_local.begin, n); };
        per_param[index.at(p)].push_back(Segment{index.at(p), pc.in_param.begin,
                                                 p->value.view({p->value.numel()}).rows(pc.in_param.begin, n),
                                                 local(g), local(m_shard_[k]), local(v_shard_[k]),
                                                 static_cast<int>(k)});
      }
    }
  }
  m_.resize(params_.size());
  v_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter* p = params_[i];
    if (sharded[i]) continue;
    m_[i] = Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device());
    v_[i] = Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device());
    if (p->trainable) per_param[i].push_back(Segment{i, 0, p->value, p->grad, m_[i], v_[i], -1});
  }
  for (auto& segs : per_param)
    for (Segment& s : segs) segments_.push_back(std::move(s));
  // The step's launches over every segment at once (kernels/multi_tensor.h).
  std::vector<ops::AdamWTensor> update;
  std::vector<Tensor> grads;
  for (const Segment& s : segments_) {
    update.push_back(ops::AdamWTensor{s.value, s.m, s.v, s.grad, params_[s.param]->weight_decay});
    grads.push_back(s.grad);
  }
  update_ = std::make_unique<ops::MultiTensorAdamW>(std::move(update));
  squares_ = std::make_unique<ops::MultiTensorSquares>(std::move(grads));
}

AdamW::~AdamW() = default;

double AdamW::grad_norm() const {
  // [0]: parameters whole on this rank, [1]: split over the tensor-parallel ranks, [2]: experts
  // split over the expert-parallel ranks (and then the tensor-parallel ones). Shards add theirs
  // per buffer, summed over the buffer's group first.
  std::array<double, 3> here = {0, 0, 0};
  std::vector<std::vector<double>> shards(sync_ ? sync_->buffers().size() : 0, std::vector<double>(3, 0.0));
  const std::vector<double> squares = squares_->compute();  // per segment, one copy to the host
  for (size_t i = 0; i < segments_.size(); ++i) {
    const Segment& s = segments_[i];
    const Parameter& p = *params_[s.param];
    const int kind = p.shard_dim < 0 ? 0 : (ep_ && is_expert_partition(p.partition)) ? 2 : 1;
    const double sq = squares[i];
    if (s.buffer < 0) here[kind] += sq;
    else shards[s.buffer][kind] += sq;
  }
  // Every buffer's group, in buffer order (the same on every rank, even one whose shards of a
  // buffer hold only padding).
  for (size_t k = 0; k < shards.size(); ++k) {
    if (!sync_->buffers()[k]->distributed()) continue;
    sync_->buffers()[k]->group().sum_in_place(shards[k]);
    for (int i = 0; i < 3; ++i) here[i] += shards[k][i];
  }
  here[1] += ep_ ? ep_->sum(here[2]) : here[2];
  if (tp_) here[1] = tp_->sum(here[1]);
  return std::sqrt(here[0] + here[1]);
}

void AdamW::update(double lr, double clip_scale) {
  ++step_;
  // Weight decay where the parameter takes it (AdamWTensor::decay), one launch on CUDA.
  update_->update(ops::AdamWStep{lr, cfg_.adam_beta1, cfg_.adam_beta2, cfg_.adam_eps, cfg_.weight_decay, step_},
                  clip_scale);
  if (sync_) sync_->sync_params();  // each rank updated its shards: make the parameters whole
}

std::vector<AdamW::Moments> AdamW::moments() const {
  std::vector<Moments> out(params_.size());
  for (size_t i = 0; i < params_.size(); ++i)
    if (m_[i].defined()) out[i] = {m_[i], v_[i]};
  if (!sync_) return out;
  std::unordered_map<const Parameter*, size_t> index;
  for (size_t i = 0; i < params_.size(); ++i) index[params_[i]] = i;
  for (size_t k = 0; k < sync_->buffers().size(); ++k) {
    const GradBuffer& buf = *sync_->buffers()[k];
    if (!buf.distributed()) continue;
    const Tensor m = buf.gather(m_shard_[k]), v = buf.gather(v_shard_[k]);
    for (size_t j = 0; j < buf.params().size(); ++j) {
      const Parameter* p = buf.params()[j];
      const Range r = buf.layout().params[j];
      out[index.at(p)] = {m.rows(r.begin, r.size()).view(p->value.shape()),
                          v.rows(r.begin, r.size()).view(p->value.shape())};
    }
  }
  return out;
}

void AdamW::set_moments(size_t i, const Tensor& exp_avg, const Tensor& exp_avg_sq) {
  if (m_[i].defined()) {
    m_[i].copy_from(exp_avg);
    v_[i].copy_from(exp_avg_sq);
    return;
  }
  const int64_t n = params_[i]->value.numel();
  DT_ASSERT(exp_avg.numel() == n && exp_avg_sq.numel() == n, "moments of ", params_[i]->name, " have ",
            exp_avg.numel(), " elements, the parameter ", n);
  for (Segment& s : segments_)
    if (s.param == i) {
      s.m.copy_from(exp_avg.view({n}).rows(s.offset, s.m.numel()));
      s.v.copy_from(exp_avg_sq.view({n}).rows(s.offset, s.v.numel()));
    }
}

}  // namespace decotron
