// Moves a DECO layer's active (token, expert) pairs to the rank that holds the expert and the
// results back: Megatron-Core's token dispatcher for ReLU routing, without a capacity factor
// (no pair is ever dropped) and without padding (all-to-all with counts).
//
// The experts this rank routes are a contiguous slice (all E without tensor parallelism; the
// tensor-parallel rank's whole experts with it), split into one contiguous block per rank of the
// expert-parallel group (`bounds`: peer k holds experts [bounds[k], bounds[k+1]); the blocks may
// differ by one expert when the experts do not divide). Forward:
//   route_pairs (pairs ordered by expert, i.e. by destination rank) -> per destination, the
//   tokens with at least one active expert there, each sent ONCE (h floats), with per pair its
//   row, its expert (by the counts) and its score -> all-to-all -> the receiver expands the rows
//   into pairs, expert-major -> [the grouped experts run] -> each token's outputs summed on the
//   receiver -> the reverse all-to-all (one row per token and rank) -> added into the tokens.
// Backward moves the output gradient the same way (one row per token and rank) and the input
// gradient (summed per token on the receiver) and the score gradients (one per pair) back.
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
  // bounds: size (expert-parallel size + 1), global expert indices, ascending.
  ExpertDispatcher(Communicator* ep, std::vector<int64_t> bounds);

  // What this rank's experts receive: per pair its input row, row index[p] of `rows` [R, h] (this
  // rank's tokens x itself, or the rows received from the expert-parallel peers: no [P, h] copy),
  // and its score s [P]; pairs grouped by local expert (offsets, size local experts + 1), in a
  // fixed order (source rank, then token).
  struct Received {
    Tensor rows, index, s;
    std::vector<int64_t> offsets;
  };
  // r, s [T, E]: router logits and scores of this rank's tokens x [T, h]. Pairs with r > 0, or
  // every pair of the slice when all_pairs (the dense-masked reference through this path).
  Received dispatch(const Tensor& x, const Tensor& r, const Tensor& s, bool all_pairs);
  // Received::rows again after forward, from x [T, h] (the layer's input, as given to dispatch):
  // x itself, or the rows received (kept since dispatch). A layer need not hold Received::rows.
  const Tensor& input_rows(const Tensor& x) const { return exchanges() ? received_rows_ : x; }
  // Per received pair, its token's row of x [T, h] (the layer's input, as given to dispatch)
  // dotted with w [h]: [P] of dtype dt, one dot per distinct row (token, or row received),
  // gathered to the pairs. NormSiLU's mean x . w_bar without re-reading P x h.
  Tensor pair_dot(const Tensor& x, const Tensor& w, DType dt) const;
  // The experts' outputs outp [P, h] (Received order) summed into their tokens: [T, h].
  Tensor combine(const Tensor& outp);
  // Backward of combine: the rows whose row Received::index[p] is pair p's output gradient: dout
  // [T, h] itself, or under expert parallelism the rows of it received from the peers.
  Tensor dispatch_grad(const Tensor& dout);
  // Backward of dispatch: dx [T, h] (=) from the pairs' input gradients dxp [P, h]; ds [T, E] (=)
  // from the pairs' score gradients dsp [P], zero outside this rank's routed pairs; when gmean
  // [P] (a scalar per pair, Received order) is defined, g [T] (=): per token the sum of its
  // pairs' gmean over this rank's routed experts (the mean's gradient of NormSiLU, applied per
  // token by the layer).
  void combine_grad(Tensor& dx, Tensor& ds, Tensor& g, const Tensor& dxp, const Tensor& dsp, const Tensor& gmean);

  // Drops the last dispatch's routing and received rows (activation recomputation).
  void release();

  int64_t local_experts() const { return local_experts_; }
  int64_t pairs_received() const { return recv_pairs_; }  // of the last dispatch
  int64_t rows_sent() const { return send_tokens_.numel(); }

 private:
  bool exchanges() const { return ep_ != nullptr; }
  // Sends rows [n, c] in send order (counts per peer `send`) and returns the received [m, c].
  Tensor exchange(const Tensor& rows, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
                  int64_t recv_total) const;

  Communicator* ep_;  // null when the expert-parallel group has one rank
  std::vector<int64_t> bounds_;  // peer k's experts: [bounds_[k], bounds_[k+1])
  int64_t local_experts_;
  int64_t tokens_ = 0, experts_ = 0;  // T and E of the last dispatch
  ops::RoutedPairs routed_;            // this rank's tokens' pairs, by expert = by destination
  int64_t recv_pairs_ = 0;
  // Expert parallelism only:
  Tensor send_tokens_;                   // i32: the token of each row sent, peer by peer
  std::vector<int64_t> send_rows_, recv_rows_;    // rows per peer
  std::vector<int64_t> send_pairs_, recv_pairs_per_peer_;  // pairs per peer
  int64_t recv_rows_total_ = 0;
  Tensor received_rows_;                 // [recv rows, h]: the tokens' inputs sent to this rank
  Tensor pair_row_;                      // i32 [P]: received row of each expert-major pair
  Tensor pair_from_major_;               // i32 [P]: expert-major index of each received pair
};

}  // namespace decotron
