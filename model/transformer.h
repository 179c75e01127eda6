// The DECO transformer (and its dense twin): embedding, pre-norm blocks, final RMSNorm,
// untied LM head, cross-entropy. deco-model.md is the specification.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "model/layers.h"

namespace decotron {

class TransformerBlock {
 public:
  TransformerBlock(ParameterSet& ps, int index, const ModelConfig& cfg, bool deco_ffn, Communicator* tp = nullptr,
                   Communicator* ep = nullptr);
  Tensor forward(const Tensor& x, const BatchShape& bs, const RegularizerSpec& reg, RoutingStats* stats,
                 double& reg_loss);
  Tensor backward(const Tensor& dy, double loss_scale);
  bool is_deco() const { return deco_ != nullptr; }

 private:
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
  // Under tensor parallelism the embedding and the LM head are split by vocabulary range; the
  // logits are gathered for the cross-entropy. ep: the expert-parallel group, which splits each
  // DECO layer's experts again (the data differs between its ranks).
  Transformer(const ModelConfig& cfg, DType dtype, Device device, Communicator* tp = nullptr,
              Communicator* ep = nullptr);

  ParameterSet& params() { return params_; }
  const ModelConfig& config() const { return cfg_; }
  int num_deco_layers() const { return num_deco_; }
  // Indices (0-based) of the DECO layers, for per-layer metrics.
  const std::vector<int>& deco_layer_ids() const { return deco_ids_; }

  // tokens, targets: i32 [B*S] on the model's device. The objective is
  // loss_scale * (mean CE + reg terms); when `with_grad` the LM head's gradient is prepared
  // in place (the logits' memory) for backward().
  ForwardResult forward(const Tensor& tokens, const Tensor& targets, const BatchShape& bs,
                        const RegularizerSpec& reg, double loss_scale, bool with_grad);
  // Accumulates every parameter's gradient of the objective of the last forward.
  void backward(double loss_scale);
  // Optional, called by backward() each time the gradients of a suffix of the parameters (in
  // creation order, params().all()) are complete: with the index of the first of them, after the
  // LM head, the final norm, each block and the embedding. Data parallelism starts reducing
  // gradient buckets from it during the last micro-batch (parallel/grad_sync.h).
  std::function<void(size_t first_param)> on_grads_final;
  // Logits [T, V] of every position (inference and tests).
  Tensor logits(const Tensor& tokens, const BatchShape& bs);

  // Model FLOPs per token for training (forward + backward), counting the routed experts at the
  // measured activation ratio: 6 x (matmul parameters incl. LM head, experts x ratio) + 6 L h S.
  double train_flops_per_token(double activation_ratio) const;

 private:
  Tensor trunk_forward(const Tensor& tokens, const BatchShape& bs, const RegularizerSpec& reg, ForwardResult* res);

  // Under tensor parallelism: logits [T, V] from this rank's vocabulary rows of the LM head.
  Tensor lm_logits(const Tensor& h);

  ModelConfig cfg_;
  Communicator* tp_;
  Communicator* ep_;
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
  // cached for backward
  Tensor tokens_, h_final_, dlogits_;
  BatchShape bs_;
};

}  // namespace decotron
