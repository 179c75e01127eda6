// The DECO transformer (and its dense twin): embedding, pre-norm blocks, final RMSNorm,
// untied LM head, cross-entropy. deco-model.md is the specification.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "model/layers.h"
#include "parallel/tensor_parallel.h"

namespace decotron {

// A pre-norm block: x1 = x + Attn(RMSNorm(x)); x2 = x1 + FFN(RMSNorm(x1)). Under tensor
// parallelism the attention and the FFN are tensor-parallel regions whose partial sums the
// block reduces (tp_: all-reduce; with sequence parallelism x, x1, x2 and the norms hold this
// rank's row block of the tokens, gathered before each region and reduce-scattered after it).
class TransformerBlock {
 public:
  TransformerBlock(ParameterSet& ps, int index, const ModelConfig& cfg, bool deco_ffn,
                   const TensorParallelMappings& tp = {}, Communicator* ep = nullptr);
  // bs: the shape of the whole micro-batch (under sequence parallelism x holds a block of it).
  Tensor forward(const Tensor& x, const BatchShape& bs, const RegularizerSpec& reg, RoutingStats* stats,
                 double& reg_loss);
  Tensor backward(const Tensor& dy, double loss_scale);
  bool is_deco() const { return deco_ != nullptr; }
  // Activation recomputation (Megatron's full granularity): forward keeps only the block's
  // input; backward runs the forward again, then the backward. One extra forward per block for
  // the memory of its activations (train.recompute).
  void set_recompute(bool on) { recompute_ = on; }
  // Benchmarks: DecoFFNLayer::calibrate_routing (dense blocks: nothing).
  void calibrate_routing(double ratio) {
    if (deco_) deco_->calibrate_routing(ratio);
  }

 private:
  // drop_gathered: under sequence parallelism keep only this rank's tokens for backward.
  Tensor forward_layers(const Tensor& x, const BatchShape& bs, const RegularizerSpec& reg, RoutingStats* stats,
                        double& reg_loss, bool drop_gathered);
  bool recompute_ = false;
  Tensor x_in_;  // recomputation: the block's input
  // Sequence parallelism: the norms' outputs (this rank's tokens), gathered again in backward
  // instead of keeping the regions' gathered [T, h] inputs.
  Tensor n1_, n2_;
  BatchShape bs_;
  RegularizerSpec reg_;
  TensorParallelMappings tp_;
  RMSNormLayer norm1_, norm2_;
  AttentionLayer attn_;
  std::unique_ptr<SwiGLULayer> dense_;
  std::unique_ptr<DecoFFNLayer> deco_;
};

struct ForwardResult {
  double lm_loss_sum = 0;           // sum over tokens of the cross-entropy
  int64_t tokens = 0;
  double reg_loss = 0;              // the regularization term added to the loss (already lambda / L scaled)
  std::vector<RoutingStats> routing;  // one per DECO layer, in layer order
};

class Transformer {
 public:
  // tp: the tensor-parallel group (null or size one: whole tensors, the single-rank code path).
  // Under tensor parallelism the embedding and the LM head are split by vocabulary range and the
  // cross-entropy is vocabulary-parallel (no rank holds [T, V] logits). ep: the expert-parallel
  // group, which splits each DECO layer's experts again (the data differs between its ranks).
  // sequence_parallel (needs tp): the residual stream, the norms and the residual adds run on
  // 1/TP of the tokens (docs/parallelism.md); the micro-batch's B*S tokens must divide by TP.
  Transformer(const ModelConfig& cfg, DType dtype, Device device, Communicator* tp = nullptr,
              Communicator* ep = nullptr, bool sequence_parallel = false);

  ParameterSet& params() { return params_; }
  const ModelConfig& config() const { return cfg_; }
  int num_deco_layers() const { return num_deco_; }
  // Indices (0-based) of the DECO layers, for per-layer metrics.
  const std::vector<int>& deco_layer_ids() const { return deco_ids_; }

  // tokens, targets: i32 [B*S] on the model's device. The objective is
  // loss_scale * (mean CE + reg terms). The LM head and the cross-entropy run a chunk of tokens
  // at a time (set_loss_chunk_tokens); when `with_grad` each chunk's logits become their
  // gradient in place and the LM head's weight gradient and dh are computed right away, so
  // backward() starts from dh.
  ForwardResult forward(const Tensor& tokens, const Tensor& targets, const BatchShape& bs,
                        const RegularizerSpec& reg, double loss_scale, bool with_grad);
  // Accumulates every parameter's gradient of the objective of the last forward. Under sequence
  // parallelism the norm weights' gradients are then partial sums over the tensor-parallel
  // ranks: call tp_all_reduce_sequence_parallel_grads once after the step's last backward.
  void backward(double loss_scale);
  // Optional, called by backward() each time the gradients of a suffix of the parameters (in
  // creation order, params().all()) are complete: with the index of the first of them, after the
  // LM head, the final norm, each block and the embedding. Data parallelism starts reducing
  // gradient buckets from it during the last micro-batch (parallel/grad_sync.h).
  std::function<void(size_t first_param)> on_grads_final;
  // Optional, called by the forward pass before it first reads the parameters [0, end) (creation
  // order): before the embedding, each block, the final norm and the LM head. The distributed
  // optimizer's overlapped parameter all-gathers wait there (GradientSync::params_needed).
  std::function<void(size_t end)> on_params_needed;
  // Tokens per chunk of the LM head + cross-entropy (0: the whole micro-batch at once): the
  // logits buffer is [chunk, V] instead of [T, V] (train.loss_chunk_tokens).
  void set_loss_chunk_tokens(int64_t n) { loss_chunk_tokens_ = n; }
  // Recompute every block's activations in backward instead of keeping them (train.recompute).
  void set_recompute(bool on) {
    for (auto& b : blocks_) b->set_recompute(on);
  }
  // Benchmarks only: every DECO layer routes `ratio` of the next batch's tokens to each expert
  // from then on (DecoFFNLayer::calibrate_routing).
  void calibrate_routing(double ratio) {
    for (auto& b : blocks_) b->calibrate_routing(ratio);
  }
  // Logits [T, V] of every position (inference and tests).
  Tensor logits(const Tensor& tokens, const BatchShape& bs);

  // Model FLOPs per token for training (forward + backward), counting the routed experts at the
  // measured activation ratio: 6 x (matmul parameters incl. LM head, experts x ratio) + 6 L h S.
  double train_flops_per_token(double activation_ratio) const;

 private:
  Tensor trunk_forward(const Tensor& tokens, const BatchShape& bs, const RegularizerSpec& reg, ForwardResult* res);
  // The DECO layers' routing statistics of the last trunk_forward, from routing_summaries_ (one
  // copy to the host): fills res.routing and adds their regularization terms to res.reg_loss.
  void resolve_routing(ForwardResult& res, const RegularizerSpec& reg);

  // Fails unless the micro-batch's tokens split over the tensor-parallel ranks (sequence parallel).
  void check_token_split(const BatchShape& bs) const;
  // The parameters [0, end) are about to be read: on_params_needed, then their compute copies.
  void need_params(size_t end);

  ModelConfig cfg_;
  Communicator* tp_;
  Communicator* ep_;
  TensorParallelMappings tpm_;  // the reductions around the embedding and the LM head
  ParameterSet params_;
  Parameter& embedding_;
  std::vector<std::unique_ptr<TransformerBlock>> blocks_;
  std::unique_ptr<RMSNormLayer> final_norm_;
  Parameter* lm_head_ = nullptr;
  int num_deco_ = 0;
  std::vector<int> deco_ids_;
  // Creation index of the first parameter of each block, of the final norm and of the LM head.
  std::vector<size_t> block_first_param_;
  size_t final_norm_first_param_ = 0, lm_head_param_ = 0;
  // cached for backward: h_final_ is the LM head's input (every token)
  Tensor tokens_, h_final_, dh_;
  Tensor routing_summaries_;  // [DECO layers, 2 E + 2] f64: routing_summary rows until resolved
  int64_t loss_chunk_tokens_ = 0;
  BatchShape bs_;
};

}  // namespace decotron
