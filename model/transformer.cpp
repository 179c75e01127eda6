#include "model/transformer.h"

#include <algorithm>

#include "parallel/vocab_parallel_cross_entropy.h"

namespace decotron {

TransformerBlock::TransformerBlock(ParameterSet& ps, int index, const ModelConfig& cfg, bool deco_ffn,
                                   const TensorParallelMappings& tp, Communicator* ep)
    : tp_(tp),
      norm1_(ps, cat("layers.", index, ".attn_norm"), cfg.hidden, cfg.norm_eps, tp.sequence_parallel),
      norm2_(ps, cat("layers.", index, ".ffn_norm"), cfg.hidden, cfg.norm_eps, tp.sequence_parallel),
      attn_(ps, cat("layers.", index, ".attn"), cfg, tp.tp) {
  if (deco_ffn)
    deco_ = std::make_unique<DecoFFNLayer>(ps, cat("layers.", index, ".ffn"), cfg, tp.tp, ep);
  else
    dense_ = std::make_unique<SwiGLULayer>(ps, cat("layers.", index, ".ffn"), cfg.hidden, cfg.ffn_hidden, cfg.init_std);
}

Tensor TransformerBlock::forward(const Tensor& x, const BatchShape& bs, const RegularizerSpec& reg,
                                 RoutingStats* stats, double& reg_loss) {
  Tensor y = forward_layers(x, bs, reg, stats, reg_loss, /*drop_gathered=*/!recompute_);
  if (recompute_) {
    x_in_ = x, bs_ = bs, reg_ = reg;
    norm1_.release(), norm2_.release(), attn_.release();
    if (deco_) deco_->release();
    if (dense_) dense_->release();
  }
  return y;
}

Tensor TransformerBlock::forward_layers(const Tensor& x, const BatchShape& bs, const RegularizerSpec& reg,
                                        RoutingStats* stats, double& reg_loss, bool drop_gathered) {
  // x1 = x + Attn(RMSNorm(x)); x2 = x1 + FFN(RMSNorm(x1)). enter/exit are the identity on one
  // rank, the tensor-parallel reductions otherwise (parallel/tensor_parallel.h).
  Tensor n1 = norm1_.forward(x);
  Tensor x1 = tp_.exit(attn_.forward(tp_.enter(n1), bs));
  ops::add_(x1, x);
  Tensor n2 = norm2_.forward(x1);
  Tensor h2 = tp_.enter(n2);
  Tensor x2 = tp_.exit(deco_ ? deco_->forward(h2, reg, *stats, reg_loss) : dense_->forward(h2));
  ops::add_(x2, x1);
  if (tp_.sequence_parallel && drop_gathered) {
    // Keep this rank's tokens only; backward gathers them again (one all-gather per region).
    n1_ = n1, n2_ = n2;
    attn_.drop_input();
    if (deco_) deco_->drop_input();
    else dense_->drop_input();
  }
  return x2;
}

Tensor TransformerBlock::backward(const Tensor& dy, double loss_scale) {
  if (recompute_) {
    // The same forward again (deterministic; under tensor and expert parallelism every rank
    // recomputes, so the collectives stay in the same order on all of them).
    DT_ASSERT(x_in_.defined(), "TransformerBlock::backward without a forward");
    RoutingStats stats;
    double reg_loss = 0;
    forward_layers(x_in_, bs_, reg_, &stats, reg_loss, /*drop_gathered=*/false);
    x_in_ = Tensor();
  }
  Tensor dffn = tp_.exit_backward(dy);
  if (n2_.defined()) {
    const Tensor h2 = tp_.enter(n2_);
    if (deco_) deco_->restore_input(h2);
    else dense_->restore_input(h2);
    n2_ = Tensor();
  }
  Tensor dh2 = tp_.enter_backward(deco_ ? deco_->backward(dffn, loss_scale) : dense_->backward(dffn));
  Tensor dx1 = norm2_.backward(dh2);
  ops::add_(dx1, dy);
  Tensor dattn = tp_.exit_backward(dx1);
  if (n1_.defined()) {
    attn_.restore_input(tp_.enter(n1_));
    n1_ = Tensor();
  }
  Tensor dx = norm1_.backward(tp_.enter_backward(attn_.backward(dattn)));
  ops::add_(dx, dx1);
  return dx;
}

Transformer::Transformer(const ModelConfig& cfg, DType dtype, Device device, Communicator* tp, Communicator* ep,
                         bool sequence_parallel)
    : cfg_(cfg),
      tp_(tp && tp->size() > 1 ? tp : nullptr),
      ep_(ep && ep->size() > 1 ? ep : nullptr),
      tpm_{tp_, sequence_parallel},
      params_(dtype, device, tp_ ? tp_->rank() : 0, tp_ ? tp_->size() : 1, ep_ ? ep_->rank() : 0,
              ep_ ? ep_->size() : 1),
      embedding_(params_.add("embedding.weight", {cfg.vocab_size, cfg.hidden}, Partition::vocab, Init::normal,
                             cfg.init_std, true)) {
  // As Megatron-Core's ModelParallelConfig: the token split needs a tensor-parallel group.
  if (sequence_parallel && !tp_)
    fail("parallel.sequence: sequence parallelism splits the tokens over the tensor-parallel ranks and needs "
         "parallel.tensor > 1; set parallel.sequence: false");
  for (int i = 0; i < cfg.layers; ++i) {
    bool deco = cfg.arch == "deco" && i >= cfg.dense_layers;
    block_first_param_.push_back(params_.all().size());
    blocks_.push_back(std::make_unique<TransformerBlock>(params_, i, cfg, deco, tpm_, ep_));
    if (deco) deco_ids_.push_back(i);
  }
  num_deco_ = static_cast<int>(deco_ids_.size());
  final_norm_first_param_ = params_.all().size();
  final_norm_ = std::make_unique<RMSNormLayer>(params_, "final_norm", cfg.hidden, cfg.norm_eps, sequence_parallel);
  lm_head_param_ = params_.all().size();
  lm_head_ = &params_.add("lm_head.weight", {cfg.vocab_size, cfg.hidden}, Partition::vocab, Init::normal,
                          cfg.init_std, true);
}

void Transformer::check_token_split(const BatchShape& bs) const {
  if (tpm_.sequence_parallel && bs.tokens() % tp_->size() != 0)
    fail("parallel.sequence: the micro-batch's ", bs.batch, " x ", bs.seq, " = ", bs.tokens(),
         " tokens do not split over parallel.tensor = ", tp_->size(), " ranks; pick train.micro_batch and "
         "model.seq_len whose product is a multiple of parallel.tensor");
}

Tensor Transformer::trunk_forward(const Tensor& tokens, const BatchShape& bs, const RegularizerSpec& reg,
                                  ForwardResult* res) {
  tokens_ = tokens;
  bs_ = bs;
  need_params(block_first_param_.empty() ? final_norm_first_param_ : block_first_param_[0]);
  // Activations in the compute dtype (the embedding's compute copy's).
  Tensor x = Tensor::empty({bs.tokens(), cfg_.hidden}, embedding_.w().dtype(), params_.device());
  if (tp_) {
    check_token_split(bs);
    // Vocabulary-parallel embedding: each rank looks up the ids in its range, the sum is the
    // lookup (all-reduced; reduce-scattered to this rank's tokens under sequence parallelism).
    vocab_embedding_forward(x, tokens, embedding_.w(), embedding_.shard_start);
    x = tpm_.exit(x);
  } else {
    ops::embedding_forward(x, tokens, embedding_.w());
  }
  // The DECO layers' routing statistics go to one device buffer, read back once by forward()
  // after the loss (resolve_routing) instead of once per layer: each read waits for the GPU.
  const int64_t summary_len = 2 * cfg_.experts + 2;
  int64_t deco_layers = 0;
  for (const auto& b : blocks_) deco_layers += b->is_deco();
  routing_summaries_ = res && deco_layers > 0
                           ? Tensor::empty({deco_layers, summary_len}, DType::f64, params_.device())
                           : Tensor();
  for (size_t i = 0, k = 0; i < blocks_.size(); ++i) {
    auto& b = blocks_[i];
    need_params(i + 1 < blocks_.size() ? block_first_param_[i + 1] : final_norm_first_param_);
    double reg_loss = 0;
    RoutingStats stats;
    if (b->is_deco() && res) stats.summary = routing_summaries_.rows(static_cast<int64_t>(k++), 1);
    x = b->forward(x, bs, reg, &stats, reg_loss);
    if (b->is_deco() && res) {
      res->reg_loss += reg_loss;
      res->routing.push_back(std::move(stats));
    }
  }
  need_params(lm_head_param_);
  return final_norm_->forward(x);
}

void Transformer::need_params(size_t end) {
  if (on_params_needed) on_params_needed(end);
  params_.sync_compute(0, end);  // mixed precision: the bf16 copies of masters changed since last time
}

ForwardResult Transformer::forward(const Tensor& tokens, const Tensor& targets, const BatchShape& bs,
                                   const RegularizerSpec& reg, double loss_scale, bool with_grad) {
  ForwardResult res;
  res.tokens = bs.tokens();
  Tensor h = trunk_forward(tokens, bs, reg, &res);
  need_params(params_.all().size());
  // Under sequence parallelism the final norm ran on this rank's tokens: the vocabulary-parallel
  // LM head takes every token (Megatron's output layer: gathered, as a column-parallel linear).
  h_final_ = tp_ ? tpm_.enter(h) : h;
  const int64_t T = h_final_.dim(0), V = lm_head_->value.dim(0);
  const int64_t chunk = loss_chunk_tokens_ > 0 ? std::min(loss_chunk_tokens_, T) : T;
  const double grad_scale = with_grad ? loss_scale / bs.tokens() : 0.0;
  dh_ = with_grad ? Tensor::empty(h_final_.shape(), h_final_.dtype(), h_final_.device()) : Tensor();
  // The LM head and the cross-entropy a chunk of tokens at a time (fused linear cross-entropy):
  // a chunk's logits [C, V] become their own gradient in place and are consumed at once (the
  // LM head's weight gradient and the chunk's rows of dh), so [T, V] never exists. Under tensor
  // parallelism each rank's [C, V/TP] columns, the cross-entropy vocabulary-parallel.
  Tensor logits = Tensor::empty({chunk, V}, h_final_.dtype(), h_final_.device());
  res.lm_loss_sum = 0;
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t n = std::min(chunk, T - c0);
    const Tensor hc = h_final_.rows(c0, n), tc = targets.rows(c0, n);
    Tensor lc = n == chunk ? logits : logits.rows(0, n);
    ops::linear_forward(lc, hc, lm_head_->w());
    res.lm_loss_sum += tp_ ? vocab_parallel_cross_entropy(*tp_, lc, tc, lm_head_->shard_start, grad_scale)
                           : ops::cross_entropy(lc, tc, grad_scale);
    if (with_grad) {
      // Under tensor parallelism this rank's dlogits columns feed its LM-head rows: dh is a
      // partial sum over the vocabulary ranges, reduced in backward().
      Tensor dhc = dh_.rows(c0, n);
      ops::linear_backward(&dhc, &lm_head_->grad, lc, hc, lm_head_->w());
    }
  }
  resolve_routing(res, reg);
  return res;
}

void Transformer::resolve_routing(ForwardResult& res, const RegularizerSpec& reg) {
  if (!routing_summaries_.defined()) return;
  const Tensor host = routing_summaries_.to(Device::cpu);  // the one wait
  const int64_t len = host.dim(1);
  for (size_t k = 0; k < res.routing.size(); ++k) {
    RoutingStats& st = res.routing[k];
    st.resolve(host.data<double>() + static_cast<int64_t>(k) * len, cfg_.experts, reg);
    st.summary = Tensor();
    res.reg_loss += st.reg_loss;
  }
  routing_summaries_ = Tensor();
}

void Transformer::backward(double loss_scale) {
  DT_ASSERT(dh_.defined(), "backward() without a forward(with_grad=true)");
  // dh: all-reduced over the vocabulary ranges (reduce-scattered to this rank's tokens under
  // sequence parallelism).
  Tensor dh = dh_;
  if (tp_) dh = tpm_.enter_backward(dh);
  dh_ = Tensor();
  auto final_from = [this](size_t first) {
    if (on_grads_final) on_grads_final(first);
  };
  final_from(lm_head_param_);
  Tensor dx = final_norm_->backward(dh);
  final_from(final_norm_first_param_);
  for (size_t i = blocks_.size(); i-- > 0;) {
    dx = blocks_[i]->backward(dx, loss_scale);
    final_from(block_first_param_[i]);
  }
  if (tp_) dx = tpm_.exit_backward(dx);
  if (dx.dtype() != embedding_.grad.dtype()) {  // mixed precision: the gradient enters the fp32 master's
    Tensor wide = Tensor::empty(dx.shape(), embedding_.grad.dtype(), dx.device());
    ops::convert(wide, dx);
    dx = wide;
  }
  if (tp_) vocab_embedding_backward(embedding_.grad, tokens_, dx, embedding_.shard_start);
  else ops::embedding_backward(embedding_.grad, tokens_, dx);
  final_from(0);
}

Tensor Transformer::logits(const Tensor& tokens, const BatchShape& bs) {
  RegularizerSpec none;
  Tensor h = trunk_forward(tokens, bs, none, nullptr);
  need_params(params_.all().size());
  h_final_ = tp_ ? tpm_.enter(h) : h;
  Tensor logits = Tensor::empty({h_final_.dim(0), lm_head_->value.dim(0)}, h.dtype(), h.device());
  ops::linear_forward(logits, h_final_, lm_head_->w());
  // Whole logits for inference and evaluation: the vocabulary columns gathered.
  return tp_ ? tp_gather_columns(*tp_, logits) : logits;
}

double Transformer::train_flops_per_token(double ratio) const {
  const ModelConfig& c = cfg_;
  const double h = c.hidden, kvd = (c.kv_heads ? c.kv_heads : c.heads) * (c.hidden / c.heads);
  double attn = h * h * 2 + 2 * h * kvd;
  double dense_ffn = 3 * h * c.ffn_hidden;
  double deco_fixed = c.experts * h + 3 * h * c.shared_expert_width;
  double deco_experts = (c.gated_experts ? 3 : 2) * h * c.experts * c.expert_width;
  double matmul = c.vocab_size * h;  // LM head
  for (int i = 0; i < c.layers; ++i) {
    bool deco = c.arch == "deco" && i >= c.dense_layers;
    matmul += attn + (deco ? deco_fixed + ratio * deco_experts : dense_ffn);
  }
  return 6 * matmul + 6.0 * c.layers * h * c.seq_len;
}

}  // namespace decotron
