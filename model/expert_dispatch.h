// Moves a DECO layer's active (token, expert) pairs to the rank that holds the expert and the
// results back: Megatron-Core's token dispatcher for ReLU routing, without a capacity factor
// (no pair is ever dropped) and without padding (all-to-all with counts).
//
// The experts this rank routes are the slice [slice_begin, slice_begin + slice_count) (all E
// without tensor parallelism; the tensor-parallel rank's whole experts with it); the expert-
// parallel group splits the slice into equal contiguous blocks, one per rank. Forward:
//   route_pairs (pairs ordered by expert, i.e. by destination rank) -> gather the pairs' rows of
//   x and their scores -> all-to-all (per-expert counts first) -> reorder expert-major
//   -> [the grouped experts run] -> the reverse all-to-all -> scatter-add into the tokens.
// Backward moves the output gradient the same way and the input and score gradients back.
// With an expert-parallel group of one (or none) nothing is sent: gather and scatter only.
// Every rank joins every all-to-all, also when it sends or receives no pair.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "parallel/communicator.h"

namespace decotron {

class ExpertDispatcher {
 public:
  ExpertDispatcher(Communicator* ep, int64_t slice_begin, int64_t slice_count);

  // What this rank's experts receive: the pairs' inputs xp [P, h] and scores sp [P], grouped by
  // local expert (offsets, size local experts + 1), in a fixed order (source rank, then token).
  struct Received {
    Tensor x, s;
    std::vector<int64_t> offsets;
  };
  // r, s [T, E]: router logits and scores of this rank's tokens x [T, h]. Pairs with r > 0, or
  // every pair of the slice when all_pairs (the dense-masked reference through this path).
  Received dispatch(const Tensor& x, const Tensor& r, const Tensor& s, bool all_pairs);
  // The experts' outputs outp [P, h] (Received order) summed into their tokens: [T, h].
  Tensor combine(const Tensor& outp);
  // Backward of combine: each pair's output gradient, rows of dout [T, h], in Received order.
  Tensor dispatch_grad(const Tensor& dout);
  // Backward of dispatch: dx [T, h] (=) from the pairs' input gradients dxp [P, h]; ds [T, E] (=)
  // from the pairs' score gradients dsp [P], zero outside this rank's routed pairs.
  void combine_grad(Tensor& dx, Tensor& ds, const Tensor& dxp, const Tensor& dsp);

  // Without an exchange the received rows are a gather of x: a layer can free them after forward
  // and gather them again for backward (memory ~ pairs x h per layer saved).
  bool exchanges() const { return ep_ != nullptr; }
  Tensor gather_inputs(const Tensor& x) const;

  int64_t local_experts() const { return local_experts_; }
  int64_t pairs_sent() const { return routed_.tokens.numel(); }  // of the last dispatch
  int64_t pairs_received() const { return recv_total_; }

 private:
  // Rows of `rows` [n, c] sent to the peers (send side order) -> rows received, expert-major.
  Tensor send_forward(const Tensor& rows);
  // Rows in expert-major received order -> back to their source ranks, in send order.
  Tensor send_back(const Tensor& rows);

  Communicator* ep_;  // null when the expert-parallel group has one rank
  int64_t slice_begin_, slice_count_, local_experts_;
  int64_t tokens_ = 0, experts_ = 0;  // T and E of the last dispatch
  ops::RoutedPairs routed_;            // this rank's tokens' pairs, by expert = by destination
  std::vector<int64_t> send_counts_, recv_counts_;  // pairs per peer
  int64_t recv_total_ = 0;
  Tensor to_expert_major_;    // i32 [P_recv]: received row of each expert-major row
  Tensor from_expert_major_;  // i32 [P_recv]: expert-major row of each received row
};

}  // namespace decotron
