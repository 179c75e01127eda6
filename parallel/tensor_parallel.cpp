#include "parallel/tensor_parallel.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "kernels/ops.h"

namespace decotron {

Tensor on_comm_device(const Tensor& t, const Communicator& c) {
  return t.device() == c.device() ? t : t.to(c.device());
}

namespace {

CommType comm_type_of(const Tensor& t) { return comm_type_of(t.dtype()); }

// `t` on `device`: itself, or a copy.
Tensor on_device(const Tensor& t, Device device) { return t.device() == device ? t : t.to(device); }

// Copies rows of `c` elements between two host tensors of the same dtype: `count` rows from
// src (element offset s0, row pitch sp) to dst (d0, dp). The column re-layouts below run on the
// host: they serve checkpoints and whole-vocabulary logits, not the training step.
void copy_rows_host(Tensor& dst, int64_t d0, int64_t dp, const Tensor& src, int64_t s0, int64_t sp, int64_t count,
                    int64_t c) {
  const int64_t es = dtype_size(src.dtype());
  for (int64_t i = 0; i < count; ++i)
    std::memcpy(static_cast<char*>(dst.raw()) + (d0 + i * dp) * es,
                static_cast<const char*>(src.raw()) + (s0 + i * sp) * es, c * es);
}

}  // namespace

bool is_tensor_parallel_split(Partition p) {
  return p == Partition::column || p == Partition::row || p == Partition::vocab || p == Partition::expert_rows ||
         p == Partition::expert_cols;
}

Block balanced_block(int64_t n, int rank, int size) {
  const int64_t base = n / size, rem = n % size;
  return Block{rank * base + std::min<int64_t>(rank, rem), base + (rank < rem ? 1 : 0)};
}

Shard shard_of(const std::string& name, Partition p, const Shape& global, int64_t expert_block, int rank, int size) {
  Shard s;
  if (size == 1 || !is_tensor_parallel_split(p)) return s;
  s.dim = (p == Partition::row || p == Partition::expert_cols) ? 1 : 0;
  DT_ASSERT(static_cast<int>(global.size()) > s.dim, name, ": partition ", partition_name(p), " on a ",
            global.size(), "-d tensor");
  const int64_t n = global[s.dim];
  if (p == Partition::expert_rows || p == Partition::expert_cols) {
    DT_ASSERT(expert_block > 0 && n % expert_block == 0, name, ": ", n, " not whole experts of ", expert_block);
    const int64_t experts = n / expert_block;
    if (experts < size)
      fail(name, ": ", experts, " experts do not split over ", size,
           " tensor x expert-parallel ranks; every rank needs at least one expert (lower parallel.tensor or "
           "parallel.expert)");
    const Block b = balanced_block(experts, rank, size);
    s.start = b.start * expert_block, s.count = b.count * expert_block;
    return s;
  }
  if (n % size != 0)
    fail(name, ": ", n, " rows/columns do not split over parallel.tensor = ", size,
         " ranks; pick a tensor-parallel size that divides the heads, widths and vocabulary");
  s.count = n / size;
  s.start = rank * s.count;
  return s;
}

Tensor slice_shard(const Tensor& global, const Shard& s) {
  DT_ASSERT(global.device() == Device::cpu, "slice_shard takes a host tensor");
  if (s.dim < 0) return global.clone();
  if (s.dim == 0) return global.rows(s.start, s.count).clone();
  const int64_t rows = global.dim(0), cols = global.dim(1), es = dtype_size(global.dtype());
  Tensor out = Tensor::empty({rows, s.count}, global.dtype());
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(static_cast<char*>(out.raw()) + r * s.count * es,
                static_cast<const char*>(global.raw()) + (r * cols + s.start) * es, s.count * es);
  return out;
}

void tp_all_reduce(Communicator& tp, Tensor& t) {
  Tensor s = on_comm_device(t, tp);
  tp.all_reduce(s.raw(), s.numel(), comm_type_of(s));
  if (s.raw() != t.raw()) t.copy_from(s);
}

Tensor tp_gather_columns(Communicator& tp, const Tensor& local) {
  const int n = tp.size();
  const int64_t rows = local.dim(0), c = local.numel() / rows;
  const Tensor send = on_comm_device(local, tp);
  Tensor stacked = Tensor::empty({n * rows * c}, local.dtype(), tp.device());  // [rank][row][c]
  tp.all_gather(send.raw(), stacked.raw(), rows * c, comm_type_of(local));
  const Tensor host = on_device(stacked, Device::cpu);
  Tensor full = Tensor::empty({rows, c * n}, local.dtype());
  for (int r = 0; r < n; ++r) copy_rows_host(full, r * c, c * n, host, r * rows * c, c, rows, c);
  return on_device(full, local.device());
}

Tensor tp_slice_columns(const Tensor& full, int rank, int size) {
  const int64_t c = full.dim(1) / size;
  return slice_shard(full, Shard{1, rank * c, c});
}

Tensor tp_gather_shards(Communicator& tp, const Tensor& local, int dim) {
  if (dim < 0) return local.clone();
  // The shards' sizes along dim first: equal (the usual case) is one all-gather; uneven
  // (experts that do not divide) sends each shard to every rank with an all-to-all.
  const int n = tp.size();
  std::vector<int64_t> sizes(n, 0);
  const int64_t mine = local.dim(dim);
  sizes[tp.rank()] = mine;
  tp.sum_in_place(sizes);  // host vector: staged on device communicators
  if (std::all_of(sizes.begin(), sizes.end(), [&](int64_t v) { return v == mine; }))
    return dim == 1 ? tp_gather_columns(tp, local) : tp_gather_rows(tp, local);
  const int64_t other = local.numel() / std::max<int64_t>(mine, 1);  // elements per unit of dim
  const int64_t rows = dim == 0 ? 0 : local.dim(0);
  std::vector<int64_t> send(n, local.numel()), recv(n);
  int64_t total = 0;
  for (int r = 0; r < n; ++r) recv[r] = sizes[r] * (dim == 0 ? other : rows), total += sizes[r];
  Tensor stacked =
      Tensor::empty({std::accumulate(recv.begin(), recv.end(), int64_t{0})}, local.dtype(), tp.device());
  // Rank r's shard to every rank: the sender repeats its block once per peer.
  const Tensor flat = local.view({1, local.numel()});
  Tensor repeated = Tensor::empty({n, local.numel()}, local.dtype(), tp.device());
  for (int r = 0; r < n; ++r) repeated.rows(r, 1).copy_from(flat);
  tp.all_to_all(repeated.raw(), send, stacked.raw(), recv, comm_type_of(local));
  Shape shape = local.shape();
  shape[dim] = total;
  if (dim == 0) return on_device(stacked.view(shape), local.device());
  // Columns: rank r's [rows, c_r] block goes to columns [off_r, off_r + c_r) of every row.
  const Tensor host = on_device(stacked, Device::cpu);
  Tensor full = Tensor::empty(shape, local.dtype());
  int64_t src = 0, off = 0;
  for (int r = 0; r < n; ++r) {
    copy_rows_host(full, off, total, host, src, sizes[r], rows, sizes[r]);
    src += rows * sizes[r], off += sizes[r];
  }
  return on_device(full, local.device());
}

Tensor tp_gather_rows(Communicator& tp, const Tensor& local) {
  Shape shape = local.shape();
  shape[0] *= tp.size();
  const Tensor send = on_comm_device(local, tp);
  Tensor full = Tensor::empty(shape, local.dtype(), tp.device());
  tp.all_gather(send.raw(), full.raw(), local.numel(), comm_type_of(local));  // rank order = row order
  return on_device(full, local.device());
}

Tensor tp_reduce_scatter_rows(Communicator& tp, const Tensor& partial) {
  Shape shape = partial.shape();
  DT_ASSERT(shape[0] % tp.size() == 0, "sequence-parallel reduce-scatter of ", shape_str(shape), " over ", tp.size(),
            " ranks: the tokens do not split");
  shape[0] /= tp.size();
  const Tensor send = on_comm_device(partial, tp);
  Tensor mine = Tensor::empty(shape, partial.dtype(), tp.device());
  tp.reduce_scatter(send.raw(), mine.raw(), mine.numel(), comm_type_of(partial));
  return on_device(mine, partial.device());
}

Tensor TensorParallelMappings::enter(const Tensor& x) const {
  if (!tp || !sequence_parallel) return x;
  return tp_gather_rows(*tp, x);
}

Tensor TensorParallelMappings::enter_backward(Tensor dx) const {
  if (!tp) return dx;
  if (sequence_parallel) return tp_reduce_scatter_rows(*tp, dx);
  tp_all_reduce(*tp, dx);
  return dx;
}

Tensor TensorParallelMappings::exit(Tensor y) const {
  if (!tp) return y;
  if (sequence_parallel) return tp_reduce_scatter_rows(*tp, y);
  tp_all_reduce(*tp, y);
  return y;
}

Tensor TensorParallelMappings::exit_backward(const Tensor& dy) const {
  if (!tp || !sequence_parallel) return dy;
  return tp_gather_rows(*tp, dy);
}

void tp_all_reduce_sequence_parallel_grads(Communicator& tp, const std::vector<Parameter*>& params) {
  std::vector<Parameter*> flagged;
  int64_t n = 0;
  for (Parameter* p : params)
    if (p->sequence_parallel && p->trainable) flagged.push_back(p), n += p->grad.numel();
  if (flagged.empty() || tp.size() == 1) return;
  // Megatron-Core's _allreduce_layernorm_grads: packed into one buffer, one collective.
  const DType dt = flagged[0]->grad.dtype();
  Tensor buf = Tensor::empty({n}, dt, flagged[0]->grad.device());
  int64_t off = 0;
  for (Parameter* p : flagged) {
    DT_ASSERT(p->grad.dtype() == dt, p->name, ": sequence-parallel gradients of mixed dtypes");
    buf.rows(off, p->grad.numel()).copy_from(p->grad.view({p->grad.numel()}));
    off += p->grad.numel();
  }
  tp_all_reduce(tp, buf);
  off = 0;
  for (Parameter* p : flagged) {
    p->grad.view({p->grad.numel()}).copy_from(buf.rows(off, p->grad.numel()));
    off += p->grad.numel();
  }
}

namespace {

// The tokens of the micro-batch that fall in this rank's rows [start, start + rows): their
// positions and their local row ids, as i32 tensors on `device` (built on the host: T ids).
struct VocabRange {
  Tensor positions, local_ids;
  int64_t count = 0;
};
VocabRange vocab_range(const Tensor& tokens, int64_t start, int64_t rows, Device device) {
  const Tensor host = on_device(tokens, Device::cpu);
  const int32_t* tok = host.data<int32_t>();
  std::vector<int32_t> pos, ids;
  for (int64_t t = 0; t < host.numel(); ++t) {
    const int64_t row = static_cast<int64_t>(tok[t]) - start;
    if (row >= 0 && row < rows) pos.push_back(static_cast<int32_t>(t)), ids.push_back(static_cast<int32_t>(row));
  }
  VocabRange r;
  r.count = static_cast<int64_t>(pos.size());
  auto to_tensor = [&](const std::vector<int32_t>& v) {
    Tensor t = Tensor::empty({r.count}, DType::i32);
    std::copy(v.begin(), v.end(), t.data<int32_t>());
    return on_device(t, device);
  };
  r.positions = to_tensor(pos), r.local_ids = to_tensor(ids);
  return r;
}

}  // namespace

// Both directions are a row gather and a row scatter-add (the embedding ops), so they run on
// any device and dtype the embedding kernels take.
void vocab_embedding_forward(Tensor& y, const Tensor& tokens, const Tensor& table, int64_t start) {
  const VocabRange r = vocab_range(tokens, start, table.dim(0), table.device());
  y.zero_();
  if (r.count == 0) return;
  Tensor rows = Tensor::empty({r.count, table.dim(1)}, table.dtype(), table.device());
  ops::embedding_forward(rows, r.local_ids, table);
  ops::embedding_backward(y, r.positions, rows);  // into zeros at distinct positions: a placement
}

void vocab_embedding_backward(Tensor& dtable, const Tensor& tokens, const Tensor& dy, int64_t start) {
  const VocabRange r = vocab_range(tokens, start, dtable.dim(0), dtable.device());
  if (r.count == 0) return;
  Tensor rows = Tensor::empty({r.count, dy.dim(1)}, dy.dtype(), dy.device());
  ops::embedding_forward(rows, r.positions, dy);
  ops::embedding_backward(dtable, r.local_ids, rows);
}

}  // namespace decotron
