#include "model/parameter.h"

#include <algorithm>

#include "core/rng.h"
#include "kernels/ops.h"
#include "parallel/tensor_parallel.h"

namespace decotron {

const char* partition_name(Partition p) {
  switch (p) {
    case Partition::replicated: return "replicated";
    case Partition::column: return "column";
    case Partition::row: return "row";
    case Partition::vocab: return "vocab";
    case Partition::expert_rows: return "expert_rows";
    case Partition::expert_cols: return "expert_cols";
    case Partition::expert_entries: return "expert_entries";
  }
  return "?";
}

bool is_expert_partition(Partition p) {
  return p == Partition::expert_rows || p == Partition::expert_cols;
}

Parameter& ParameterSet::add(const std::string& name, const Shape& shape, Partition partition, Init init,
                             double init_value, bool weight_decay, int64_t expert_block) {
  for (const auto& e : entries_) DT_ASSERT(e.p->name != name, "duplicate parameter ", name);
  auto p = std::make_unique<Parameter>();
  p->name = name;
  p->global_shape = shape;
  Shape local = shape;
  const bool expert_split = is_expert_partition(partition);
  const int rank = expert_split ? tp_rank_ * ep_size_ + ep_rank_ : tp_rank_;
  const int size = expert_split ? tp_size_ * ep_size_ : tp_size_;
  if (size > 1) {
    Shard sh = shard_of(name, partition, shape, expert_block, rank, size);
    if (sh.dim >= 0) local[sh.dim] = sh.count, p->shard_dim = sh.dim, p->shard_start = sh.start;
  }
  p->value = Tensor::zeros(local, dtype_, device_);
  p->grad = Tensor::zeros(local, dtype_, device_);
  p->partition = partition;
  p->expert_block = expert_block;
  p->weight_decay = weight_decay;
  entries_.push_back({std::move(p), init, init_value});
  return *entries_.back().p;
}

void ParameterSet::initialize(uint64_t seed) {
  for (auto& e : entries_) {
    // The whole tensor, then this rank's part: the same weights in any layout.
    Tensor host = Tensor::empty(e.p->global_shape, DType::f64);
    double* h = host.data<double>();
    const uint64_t stream = rng::stream_of(e.p->name);
    for (int64_t i = 0; i < host.numel(); ++i) {
      switch (e.init) {
        case Init::normal: h[i] = e.init_value * rng::normal(seed, stream, i); break;
        case Init::ones: h[i] = 1.0; break;
        case Init::constant: h[i] = e.init_value; break;
      }
    }
    if (e.p->shard_dim >= 0)
      host = slice_shard(host, Shard{e.p->shard_dim, e.p->shard_start, e.p->value.dim(e.p->shard_dim)});
    e.p->value.copy_from(cast_cpu(host, dtype_).to(device_));
  }
  mark_master_changed();
}

void ParameterSet::set_compute_dtype(DType dtype) {
  DT_ASSERT(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f64, "compute dtype ", dtype_name(dtype));
  compute_dtype_ = dtype;
  for (auto& e : entries_) {
    Parameter& p = *e.p;
    const bool copy = dtype != dtype_ && !p.full_precision;
    p.compute = copy ? Tensor::empty(p.value.shape(), dtype, device_) : Tensor();
  }
  mark_master_changed();
}

void ParameterSet::sync_compute(size_t begin, size_t end) {
  compute_stale_.resize(entries_.size(), true);
  for (size_t i = begin; i < std::min(end, entries_.size()); ++i) {
    if (!compute_stale_[i]) continue;
    Parameter& p = *entries_[i].p;
    if (p.compute.defined()) ops::convert(p.compute, p.value);
    compute_stale_[i] = false;
  }
}

void ParameterSet::zero_grad() {
  for (auto& e : entries_) e.p->grad.zero_();
}

std::vector<Parameter*> ParameterSet::all() const {
  std::vector<Parameter*> out;
  for (const auto& e : entries_) out.push_back(e.p.get());
  return out;
}

Parameter& ParameterSet::find(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.p->name == name) return *e.p;
  fail("no parameter named '", name, "' in this model");
}

int64_t ParameterSet::count() const {
  int64_t n = 0;
  for (const auto& e : entries_)
    if (e.p->trainable) n += shape_numel(e.p->global_shape);
  return n;
}

}  // namespace decotron
