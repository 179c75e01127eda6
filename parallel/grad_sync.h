// Data-parallel gradient averaging. After a step's micro-batches every rank holds the gradient
// of its own samples; the sync replaces it by the mean over the data-parallel ranks (expert
// parameters: the sum over the expert-data-parallel group / dp), so that every rank takes the same optimizer
// step. The gradients live in grad buffers (parallel/grad_buffer.h), one per group and dtype,
// cut into buckets of about `bucket_bytes` (Megatron's 25 MB default); each bucket is reduced by
// one collective on the group's communicator and multiplied by its scale (1 / data-parallel size).
//
// Overlap with the backward pass: buckets are built in the reverse of the parameters' creation
// order, the order in which the backward pass finishes them. During the last micro-batch's
// backward the model reports each time a suffix of the parameters has its final gradient
// (grads_final); every bucket whose parameters are all final is launched at once, non-blocking,
// while the backward goes on. finish_grad_sync() launches the rest and waits for all. The same
// bucket gets the same collective either way, so the result is bit-identical to reducing after
// the backward.
//
// With the distributed optimizer (parallel.distributed_optimizer) the buckets are
// reduce-scattered instead: each rank receives the mean gradient of its shard only, the optimizer
// updates that shard, and sync_params() all-gathers the parameters.
//
// A group of size one has no buffer (its gradients are already the mean): the single-rank code
// path is untouched.
#pragma once
#include <memory>
#include <vector>

#include "parallel/grad_buffer.h"
#include "parallel/process_groups.h"

namespace decotron {

class GradientSync {
 public:
  static constexpr size_t kDefaultBucketBytes = 25u << 20;
  struct Options {
    size_t bucket_bytes = kDefaultBucketBytes;
    bool distributed_optimizer = false;  // shard: reduce-scatter the gradients, all-gather the parameters
    // Distributed: sync_params() only launches the parameter all-gathers; the forward pass waits
    // for each bucket when it first needs its parameters (params_needed).
    bool overlap_param_gather = false;
  };

  // `params`: the model's parameters in creation order (ParameterSet::all()). Re-points the
  // gradients (and, distributed, the values) of those in a group of more than one rank into the
  // grad buffers.
  GradientSync(const std::vector<Parameter*>& params, const ParallelContext& ctx, Options opt);
  GradientSync(const std::vector<Parameter*>& params, const ParallelContext& ctx)
      : GradientSync(params, ctx, Options{}) {}

  // The overlap hook (Transformer::on_grads_final, during the last micro-batch's backward): the
  // gradients of params[first, end) are final. Launches every bucket whose parameters are all
  // final, in bucket order, and lets the in-flight ones progress.
  void grads_final(size_t first);
  // Launches the buckets not launched yet, waits for every bucket and scales it: the gradients
  // (distributed: the grad shards) then hold the mean over their group.
  void finish_grad_sync();
  // Distributed: after the optimizer updated this rank's shards, all-gathers the parameters
  // (with overlap_param_gather, launches the all-gathers and returns).
  void sync_params();
  // The forward pass is about to read params[0, end) (creation order): waits for the buckets
  // holding any of them, and lets the others progress. Nothing to do without gathers in flight.
  void params_needed(size_t end);
  // Waits for every parameter all-gather in flight: the parameters are whole again. Whoever
  // reads the parameters outside the forward pass (checkpoints, evaluation, export) calls it.
  void finish_param_sync();

  const std::vector<std::unique_ptr<GradBuffer>>& buffers() const { return buffers_; }
  bool distributed() const;  // some buffer is sharded
  size_t num_buckets() const;

 private:
  std::vector<std::unique_ptr<GradBuffer>> buffers_;
  bool overlap_param_gather_ = false;
  // Per buffer and bucket, the smallest creation index of its parameters: the bucket is ready
  // once grads_final(first) has reported first <= it.
  std::vector<std::vector<size_t>> ready_at_;
};

}  // namespace decotron
