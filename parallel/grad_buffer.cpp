#include "parallel/grad_buffer.h"

#include <algorithm>
#include <exception>

#include "core/error.h"
#include "kernels/ops.h"

namespace decotron {

namespace {

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// `t` itself when the communicator reads its device; else a copy on the communicator's device.
Tensor comm_side(const Tensor& t, const Communicator& c) { return t.device() == c.device() ? t : t.to(c.device()); }

}  // namespace

Range intersect(const Range& a, const Range& b) {
  Range r{std::max(a.begin, b.begin), std::min(a.end, b.end)};
  return r.empty() ? Range{} : r;
}

Range BufferLayout::shard(size_t b, int rank) const {
  const Range& r = buckets[b].range;
  const int64_t s = r.size() / shards;
  return {r.begin + rank * s, r.begin + (rank + 1) * s};
}

Range BufferLayout::local(size_t b) const {
  // Every bucket is a multiple of `shards` long, so the shards of the buckets before b add up to
  // b's offset divided by `shards`.
  return {buckets[b].range.begin / shards, buckets[b].range.end / shards};
}

std::vector<BufferLayout::Piece> BufferLayout::pieces(int rank) const {
  std::vector<Piece> out;
  for (size_t b = 0; b < buckets.size(); ++b) {
    const Range sh = shard(b, rank), loc = local(b);
    for (size_t i = buckets[b].first; i < buckets[b].last; ++i) {
      const Range x = intersect(params[i], sh);
      if (x.empty()) continue;
      out.push_back({i, {x.begin - params[i].begin, x.end - params[i].begin},
                     {x.begin - sh.begin + loc.begin, x.end - sh.begin + loc.begin}});
    }
  }
  return out;
}

BufferLayout make_buffer_layout(const std::vector<int64_t>& numels, int64_t bucket_numel, int shards) {
  DT_ASSERT(shards >= 1 && bucket_numel >= 1, "buffer layout of ", shards, " shards, buckets of ", bucket_numel);
  BufferLayout l;
  l.shards = shards;
  int64_t end = 0;  // end of the last parameter placed
  auto close_bucket = [&] {
    Range& r = l.buckets.back().range;
    r.end = r.begin + round_up(end - r.begin, shards);  // zero padding: N equal shards
    end = r.end;
  };
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t open = l.buckets.empty() ? 0 : end - l.buckets.back().range.begin;
    if (l.buckets.empty() || (open > 0 && open + numels[i] > bucket_numel)) {
      if (!l.buckets.empty()) close_bucket();
      l.buckets.push_back({Range{end, end}, i, i});
    }
    l.params.push_back({end, end + numels[i]});
    end += numels[i];
    l.buckets.back().last = i + 1;
  }
  if (!l.buckets.empty()) close_bucket();
  l.numel = end;
  return l;
}

// A bucket's collective in flight. When the group's communicator cannot read the buffer's device
// (a CUDA build without NCCL: MPI on host memory) it runs on host copies, and `staged` is copied
// back into `result` after the wait (slow, but correct).
struct GradBuffer::InFlight {
  Tensor send, staged, result;
  std::unique_ptr<CommRequest> req;  // declared last: destroyed (waited for) before the buffers
};

GradBuffer::GradBuffer(std::shared_ptr<Communicator> group, std::vector<Parameter*> params, int64_t bucket_numel,
                       bool distributed, double scale)
    : group_(std::move(group)), params_(std::move(params)), distributed_(distributed) {
  DT_ASSERT(!params_.empty(), "a gradient buffer without parameters");
  dtype_ = params_[0]->grad.dtype();
  device_ = params_[0]->grad.device();
  std::vector<int64_t> numels;
  for (const Parameter* p : params_) {
    DT_ASSERT(p->grad.dtype() == dtype_ && p->grad.device() == device_, "gradient buffer of group '", group_->name(),
              "': ", p->name, " differs in dtype or device from ", params_[0]->name);
    numels.push_back(p->grad.numel());
  }
  layout_ = make_buffer_layout(numels, bucket_numel, distributed_ ? group_->size() : 1);
  buckets_.resize(layout_.buckets.size());
  for (Bucket& b : buckets_) b.scale = scale;
  grad_ = Tensor::zeros({layout_.numel}, dtype_, device_);
  if (distributed_) {
    param_ = Tensor::zeros({layout_.numel}, dtype_, device_);
    grad_shard_ = Tensor::zeros({layout_.local_numel()}, dtype_, device_);
  }
  // From here on the layers accumulate into the buffer (and, distributed, the optimizer's
  // all-gather writes the parameters' values).
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter* p = params_[i];
    const Range r = layout_.params[i];
    Tensor g = grad_.rows(r.begin, r.size()).view(p->grad.shape());
    g.copy_from(p->grad);
    p->grad = g;
    if (distributed_) {
      Tensor v = param_.rows(r.begin, r.size()).view(p->value.shape());
      v.copy_from(p->value);
      p->value = v;
    }
  }
}

GradBuffer::~GradBuffer() {
  // Unwinding from an error (the job is about to abort): waiting for an in-flight bucket could
  // take the whole watchdog timeout if the peers are gone. Leak it instead, with the buffers it
  // uses (its tensors share their storage), so that MPI never writes into freed memory.
  if (std::uncaught_exceptions() > 0) {
    for (Bucket& b : buckets_) static_cast<void>(b.flight.release());
    for (auto& f : param_flights_) static_cast<void>(f.release());
  }
}

void GradBuffer::start_grad_sync(size_t b) {
  DT_ASSERT(!buckets_[b].flight, "bucket ", b, " of group '", group_->name(), "' launched twice in one step");
  const Range r = layout_.buckets[b].range;
  const bool staging = group_->device() != device_;
  Tensor grads = grad_.rows(r.begin, r.size());
  auto f = std::make_unique<InFlight>();
  if (!distributed_) {
    f->staged = comm_side(grads, *group_);
    if (staging) f->result = grads;
    f->req = group_->all_reduce_async(f->staged.raw(), r.size(), comm_type_of(dtype_));
  } else {
    const Range l = layout_.local(b);
    Tensor mine = grad_shard_.rows(l.begin, l.size());
    f->send = comm_side(grads, *group_);
    f->staged = staging ? Tensor::empty({l.size()}, dtype_, group_->device()) : mine;
    if (staging) f->result = mine;
    f->req = group_->reduce_scatter_async(f->send.raw(), f->staged.raw(), l.size(), comm_type_of(dtype_));
  }
  buckets_[b].flight = std::move(f);
}

void GradBuffer::finish_grad_sync(size_t b) {
  Bucket& k = buckets_[b];
  DT_ASSERT(k.flight, "bucket ", b, " of group '", group_->name(), "' waited for without a launch");
  k.flight->req->wait();
  if (k.flight->result.defined()) k.flight->result.copy_from(k.flight->staged);
  k.flight.reset();
  const Range r = distributed_ ? layout_.local(b) : layout_.buckets[b].range;
  Tensor reduced = (distributed_ ? grad_shard_ : grad_).rows(r.begin, r.size());
  ops::scale_(reduced, k.scale);
}

void GradBuffer::poke() {
  for (Bucket& k : buckets_)
    if (k.flight) k.flight->req->test();
  for (auto& f : param_flights_)
    if (f) f->req->test();
}

void GradBuffer::sync_params() {
  // Every bucket launched, then all waited for: the collectives overlap each other.
  start_param_sync();
  for (size_t b = 0; b < buckets_.size(); ++b) finish_param_sync(b);
}

void GradBuffer::start_param_sync() {
  DT_ASSERT(distributed_, "sync_params() on a gradient buffer of group '", group_->name(), "' that is not sharded");
  const bool staging = group_->device() != device_;
  const int64_t es = dtype_size(dtype_);
  param_flights_.resize(buckets_.size());
  for (size_t b = buckets_.size(); b-- > 0;) {
    DT_ASSERT(!param_flights_[b], "start_param_sync() while bucket ", b, "'s gather is in flight");
    const Range r = layout_.buckets[b].range;
    const int64_t s = r.size() / layout_.shards;
    Tensor whole = param_.rows(r.begin, r.size());
    auto f = std::make_unique<InFlight>();
    f->staged = comm_side(whole, *group_);
    if (staging) f->result = whole;
    char* base = static_cast<char*>(f->staged.raw());
    f->req = group_->all_gather_async(base + group_->rank() * s * es, base, s, comm_type_of(dtype_));  // in place
    param_flights_[b] = std::move(f);
  }
}

void GradBuffer::finish_param_sync(size_t b) {
  if (!param_sync_in_flight(b)) return;
  InFlight& f = *param_flights_[b];
  f.req->wait();
  if (f.result.defined()) f.result.copy_from(f.staged);
  param_flights_[b].reset();
}

Tensor GradBuffer::gather(const Tensor& local) const {
  DT_ASSERT(distributed_ && local.numel() == layout_.local_numel() && local.dtype() == dtype_,
            "gather() of a tensor that is not laid out as this rank's shards of group '", group_->name(), "'");
  Tensor src = comm_side(local, *group_);
  Tensor out = Tensor::empty({layout_.numel}, dtype_, group_->device());
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const Range l = layout_.local(b), r = layout_.buckets[b].range;
    group_->all_gather(src.rows(l.begin, l.size()).raw(), out.rows(r.begin, r.size()).raw(), l.size(),
                       comm_type_of(dtype_));
  }
  return out;
}

}  // namespace decotron
