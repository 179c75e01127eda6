// AdamW with decoupled weight decay over a ParameterSet, global-norm clipping, and the
// gradient-norm statistics the step-skipping rule needs. Optimizer state (m, v) is fp32 like
// the master weights.
//
// Distributed optimizer (parallel.distributed_optimizer, Megatron-Core's DistributedOptimizer,
// ZeRO-1): given a GradientSync whose buffers are sharded, this rank holds exp_avg and
// exp_avg_sq only for its shard of each buffer, updates only that shard of the fp32 master
// weights (the parameters themselves: they are fp32 here; a bf16 compute copy would be
// all-gathered instead), and the sync all-gathers the parameters after the update. Parameters
// outside the buffers (groups of one rank, non-trainable ones) keep whole state, as without it.
//
// Both cases run the same per-element AdamW on "segments": a parameter's elements that this
// rank updates, as views of equal length of the value, the mean gradient and the moments.
// The segments never move, so the step runs over all of them at once (kernels/multi_tensor.h:
// on CUDA one AdamW launch, and the gradient norm's squares in two launches and one copy to
// the host, instead of a launch and a host round trip per segment).
#pragma once
#include <memory>
#include <vector>

#include "core/config.h"
#include "kernels/multi_tensor.h"
#include "model/parameter.h"
#include "parallel/communicator.h"
#include "parallel/grad_sync.h"

namespace decotron {

class AdamW {
 public:
  // sync: the data-parallel gradient sync; its sharded buffers make this a distributed optimizer
  // (nullptr or unsharded: every rank holds the whole state).
  AdamW(ParameterSet& params, const TrainConfig& cfg, GradientSync* sync = nullptr);
  ~AdamW();
  // Tensor parallelism: the split parameters' squares are summed over this group in grad_norm().
  void set_tensor_parallel(Communicator* tp) { tp_ = tp && tp->size() > 1 ? tp : nullptr; }
  // Expert parallelism: the expert-split parameters' squares are summed over this group.
  void set_expert_parallel(Communicator* ep) { ep_ = ep && ep->size() > 1 ? ep : nullptr; }
  // sqrt(sum of squares of every trainable gradient of the whole model): split parameters'
  // squares summed over the tensor-parallel group, shards' over their data-parallel group.
  // Collective then; its value comes out of all-reduces, so it is the same on every rank, and so
  // are the clip factor and the skip rule's decision (a non-finite entry anywhere makes it
  // non-finite everywhere).
  double grad_norm() const;
  // One update at learning rate lr; gradients are scaled by `clip_scale` first. Increments step().
  // Distributed: then all-gathers the parameters (collective).
  void update(double lr, double clip_scale);
  int64_t step() const { return step_; }
  void set_step(int64_t s) { step_ = s; }
  const std::vector<Parameter*>& params() const { return params_; }
  bool distributed() const { return sync_ != nullptr; }

  // Checkpoints (layout-free): parameter i's moments as whole tensors of its local (tensor-
  // parallel) shape. Distributed: all-gathers the shards, so every rank of the data-parallel
  // groups must call it.
  struct Moments {
    Tensor exp_avg, exp_avg_sq;
  };
  std::vector<Moments> moments() const;
  // Sets parameter i's moments from whole tensors of its local shape and dtype (any device);
  // distributed: keeps this rank's shard of them.
  void set_moments(size_t i, const Tensor& exp_avg, const Tensor& exp_avg_sq);

 private:
  struct Segment {
    size_t param;        // index into params_
    int64_t offset = 0;  // its first element within the parameter
    Tensor value, grad, m, v;
    int buffer = -1;     // sharded: index of its grad buffer (squares summed over the buffer's group); -1: whole
  };
  std::vector<Parameter*> params_;
  std::vector<Tensor> m_, v_;              // per parameter held whole (undefined when sharded)
  std::vector<Tensor> m_shard_, v_shard_;  // per grad buffer: this rank's shards (distributed)
  std::vector<Segment> segments_;          // in parameter order
  // Over segments_, in its order: the update and the squares of the gradients, a launch or two
  // each on CUDA (kernels/multi_tensor.h).
  std::unique_ptr<ops::MultiTensorAdamW> update_;
  std::unique_ptr<ops::MultiTensorSquares> squares_;
  TrainConfig cfg_;
  int64_t step_ = 0;
  Communicator* tp_ = nullptr;
  Communicator* ep_ = nullptr;
  GradientSync* sync_ = nullptr;  // set when distributed
};

}  // namespace decotron
