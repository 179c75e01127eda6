#include "model/expert_dispatch.h"

#include "core/error.h"

namespace decotron {

namespace {

// The embedding lookup is a row gather and its backward a row scatter-add: the same kernels
// move the pairs' rows (and, through [n, 1] views, their scalars).
Tensor gather_rows(const Tensor& src, const Tensor& index) {
  Tensor out = Tensor::empty({index.numel(), src.dim(1)}, src.dtype(), src.device());
  if (index.numel() > 0) ops::embedding_forward(out, index, src);
  return out;
}

void scatter_add_rows(Tensor& dst, const Tensor& index, const Tensor& rows) {
  if (index.numel() > 0) ops::embedding_backward(dst, index, rows);
}

CommType comm_type_of(const Tensor& t) {
  DT_ASSERT(t.dtype() == DType::f32 || t.dtype() == DType::f64, "expert dispatch moves fp32 or fp64, not ",
            dtype_name(t.dtype()));
  return t.dtype() == DType::f32 ? CommType::f32 : CommType::f64;
}

Tensor i32_tensor(const std::vector<int32_t>& v, Device device) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i32);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return device == Device::cpu ? t : t.to(device);
}

}  // namespace

ExpertDispatcher::ExpertDispatcher(Communicator* ep, int64_t slice_begin, int64_t slice_count)
    : ep_(ep && ep->size() > 1 ? ep : nullptr), slice_begin_(slice_begin), slice_count_(slice_count) {
  const int K = ep_ ? ep_->size() : 1;
  DT_ASSERT(slice_count % K == 0, slice_count, " experts do not split over ", K, " expert-parallel ranks");
  local_experts_ = slice_count / K;
}

ExpertDispatcher::Received ExpertDispatcher::dispatch(const Tensor& x, const Tensor& r, const Tensor& s,
                                                      bool all_pairs) {
  tokens_ = r.dim(0), experts_ = r.dim(1);
  ops::route_pairs(routed_, r, slice_begin_, slice_begin_ + slice_count_, all_pairs);
  const int64_t P = routed_.tokens.numel();
  Tensor xs = gather_rows(x, routed_.tokens);
  Tensor ss = gather_rows(s.view({tokens_ * experts_, 1}), routed_.slots);
  if (!exchanges()) {
    recv_total_ = P;
    return Received{xs, ss.view({P}), routed_.offsets};
  }
  // Per-expert counts first: the receiver learns how many rows of each source belong to each of
  // its experts (rank k holds the slice's experts [k*E_l, (k+1)*E_l)).
  const int K = ep_->size();
  const int64_t El = local_experts_;
  std::vector<int64_t> send_per_expert(K * El), recv_per_expert(K * El);
  for (int64_t i = 0; i < K * El; ++i) send_per_expert[i] = routed_.offsets[i + 1] - routed_.offsets[i];
  ep_->all_to_all(send_per_expert.data(), std::vector<int64_t>(K, El), recv_per_expert.data(),
                  std::vector<int64_t>(K, El), CommType::i64);
  send_counts_.assign(K, 0);
  recv_counts_.assign(K, 0);
  for (int k = 0; k < K; ++k)
    for (int64_t e = 0; e < El; ++e) {
      send_counts_[k] += send_per_expert[k * El + e];
      recv_counts_[k] += recv_per_expert[k * El + e];
    }
  // Received rows come source-major (source, expert, token); the experts want expert-major.
  std::vector<int64_t> start(K * El);  // received row where (source k, expert e) begins
  int64_t row = 0;
  for (int k = 0; k < K; ++k)
    for (int64_t e = 0; e < El; ++e) start[k * El + e] = row, row += recv_per_expert[k * El + e];
  recv_total_ = row;
  std::vector<int32_t> to_major, from_major(recv_total_);
  std::vector<int64_t> offsets(1, 0);
  for (int64_t e = 0; e < El; ++e) {
    for (int k = 0; k < K; ++k)
      for (int64_t i = 0; i < recv_per_expert[k * El + e]; ++i) {
        from_major[start[k * El + e] + i] = static_cast<int32_t>(to_major.size());
        to_major.push_back(static_cast<int32_t>(start[k * El + e] + i));
      }
    offsets.push_back(static_cast<int64_t>(to_major.size()));
  }
  to_expert_major_ = i32_tensor(to_major, x.device());
  from_expert_major_ = i32_tensor(from_major, x.device());
  Tensor sr = send_forward(ss);
  return Received{send_forward(xs), sr.view({recv_total_}), offsets};
}

Tensor ExpertDispatcher::gather_inputs(const Tensor& x) const {
  DT_ASSERT(!exchanges(), "gather_inputs: the received rows came from other ranks");
  return gather_rows(x, routed_.tokens);
}

Tensor ExpertDispatcher::send_forward(const Tensor& rows) {
  if (!exchanges()) return rows;
  const int64_t c = rows.dim(1);
  std::vector<int64_t> sc(send_counts_), rc(recv_counts_);
  for (auto& n : sc) n *= c;
  for (auto& n : rc) n *= c;
  Tensor received = Tensor::empty({recv_total_, c}, rows.dtype(), rows.device());
  ep_->all_to_all(rows.raw(), sc, received.raw(), rc, comm_type_of(rows));
  return gather_rows(received, to_expert_major_);
}

Tensor ExpertDispatcher::send_back(const Tensor& rows) {
  if (!exchanges()) return rows;
  const int64_t c = rows.dim(1);
  Tensor received_order = gather_rows(rows, from_expert_major_);
  std::vector<int64_t> sc(recv_counts_), rc(send_counts_);
  for (auto& n : sc) n *= c;
  for (auto& n : rc) n *= c;
  Tensor back = Tensor::empty({routed_.tokens.numel(), c}, rows.dtype(), rows.device());
  ep_->all_to_all(received_order.raw(), sc, back.raw(), rc, comm_type_of(rows));
  return back;
}

Tensor ExpertDispatcher::combine(const Tensor& outp) {
  Tensor back = send_back(outp);
  Tensor out = Tensor::zeros({tokens_, outp.dim(1)}, outp.dtype(), outp.device());
  scatter_add_rows(out, routed_.tokens, back);
  return out;
}

Tensor ExpertDispatcher::dispatch_grad(const Tensor& dout) { return send_forward(gather_rows(dout, routed_.tokens)); }

void ExpertDispatcher::combine_grad(Tensor& dx, Tensor& ds, const Tensor& dxp, const Tensor& dsp) {
  Tensor back = send_back(dxp);
  dx.zero_();
  scatter_add_rows(dx, routed_.tokens, back);
  Tensor ds_back = send_back(dsp.view({dsp.numel(), 1}));
  ds.zero_();
  Tensor ds_slots = ds.view({tokens_ * experts_, 1});
  scatter_add_rows(ds_slots, routed_.slots, ds_back);
}

}  // namespace decotron
