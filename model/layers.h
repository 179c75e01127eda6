// The layers of the DECO transformer. Each layer creates its parameters (with their partition),
// caches what its backward needs during forward, and in backward overwrites the input gradient
// it returns and accumulates (+=) its parameters' gradients. The math is in kernels/ops.h.
//
// Tensor parallelism (`tp`, null or a group of size one for none): the ParameterSet holds each
// split parameter's local part; attention splits heads and SwiGLU its width (column-parallel in,
// row-parallel out); DECO splits whole experts (NormSiLU's mean stays exact: mean(u) = x . w_bar,
// with w_bar summed over the ranks holding experts) and keeps the router replicated. Expert
// parallelism (`ep`) splits each rank's experts again and moves only active (token, expert)
// pairs between the ranks of the expert-parallel group. Contract: a layer's input holds every
// token of the micro-batch, the same on every tensor-parallel rank; its forward returns the
// tensor-parallel PARTIAL sum of its output (before the row-parallel reduction) and its backward
// the PARTIAL sum of its input gradient. The caller reduces both (TransformerBlock, through
// TensorParallelMappings: all-reduce, or reduce-scatter / all-gather along the tokens under
// sequence parallelism). With no tp the outputs are whole and nothing is reduced.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/config.h"
#include "kernels/ops.h"
#include "model/expert_dispatch.h"
#include "model/parameter.h"
#include "parallel/communicator.h"

namespace decotron {

// The dtype of per-row statistics (RMSNorm's 1/rms, NormSiLU's mean and 1/rms, attention's
// log-sum-exp) for activations in `act`: fp32 under bf16 compute, else the activations' own.
inline DType stats_dtype(DType act) { return act == DType::bf16 ? DType::f32 : act; }

// Shape of the tokens a forward pass sees.
struct BatchShape {
  int64_t batch = 0, seq = 0;
  int64_t tokens() const { return batch * seq; }
};

class RMSNormLayer {
 public:
  // sequence_parallel: the layer sees this rank's tokens only, so its weight's gradient is a
  // partial sum over the tensor-parallel ranks (Parameter::sequence_parallel).
  RMSNormLayer(ParameterSet& ps, const std::string& name, int64_t hidden, double eps, bool sequence_parallel = false);
  Tensor forward(const Tensor& x);
  Tensor backward(const Tensor& dy);
  void release() { x_ = rstd_ = Tensor(); }  // drops what backward needs (recomputation)

 private:
  Parameter& w_;
  double eps_;
  Tensor x_, rstd_;
};

class AttentionLayer {
 public:
  AttentionLayer(ParameterSet& ps, const std::string& name, const ModelConfig& cfg, Communicator* tp = nullptr);
  Tensor forward(const Tensor& x, const BatchShape& bs);
  Tensor backward(const Tensor& dy);
  void release() { x_ = q_ = k_ = v_ = o_ = lse_ = Tensor(); }
  // Sequence parallelism: the block drops the gathered input after forward and gathers it again
  // before backward (Megatron keeps only the token slice).
  void drop_input() { x_ = Tensor(); }
  void restore_input(const Tensor& x) { x_ = x; }

 private:
  Parameter &wq_, &wk_, &wv_, &wo_;
  Communicator* tp_;
  int64_t heads_, kv_heads_, head_dim_;  // heads on this rank
  double rope_base_;
  BatchShape bs_;
  Tensor x_, q_, k_, v_, o_, lse_;
};

// SwiGLU: W_down (SiLU(W_gate x) * (W_up x)); the dense FFN and DECO's shared expert. Under
// tensor parallelism the ParameterSet gives it its slice of the width (W_gate, W_up rows, W_down
// columns), and its output and dx are partial sums (the contract above).
class SwiGLULayer {
 public:
  SwiGLULayer(ParameterSet& ps, const std::string& name, int64_t hidden, int64_t width, double init_std);
  Tensor forward(const Tensor& x);
  // Returns dx; with accumulate_into, adds dx into it instead (and returns it).
  Tensor backward(const Tensor& dy, Tensor* accumulate_into = nullptr);
  void release() { x_ = gate_ = up_ = h_ = Tensor(); }
  void drop_input() { x_ = Tensor(); }
  void restore_input(const Tensor& x) { x_ = x; }

 private:
  Parameter &w_gate_, &w_up_, &w_down_;
  Tensor x_, gate_, up_, h_;
};

// Per-layer routing statistics of one forward pass (DECO layers only).
struct RegularizerSpec;

struct RoutingStats {
  int64_t active_pairs = 0;   // (token, expert) pairs with r > 0
  int64_t tokens = 0;
  int64_t tokens_without_expert = 0;
  std::vector<int64_t> active_per_expert;
  double entropy_sum = 0;     // sum over tokens of H_t (the regularized quantity)
  double l1_value = 0;        // the ReMoE L1 term (when that regularizer is selected)
  int64_t pairs_computed = 0; // pairs this rank's experts computed (expert-parallel load)
  double reg_loss = 0;        // the layer's regularization term (coef * H_mean, or coef * L1)
  // Set by the caller: where the layer's forward writes its ops::routing_summary, to be read
  // back later in one copy with the other layers' and passed to resolve (Transformer::forward:
  // one wait per forward instead of one per layer). Undefined: the layer reads it back at once.
  Tensor summary;
  // The fields above from a summary read back to the host ([2 E + 2] doubles, routing_summary's
  // layout); tokens must be set.
  void resolve(const double* summary, int64_t experts, const RegularizerSpec& reg);
};

// What the sparsity regularizer adds to the loss in this forward: coef * H_mean (entropy) or
// coef * L1, with coef = lambda / L (deco-model.md).
struct RegularizerSpec {
  enum class Kind : uint8_t { none, entropy, l1 } kind = Kind::none;
  double coef = 0;       // lambda / L
  double target = 0.2;   // for L1
};

// model.normsilu ("full" | "no_mean" | "no_rms" | "silu", validated by the config) -> the op's mode.
ops::NormSiluMode normsilu_mode(const std::string& config_value);

class DecoFFNLayer {
 public:
  // tp: whole experts split over the tensor-parallel ranks; ep: this rank's experts split again
  // over the expert-parallel group (null or size one: none).
  DecoFFNLayer(ParameterSet& ps, const std::string& name, const ModelConfig& cfg, Communicator* tp = nullptr,
               Communicator* ep = nullptr);
  // Returns the FFN output; stats are filled; returns the regularization term through reg_loss.
  Tensor forward(const Tensor& x, const RegularizerSpec& reg, RoutingStats& stats, double& reg_loss);
  // loss_scale multiplies the regularizer's gradient (1 / micro-batches).
  Tensor backward(const Tensor& dy, double loss_scale);
  void release();  // drops what backward needs (recomputation)
  // Sequence parallelism: as AttentionLayer's (the shared expert's input is the same tensor).
  void drop_input();
  void restore_input(const Tensor& x);
  // Benchmarks only (as Megatron's --moe-router-force-load-balancing): the next forward measures
  // each expert's router logits and fixes a per-expert shift b_e so that `ratio` of that batch's
  // tokens activate it; from then on the layer routes with r - b (forward and backward, so the
  // math stays consistent). A fresh model activates about half of its pairs, a trained one the
  // target ratio: this puts the sparse path's cost where training spends its time. 0: off.
  void calibrate_routing(double ratio) { calibrate_ratio_ = ratio; }

 private:
  void fix_logit_shift(const Tensor& r);  // calibrate_routing's measurement
  const Tensor& scaling() const;
  const Tensor& pre_weight() const;  // the matrix NormSiLU applies to: W_up, or W_gate when gated
  Tensor router_input(const Tensor& x) const;  // x in the router's dtype
  void sum_over_expert_ranks(Tensor& t);
  void routing_stats(RoutingStats& stats, const RegularizerSpec& reg, double& reg_loss);
  Tensor experts_forward_pairs(const Tensor& x);
  void experts_backward_pairs(const Tensor& dy, Tensor& dx, Tensor& ds);
  // add_input_grad = false accumulates the router's weight gradients only (under tensor
  // parallelism every rank computes them, one rank adds the input gradient to its partial dx).
  void router_backward(Tensor& dx, const Tensor& ds, double loss_scale, bool add_input_grad = true);
  Communicator* tp_;
  Communicator* ep_;
  int64_t experts_, width_;
  ops::NormSiluMode mode_;
  double eps_;
  bool gated_;
  bool sparse_;  // compute only active (token, expert) pairs
  Parameter& w_router_;
  Parameter* g_ = nullptr;   // learnable or fixed scaling; null for "none"
  Tensor unit_scale_;        // [1] = 1 for "none"
  Parameter& w_up_;
  Parameter* w_gate_ = nullptr;
  Parameter& gamma_;
  Parameter& w_down_;
  std::unique_ptr<SwiGLULayer> shared_;
  RegularizerSpec reg_;
  Tensor x_, r_, s_;
  // The dense-masked path's cache (single rank, expert_compute: dense).
  Tensor u_, gate_pre_, gate_act_, z_, nstats_, y_;
  // The pair path's (sparse, or any tensor/expert-parallel layout).
  std::unique_ptr<ExpertDispatcher> dispatcher_;
  ExpertDispatcher::Received received_;
  ops::GroupedExperts grouped_;
  Tensor w_bar_;
  double calibrate_ratio_ = 0;  // calibrate_routing: pending
  Tensor logit_shift_;          // [E] in r's dtype, subtracted from the router logits (benchmarks)
};

}  // namespace decotron
