#include "model/expert_dispatch.h"

#include <algorithm>

#include "core/error.h"
#include "parallel/tensor_parallel.h"

namespace decotron {

namespace {

// The embedding lookup is a row gather and its backward a row scatter-add: the same kernels
// move the pairs' rows (and, through [n, 1] views, their scalars).
Tensor gather_rows(const Tensor& src, const Tensor& index) {
  Tensor out = Tensor::empty({index.numel(), src.dim(1)}, src.dtype(), src.device());
  if (index.numel() > 0) ops::embedding_forward(out, index, src);
  return out;
}

Tensor scatter_add_rows(int64_t rows, const Tensor& index, const Tensor& src) {
  Tensor out = Tensor::zeros({rows, src.dim(1)}, src.dtype(), src.device());
  if (index.numel() > 0) ops::embedding_backward(out, index, src);
  return out;
}

CommType comm_type_of(const Tensor& t) { return comm_type_of(t.dtype()); }

Tensor i32_tensor(const std::vector<int32_t>& v, Device device) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i32);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return device == Device::cpu ? t : t.to(device);
}

std::vector<int64_t> times(std::vector<int64_t> v, int64_t c) {
  for (auto& n : v) n *= c;
  return v;
}

}  // namespace

ExpertDispatcher::ExpertDispatcher(Communicator* ep, std::vector<int64_t> bounds)
    : ep_(ep && ep->size() > 1 ? ep : nullptr), bounds_(std::move(bounds)) {
  const int K = ep_ ? ep_->size() : 1;
  DT_ASSERT(static_cast<int>(bounds_.size()) == K + 1, "expert dispatch: ", bounds_.size() - 1, " expert blocks for ",
            K, " expert-parallel ranks");
  for (int k = 0; k < K; ++k) DT_ASSERT(bounds_[k] < bounds_[k + 1], "expert dispatch: a rank without experts");
  const int me = ep_ ? ep_->rank() : 0;
  local_experts_ = bounds_[me + 1] - bounds_[me];
}

Tensor ExpertDispatcher::exchange(const Tensor& rows, const std::vector<int64_t>& send,
                                  const std::vector<int64_t>& recv, int64_t recv_total) const {
  // Staged through the communicator's device when the rows live elsewhere (MPI with GPU data).
  const int64_t c = rows.dim(1);
  const Tensor src = on_comm_device(rows, *ep_);
  Tensor out = Tensor::empty({recv_total, c}, rows.dtype(), ep_->device());
  ep_->all_to_all(src.raw(), times(send, c), out.raw(), times(recv, c), comm_type_of(rows));
  return out.device() == rows.device() ? out : out.to(rows.device());
}

ExpertDispatcher::Received ExpertDispatcher::dispatch(const Tensor& x, const Tensor& r, const Tensor& s,
                                                      bool all_pairs) {
  tokens_ = r.dim(0), experts_ = r.dim(1);
  ops::route_pairs(routed_, r, bounds_.front(), bounds_.back(), all_pairs);
  const int64_t P = routed_.tokens.numel();
  Tensor ss = gather_rows(s.view({tokens_ * experts_, 1}), routed_.slots);
  if (!exchanges()) {
    recv_pairs_ = P;
    return Received{x, routed_.tokens, ss.view({P}), routed_.offsets};
  }
  const int K = ep_->size();
  const int64_t El = local_experts_;
  // Peer k's experts, relative to the slice: routed_.offsets[first[k] .. first[k + 1]].
  std::vector<int64_t> first(K + 1);
  for (int k = 0; k <= K; ++k) first[k] = bounds_[k] - bounds_[0];
  // Send side: per peer, the distinct tokens of its pairs (ascending) are the rows sent; each
  // pair names its token's row within that peer's block.
  const Tensor host_tokens = routed_.tokens.device() == Device::cpu ? routed_.tokens : routed_.tokens.to(Device::cpu);
  const int32_t* tok = host_tokens.data<int32_t>();
  std::vector<int32_t> rows_tokens;
  std::vector<int64_t> pair_rows(P);
  std::vector<int64_t> header;  // per peer: rows, then the pairs of each of its experts
  std::vector<int64_t> header_send(K), header_recv(K, El + 1);
  send_rows_.assign(K, 0), send_pairs_.assign(K, 0);
  for (int k = 0; k < K; ++k) {
    const int64_t p0 = routed_.offsets[first[k]], p1 = routed_.offsets[first[k + 1]];
    std::vector<int32_t> mine(tok + p0, tok + p1);
    std::sort(mine.begin(), mine.end());
    mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
    for (int64_t p = p0; p < p1; ++p)
      pair_rows[p] = std::lower_bound(mine.begin(), mine.end(), tok[p]) - mine.begin();
    rows_tokens.insert(rows_tokens.end(), mine.begin(), mine.end());
    send_rows_[k] = static_cast<int64_t>(mine.size());
    send_pairs_[k] = p1 - p0;
    header.push_back(send_rows_[k]);
    for (int64_t e = first[k]; e < first[k + 1]; ++e) header.push_back(routed_.offsets[e + 1] - routed_.offsets[e]);
    header_send[k] = 1 + first[k + 1] - first[k];
  }
  send_tokens_ = i32_tensor(rows_tokens, x.device());
  // The counts first, then the pairs' rows and scores, then the rows themselves.
  std::vector<int64_t> recv_header(K * (El + 1));
  ep_->all_to_all_host(header, header_send, recv_header, header_recv);
  recv_rows_.assign(K, 0), recv_pairs_per_peer_.assign(K, 0);
  for (int k = 0; k < K; ++k) {
    recv_rows_[k] = recv_header[k * (El + 1)];
    for (int64_t e = 0; e < El; ++e) recv_pairs_per_peer_[k] += recv_header[k * (El + 1) + 1 + e];
  }
  recv_rows_total_ = 0, recv_pairs_ = 0;
  for (int k = 0; k < K; ++k) recv_rows_total_ += recv_rows_[k], recv_pairs_ += recv_pairs_per_peer_[k];
  std::vector<int64_t> recv_pair_rows(recv_pairs_);
  ep_->all_to_all_host(pair_rows, send_pairs_, recv_pair_rows, recv_pairs_per_peer_);
  Tensor s_received = exchange(ss, send_pairs_, recv_pairs_per_peer_, recv_pairs_);
  received_rows_ = exchange(gather_rows(x, send_tokens_), send_rows_, recv_rows_, recv_rows_total_);
  // Received pairs come source-major (source, expert, token); the experts want expert-major.
  std::vector<int64_t> pair_start(K * El), row_base(K);  // received pair where (k, e) begins
  for (int64_t k = 0, p = 0, row = 0; k < K; ++k) {
    row_base[k] = row, row += recv_rows_[k];
    for (int64_t e = 0; e < El; ++e) pair_start[k * El + e] = p, p += recv_header[k * (El + 1) + 1 + e];
  }
  std::vector<int32_t> to_major, row_of, from_major(recv_pairs_);
  std::vector<int64_t> offsets(1, 0);
  for (int64_t e = 0; e < El; ++e) {
    for (int k = 0; k < K; ++k)
      for (int64_t i = 0; i < recv_header[k * (El + 1) + 1 + e]; ++i) {
        const int64_t p = pair_start[k * El + e] + i;
        from_major[p] = static_cast<int32_t>(to_major.size());
        to_major.push_back(static_cast<int32_t>(p));
        row_of.push_back(static_cast<int32_t>(row_base[k] + recv_pair_rows[p]));
      }
    offsets.push_back(static_cast<int64_t>(to_major.size()));
  }
  pair_row_ = i32_tensor(row_of, x.device());
  pair_from_major_ = i32_tensor(from_major, x.device());
  Tensor sp = gather_rows(s_received, i32_tensor(to_major, x.device()));
  return Received{received_rows_, pair_row_, sp.view({recv_pairs_}), offsets};
}

void ExpertDispatcher::release() {
  routed_ = ops::RoutedPairs{};
  send_tokens_ = received_rows_ = pair_row_ = pair_from_major_ = Tensor();
}

Tensor ExpertDispatcher::pair_dot(const Tensor& x, const Tensor& w, DType dt) const {
  const Tensor& rows = exchanges() ? received_rows_ : x;
  const Tensor& index = exchanges() ? pair_row_ : routed_.tokens;
  const int64_t h = w.numel(), n = h ? rows.numel() / h : 0;
  Tensor dots = Tensor::empty({n, 1}, dt, rows.device());
  ops::linear_forward(dots, rows, w.view({1, h}));
  return gather_rows(dots, index).view({index.numel()});
}

Tensor ExpertDispatcher::combine(const Tensor& outp) {
  if (!exchanges()) {
    Tensor out = Tensor::empty({tokens_, outp.dim(1)}, outp.dtype(), outp.device());
    ops::combine_pairs(out, routed_.slot_pair, outp);
    return out;
  }
  // A token's outputs from this rank's experts are summed here and travel back as one row.
  Tensor rows = scatter_add_rows(recv_rows_total_, pair_row_, outp);
  return scatter_add_rows(tokens_, send_tokens_, exchange(rows, recv_rows_, send_rows_, send_tokens_.numel()));
}

Tensor ExpertDispatcher::dispatch_grad(const Tensor& dout) {
  if (!exchanges()) return dout;
  return exchange(gather_rows(dout, send_tokens_), send_rows_, recv_rows_, recv_rows_total_);
}

void ExpertDispatcher::combine_grad(Tensor& dx, Tensor& ds, Tensor& g, const Tensor& dxp, const Tensor& dsp,
                                    const Tensor& gmean) {
  // The per-pair scalars, back in this rank's routed order (routed_.slot_pair indexes that).
  Tensor ds_pairs = dsp, g_pairs = gmean;
  if (!exchanges()) {
    dx = Tensor::empty({tokens_, dxp.dim(1)}, dxp.dtype(), dxp.device());
    ops::combine_pairs(dx, routed_.slot_pair, dxp);
  } else {
    Tensor rows = scatter_add_rows(recv_rows_total_, pair_row_, dxp);
    dx = scatter_add_rows(tokens_, send_tokens_, exchange(rows, recv_rows_, send_rows_, send_tokens_.numel()));
    auto back = [&](const Tensor& v) {
      return exchange(gather_rows(v.view({v.numel(), 1}), pair_from_major_), recv_pairs_per_peer_, send_pairs_,
                      routed_.tokens.numel())
          .view({routed_.tokens.numel()});
    };
    ds_pairs = back(dsp);
    if (gmean.defined()) g_pairs = back(gmean);
  }
  ops::pairs_to_slots(ds, routed_.slot_pair, ds_pairs, bounds_.front());
  if (gmean.defined()) {
    g = Tensor::empty({tokens_, 1}, g_pairs.dtype(), g_pairs.device());
    ops::combine_pairs(g, routed_.slot_pair, g_pairs.view({g_pairs.numel(), 1}));
    g = g.view({tokens_});
  }
}

}  // namespace decotron
