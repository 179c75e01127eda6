// Megatron-Core's grad buffer: the gradients of the parameters that one process group averages
// (dp for dense parameters, edp for expert ones), of one dtype, in one flat tensor cut into
// buckets. Each parameter's `grad` is a view of it, so the backward pass accumulates straight
// into the buffer and a bucket is reduced in place, with no packing copy.
//
// With the distributed optimizer each bucket is padded to a multiple of the group size N and
// split into N equal contiguous shards: rank r owns shard r of every bucket. The bucket is then
// reduce-scattered (rank r receives the sum of shard r only, into its grad shard) instead of
// all-reduced; the parameters' values are views of a flat parameter buffer with the same layout,
// so that after the optimizer has updated each rank's shard one all-gather per bucket, in place,
// makes the parameters whole again on every rank.
//
// The layout is pure arithmetic (BufferLayout, tested for odd sizes); GradBuffer owns the memory
// and launches the collectives.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/parameter.h"
#include "parallel/communicator.h"

namespace decotron {

// Elements [begin, end) of a flat buffer.
struct Range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool empty() const { return end <= begin; }
  bool operator==(const Range&) const = default;
};
Range intersect(const Range& a, const Range& b);

struct BufferLayout {
  struct Bucket {
    Range range;                  // padded: its size is a multiple of `shards`
    size_t first = 0, last = 0;   // its parameters: [first, last) in the layout's order
  };
  std::vector<Range> params;      // each parameter's elements, in the order given
  std::vector<Bucket> buckets;    // consecutive from element 0
  int shards = 1;
  int64_t numel = 0;              // padding included

  // Rank `rank`'s contiguous shard of bucket b.
  Range shard(size_t b, int rank) const;
  // Where that shard sits in a rank's local shard buffer: its shards of every bucket, in bucket
  // order (the grad shard, the optimizer's moments).
  Range local(size_t b) const;
  int64_t local_numel() const { return numel / shards; }

  // The parts of parameters inside rank `rank`'s shards: parameter `param`'s elements
  // [in_param) are at [in_local) of the local shard buffer. Padding belongs to no piece.
  struct Piece {
    size_t param;
    Range in_param, in_local;
  };
  std::vector<Piece> pieces(int rank) const;
};

// Packs parameters of `numels` elements, in this order, into buckets: a bucket closes before a
// parameter that would take it past `bucket_numel` elements (a larger parameter gets a bucket of
// its own), and is padded to a multiple of `shards`.
BufferLayout make_buffer_layout(const std::vector<int64_t>& numels, int64_t bucket_numel, int shards);

class GradBuffer {
 public:
  // `params`: trainable parameters of one dtype and device whose gradients `group` averages, in
  // the order their gradients become final (the reverse of creation: the first bucket is ready
  // first). Their `grad` becomes a view of this buffer (its current values kept); with
  // `distributed` their `value` too. Each bucket's reduced sum is multiplied by `scale` (the mean:
  // 1 / group size).
  GradBuffer(std::shared_ptr<Communicator> group, std::vector<Parameter*> params, int64_t bucket_numel,
             bool distributed, double scale);
  ~GradBuffer();

  Communicator& group() const { return *group_; }
  const BufferLayout& layout() const { return layout_; }
  const std::vector<Parameter*>& params() const { return params_; }
  bool distributed() const { return distributed_; }
  size_t num_buckets() const { return buckets_.size(); }
  double scale(size_t b) const { return buckets_[b].scale; }

  // Bucket b's reduction: start launches it (non-blocking): an all-reduce of its gradients in
  // place, or (distributed) a reduce-scatter into this rank's grad shard. finish waits for it and
  // multiplies the result by the bucket's scale.
  void start_grad_sync(size_t b);
  void finish_grad_sync(size_t b);
  bool in_flight(size_t b) const { return buckets_[b].flight != nullptr; }
  // Lets the in-flight collectives (reductions and parameter gathers) progress (MPI moves them on
  // only inside MPI calls).
  void poke();

  // Distributed: the mean gradient of this rank's shards, laid out as layout().local(); valid
  // after finish_grad_sync. (Parameter::grad keeps this rank's own, unreduced gradient.)
  const Tensor& grad_shard() const { return grad_shard_; }
  // Distributed: all-gathers every bucket of the parameter buffer in place, after the optimizer
  // updated this rank's shards: the parameters are then whole on every rank.
  void sync_params();
  // The same in two halves, so that the gathers overlap the next forward pass (Megatron's
  // overlap_param_gather): start launches every bucket's all-gather, the buckets the forward
  // needs first (the last ones: buckets are in backward order) first; finish_param_sync(b) waits
  // for bucket b's (nothing if it is not in flight). Parameters of a bucket in flight must not
  // be read.
  void start_param_sync();
  void finish_param_sync(size_t b);
  bool param_sync_in_flight(size_t b) const { return b < param_flights_.size() && param_flights_[b] != nullptr; }
  // Distributed: the whole flat tensor (layout().numel, on the group's device) from a tensor laid
  // out like grad_shard() on every rank. Collective (checkpoints gather the optimizer's moments).
  Tensor gather(const Tensor& local) const;

 private:
  struct InFlight;
  struct Bucket {
    double scale = 1;
    std::unique_ptr<InFlight> flight;
  };
  std::shared_ptr<Communicator> group_;
  std::vector<Parameter*> params_;
  BufferLayout layout_;
  bool distributed_;
  DType dtype_;
  Device device_;
  std::vector<Bucket> buckets_;
  std::vector<std::unique_ptr<InFlight>> param_flights_;  // per bucket, while its all-gather runs
  Tensor grad_, param_, grad_shard_;  // param_ and grad_shard_ only when distributed
};

}  // namespace decotron
