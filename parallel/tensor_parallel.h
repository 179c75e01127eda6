// Tensor and sequence parallelism: which slice of a parameter a tensor-parallel rank holds
// (from its Partition tag), and the mappings between replicated, token-split and
// feature-split activations (Megatron-Core's mappings.py: each forward collective is paired
// with its backward).
//
//   column   rows split        vocab        rows split (vocabulary ranges)
//   row      columns split     expert_rows  rows split by whole experts (blocks of expert_block)
//   replicated, expert_entries: whole on every rank     expert_cols  columns split by whole experts
//
// The mappings work on host (CPU) tensors of fp32 or fp64; a group of size one is never called
// (the layers keep their single-rank code path untouched).
#pragma once
#include "model/parameter.h"
#include "parallel/communicator.h"

namespace decotron {

// The part of a tensor of shape `global` that `rank` of `size` holds: dim -1 = all of it.
struct Shard {
  int dim = -1;
  int64_t start = 0, count = 0;
};
bool is_tensor_parallel_split(Partition p);
// The balanced split of n items over `size` ranks: rank r holds [start, start + count), the
// first n % size ranks one more than the others (experts that do not divide evenly).
struct Block {
  int64_t start = 0, count = 0;
};
Block balanced_block(int64_t n, int rank, int size);
// Throws decotron::Error (naming the parameter) when the dimension does not divide; experts
// (expert_rows/expert_cols) split by whole experts with balanced_block and need only as many
// experts as ranks.
Shard shard_of(const std::string& name, Partition p, const Shape& global, int64_t expert_block, int rank, int size);
// The shard of a whole host tensor (a copy).
Tensor slice_shard(const Tensor& global, const Shard& s);

// The mappings below take tensors on any device: a collective's buffers live where the
// communicator wants them (NCCL: the GPU; MPI: the host), so a tensor elsewhere is staged there
// and back (several ranks sharing one GPU through MPI; host checkpoints over NCCL).
Tensor on_comm_device(const Tensor& t, const Communicator& c);

// ---- mappings on [T, c] activations ----------------------------------------------------------
// Sum over the group, in place (row-parallel output; column-parallel input gradient).
void tp_all_reduce(Communicator& tp, Tensor& t);
// [T, c] on each rank -> [T, c * size], rank r's columns at [r*c, (r+1)*c).
Tensor tp_gather_columns(Communicator& tp, const Tensor& local);
// This rank's columns [rank*c, (rank+1)*c) of [T, c * size].
Tensor tp_slice_columns(const Tensor& full, int rank, int size);
// Whole parameter from the shards (rows or columns per `dim`, in rank order; the shards may
// differ in size, as experts split unevenly do), on every rank.
Tensor tp_gather_shards(Communicator& tp, const Tensor& local, int dim);

// ---- sequence parallelism: [T, c] split along tokens into `size` contiguous row blocks --------
// [T/size, c] on each rank -> [T, c], rank r's rows at [r*T/size, (r+1)*T/size).
Tensor tp_gather_rows(Communicator& tp, const Tensor& local);
// [T, c] partial sums on each rank -> this rank's row block of their sum, [T/size, c].
Tensor tp_reduce_scatter_rows(Communicator& tp, const Tensor& partial);

// ---- the reductions around a tensor-parallel region -------------------------------------------
// A region is a column-parallel layer followed by a row-parallel one (attention, an FFN; the
// vocabulary-parallel embedding and LM head are its two ends). The layers return PARTIAL sums
// over the tensor-parallel ranks: forward the row-parallel output, backward the input
// gradient of the column-parallel weights. The region's owner (TransformerBlock, Transformer)
// reduces them here, in one of two modes:
//
//                         forward                          backward
//   tensor parallel (activations outside the region replicated on every rank):
//     enter               identity                         all-reduce dx
//     exit                all-reduce y                     identity
//   sequence parallel (activations outside split along tokens, each rank its row block):
//     enter               all-gather rows                  reduce-scatter rows of dx
//     exit                reduce-scatter rows of y         all-gather rows of dy
//
// Megatron-Core: copy_to_ / reduce_from_tensor_model_parallel_region, and
// gather_from_ / reduce_scatter_to_sequence_parallel_region. With no group (tp null) every
// mapping is the identity: the single-rank code path.
struct TensorParallelMappings {
  Communicator* tp = nullptr;  // null: no tensor parallelism
  bool sequence_parallel = false;

  // Outside activation -> the region's input [T, c].
  Tensor enter(const Tensor& x) const;
  // The region's partial input gradient [T, c] -> the outside gradient (consumes dx).
  Tensor enter_backward(Tensor dx) const;
  // The region's partial output [T, c] -> the outside activation (consumes y).
  Tensor exit(Tensor y) const;
  // Outside gradient -> the region's output gradient [T, c].
  Tensor exit_backward(const Tensor& dy) const;
};

// Sequence parallelism leaves replicated parameters that act on token-split activations (the
// RMSNorm weights, flagged Parameter::sequence_parallel) with each rank's partial gradient:
// sums them over the group, in one all-reduce. Call once per step, after the last micro-batch's
// backward (the gradients accumulate over micro-batches); nothing to do without flagged ones.
void tp_all_reduce_sequence_parallel_grads(Communicator& tp, const std::vector<Parameter*>& params);

// ---- vocabulary-parallel embedding: this rank holds rows [start, start + rows) -------------
// y[t] = table[tokens[t] - start] for tokens in range, 0 otherwise (sum over ranks = lookup).
void vocab_embedding_forward(Tensor& y, const Tensor& tokens, const Tensor& table, int64_t start);
// dtable[tokens[t] - start] += dy[t] for tokens in range.
void vocab_embedding_backward(Tensor& dtable, const Tensor& tokens, const Tensor& dy, int64_t start);

}  // namespace decotron
