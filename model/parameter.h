// Parameters: a value, its gradient, and how it is partitioned under tensor and expert
// parallelism. The partition is declared where the layer creates the parameter, so that
// parallel layouts and layout-free checkpoints (whole tensors keyed by global name) need no
// change to the layers' math.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace decotron {

enum class Partition : uint8_t {
  replicated,      // every rank holds the whole tensor (norm weights, router, gamma)
  column,          // rows split over tensor ranks: column-parallel linear (output features)
  row,             // columns split over tensor ranks: row-parallel linear (input features)
  vocab,           // rows split over tensor ranks by vocabulary range (embedding, LM head)
  expert_rows,     // rows grouped in blocks of `expert_block`, one block per expert (W_up)
  expert_cols,     // columns grouped in blocks of `expert_block`, one block per expert (W_down)
  expert_entries,  // one entry per expert (the scaling g)
};

const char* partition_name(Partition p);

enum class Init : uint8_t { normal, ones, constant };

struct Parameter {
  std::string name;   // global name, e.g. "layers.3.ffn.w_up"; the checkpoint key
  Tensor value;       // master weights (fp32; fp64 in gradient checks)
  Tensor grad;        // same shape and dtype; accumulates over micro-batches
  // Mixed precision (train.dtype: bf16): the copy of `value` in the compute dtype that forward
  // and backward read, refreshed from the master before the first forward after a change
  // (ParameterSet::sync_compute). Undefined when the model computes in the master dtype.
  Tensor compute;
  // The weight the layers compute with: the compute copy, or the master itself.
  const Tensor& w() const { return compute.defined() ? compute : value; }
  // Computes in the master dtype whatever the compute dtype (the router and its scaling g: the
  // routing decision r > 0 is taken in fp32, as Megatron's router and the paper's).
  bool full_precision = false;
  Partition partition = Partition::replicated;
  int64_t expert_block = 0;  // rows/cols per expert for expert_* partitions
  bool weight_decay = true;  // matrices decay; norms, g and gamma do not
  bool trainable = true;     // false for buffers (fixed router scaling)
  // Sequence parallelism: a replicated parameter applied to token-split activations (the
  // RMSNorm weights); each tensor-parallel rank's gradient covers its tokens only, and the
  // trainer sums them over the group once per step (tp_all_reduce_sequence_parallel_grads).
  bool sequence_parallel = false;
  // Tensor parallelism: the whole tensor's shape, and which part of it `value` holds (dim -1:
  // all of it; else [shard_start, shard_start + value.dim(shard_dim)) along shard_dim).
  Shape global_shape;
  int shard_dim = -1;
  int64_t shard_start = 0;
};

// Owns the parameters of a model in creation order (the order of the optimizer and checkpoints).
class ParameterSet {
 public:
  // tp_rank/tp_size: under tensor parallelism each split parameter (by its Partition) holds its
  // rank's part only (parallel/tensor_parallel.h); 1 = whole tensors.
  // ep_rank/ep_size: expert parallelism splits the expert partitions again, so that the ranks of
  // the TP x EP grid hold consecutive blocks of whole experts (block tp_rank * ep_size + ep_rank).
  ParameterSet(DType dtype, Device device, int tp_rank = 0, int tp_size = 1, int ep_rank = 0, int ep_size = 1)
      : dtype_(dtype), device_(device), tp_rank_(tp_rank), tp_size_(tp_size), ep_rank_(ep_rank), ep_size_(ep_size) {}
  // `shape` is the whole tensor's; the layer reads the local shape from the returned value.
  Parameter& add(const std::string& name, const Shape& shape, Partition partition, Init init, double init_value,
                 bool weight_decay, int64_t expert_block = 0);
  // Fills every parameter from its init rule, keyed by (seed, name): the same weights on any
  // device and in any parallel layout.
  void initialize(uint64_t seed);
  void zero_grad();
  // Mixed precision: parameters (but the full_precision ones) get a compute copy in `dtype`
  // (bf16) beside their master weights; the master dtype itself means none. Call after the
  // parameters are added.
  void set_compute_dtype(DType dtype);
  DType compute_dtype() const { return compute_dtype_; }
  // The master weights changed (an optimizer step, a checkpoint loaded, initialize()): the
  // compute copies are refreshed by the next sync_compute().
  void mark_master_changed() { compute_stale_.assign(entries_.size(), true); }
  // Refreshes the compute copies of all() [begin, end) whose masters changed (one convert per
  // parameter); the forward pass refreshes each block's just before it runs.
  void sync_compute(size_t begin = 0, size_t end = SIZE_MAX);
  std::vector<Parameter*> all() const;
  Parameter& find(const std::string& name) const;
  int64_t count() const;  // scalars in trainable parameters (whole tensors)
  int tp_rank() const { return tp_rank_; }
  int tp_size() const { return tp_size_; }
  int ep_size() const { return ep_size_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

 private:
  struct Entry {
    std::unique_ptr<Parameter> p;
    Init init;
    double init_value;
  };
  std::vector<Entry> entries_;
  DType dtype_;
  DType compute_dtype_ = dtype_;
  std::vector<bool> compute_stale_;  // per parameter (creation order)
  Device device_;
  int tp_rank_ = 0, tp_size_ = 1, ep_rank_ = 0, ep_size_ = 1;
};

// Whether a partition is split by whole experts (W_up / W_gate rows, W_down columns): over the
// tensor x expert-parallel grid, and its gradient summed over the expert-data-parallel group.
// (The per-expert scaling g, expert_entries, is whole on every rank.)
bool is_expert_partition(Partition p);

}  // namespace decotron
