// Tensor parallelism: which slice of a parameter a tensor-parallel rank holds (from its
// Partition tag), and the mappings the layers use between replicated and split activations
// (Megatron-Core's mappings.py: each forward collective is paired with its backward).
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
// Throws decotron::Error (naming the parameter) when the dimension does not divide.
Shard shard_of(const std::string& name, Partition p, const Shape& global, int64_t expert_block, int rank, int size);
// The shard of a whole host tensor (a copy).
Tensor slice_shard(const Tensor& global, const Shard& s);

// ---- mappings on [T, c] activations ----------------------------------------------------------
// Sum over the group, in place (row-parallel output; column-parallel input gradient).
void tp_all_reduce(Communicator& tp, Tensor& t);
// [T, c] on each rank -> [T, c * size], rank r's columns at [r*c, (r+1)*c).
Tensor tp_gather_columns(Communicator& tp, const Tensor& local);
// This rank's columns [rank*c, (rank+1)*c) of [T, c * size].
Tensor tp_slice_columns(const Tensor& full, int rank, int size);
// Whole parameter from the shards (rows or columns per `dim`), on every rank.
Tensor tp_gather_shards(Communicator& tp, const Tensor& local, int dim);

// ---- vocabulary-parallel embedding: this rank holds rows [start, start + rows) -------------
// y[t] = table[tokens[t] - start] for tokens in range, 0 otherwise (sum over ranks = lookup).
void vocab_embedding_forward(Tensor& y, const Tensor& tokens, const Tensor& table, int64_t start);
// dtable[tokens[t] - start] += dy[t] for tokens in range.
void vocab_embedding_backward(Tensor& dtable, const Tensor& tokens, const Tensor& dy, int64_t start);

}  // namespace decotron
