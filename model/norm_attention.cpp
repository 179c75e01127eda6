// RMSNorm and attention layers: forward and backward written out in order.
#include "model/layers.h"

namespace decotron {

RMSNormLayer::RMSNormLayer(ParameterSet& ps, const std::string& name, int64_t hidden, double eps,
                           bool sequence_parallel)
    : w_(ps.add(name + ".weight", {hidden}, Partition::replicated, Init::ones, 1.0, /*decay=*/false)), eps_(eps) {
  w_.sequence_parallel = sequence_parallel;
}

Tensor RMSNormLayer::forward(const Tensor& x) {
  x_ = x;
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  rstd_ = Tensor::empty({x.numel() / x.dim(-1)}, stats_dtype(x.dtype()), x.device());
  ops::rmsnorm_forward(y, rstd_, x, w_.w(), eps_);
  return y;
}

Tensor RMSNormLayer::backward(const Tensor& dy) {
  Tensor dx = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  ops::rmsnorm_backward(dx, w_.grad, dy, x_, w_.w(), rstd_);
  return dx;
}

AttentionLayer::AttentionLayer(ParameterSet& ps, const std::string& name, const ModelConfig& cfg, Communicator* tp)
    : wq_(ps.add(name + ".wq", {cfg.hidden, cfg.hidden}, Partition::column, Init::normal, cfg.init_std, true)),
      wk_(ps.add(name + ".wk",
                 {(cfg.kv_heads ? cfg.kv_heads : cfg.heads) * (cfg.hidden / cfg.heads), cfg.hidden},
                 Partition::column, Init::normal, cfg.init_std, true)),
      wv_(ps.add(name + ".wv",
                 {(cfg.kv_heads ? cfg.kv_heads : cfg.heads) * (cfg.hidden / cfg.heads), cfg.hidden},
                 Partition::column, Init::normal, cfg.init_std, true)),
      wo_(ps.add(name + ".wo", {cfg.hidden, cfg.hidden}, Partition::row, Init::normal, cfg.init_std, true)),
      tp_(tp && tp->size() > 1 ? tp : nullptr),
      heads_(cfg.heads),
      kv_heads_(cfg.kv_heads ? cfg.kv_heads : cfg.heads),
      head_dim_(cfg.hidden / cfg.heads),
      rope_base_(cfg.rope_base) {
  if (tp_) {
    if (heads_ % tp_->size() != 0 || kv_heads_ % tp_->size() != 0)
      fail("model.heads = ", heads_, " and kv_heads = ", kv_heads_, " must be multiples of parallel.tensor = ",
           tp_->size(), " (attention splits whole heads)");
    heads_ /= tp_->size(), kv_heads_ /= tp_->size();
  }
}

Tensor AttentionLayer::forward(const Tensor& x, const BatchShape& bs) {
  bs_ = bs;
  x_ = x;
  const int64_t T = bs.tokens();
  auto make = [&](int64_t cols) { return Tensor::empty({T, cols}, x.dtype(), x.device()); };
  q_ = make(heads_ * head_dim_);
  k_ = make(kv_heads_ * head_dim_);
  v_ = make(kv_heads_ * head_dim_);
  ops::linear_forward(q_, x, wq_.w());
  ops::linear_forward(k_, x, wk_.w());
  ops::linear_forward(v_, x, wv_.w());
  ops::rope_forward(q_, q_, bs.batch, bs.seq, heads_, head_dim_, rope_base_);
  ops::rope_forward(k_, k_, bs.batch, bs.seq, kv_heads_, head_dim_, rope_base_);
  o_ = make(heads_ * head_dim_);
  lse_ = Tensor::empty({bs.batch, heads_, bs.seq}, stats_dtype(x.dtype()), x.device());
  ops::attention_forward(o_, lse_, q_, k_, v_, {bs.batch, bs.seq, heads_, kv_heads_, head_dim_});
  Tensor y = make(wo_.value.dim(0));
  ops::linear_forward(y, o_, wo_.w());  // under tp: this rank's heads' partial sum (the block reduces)
  return y;
}

Tensor AttentionLayer::backward(const Tensor& dy) {
  Tensor dO = Tensor::empty(o_.shape(), dy.dtype(), dy.device());
  ops::linear_backward(&dO, &wo_.grad, dy, o_, wo_.w());
  Tensor dq = Tensor::empty(q_.shape(), dy.dtype(), dy.device());
  Tensor dk = Tensor::empty(k_.shape(), dy.dtype(), dy.device());
  Tensor dv = Tensor::empty(v_.shape(), dy.dtype(), dy.device());
  ops::attention_backward(dq, dk, dv, dO, q_, k_, v_, o_, lse_, {bs_.batch, bs_.seq, heads_, kv_heads_, head_dim_});
  ops::rope_backward(dq, dq, bs_.batch, bs_.seq, heads_, head_dim_, rope_base_);
  ops::rope_backward(dk, dk, bs_.batch, bs_.seq, kv_heads_, head_dim_, rope_base_);
  Tensor dx = Tensor::empty(x_.shape(), dy.dtype(), dy.device());
  ops::linear_backward(&dx, &wq_.grad, dq, x_, wq_.w(), false);
  ops::linear_backward(&dx, &wk_.grad, dk, x_, wk_.w(), true);
  ops::linear_backward(&dx, &wv_.grad, dv, x_, wv_.w(), true);  // under tp: partial (x fed every rank's heads)
  return dx;
}

}  // namespace decotron
