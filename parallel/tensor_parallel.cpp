#include "parallel/tensor_parallel.h"

#include <type_traits>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/error.h"

namespace decotron {

void tp_require_host(const Tensor& t, const char* what) {
  if (t.device() != Device::cpu)
    fail(what, ": tensor parallelism runs on the CPU so far (docs/parallelism.md); set train.device: cpu");
}

namespace {

CommType comm_type_of(const Tensor& t) { return comm_type_of(t.dtype()); }

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
  tp_require_host(global, "slice_shard");
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
  tp_require_host(t, "tensor-parallel all-reduce");
  tp.all_reduce(t.raw(), t.numel(), comm_type_of(t));
}

Tensor tp_gather_columns(Communicator& tp, const Tensor& local) {
  tp_require_host(local, "tensor-parallel gather");
  const int n = tp.size();
  const int64_t rows = local.dim(0), c = local.numel() / rows, es = dtype_size(local.dtype());
  Tensor stacked = Tensor::empty({n * rows * c}, local.dtype());  // [rank][row][c]
  tp.all_gather(local.raw(), stacked.raw(), rows * c, comm_type_of(local));
  Tensor full = Tensor::empty({rows, c * n}, local.dtype());
  for (int r = 0; r < n; ++r)
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(static_cast<char*>(full.raw()) + (i * c * n + r * c) * es,
                  static_cast<const char*>(stacked.raw()) + ((r * rows + i) * c) * es, c * es);
  return full;
}

Tensor tp_slice_columns(const Tensor& full, int rank, int size) {
  const int64_t c = full.dim(1) / size;
  return slice_shard(full, Shard{1, rank * c, c});
}

Tensor tp_gather_shards(Communicator& tp, const Tensor& local, int dim) {
  if (dim < 0) return local.clone();
  tp_require_host(local, "tensor-parallel gather");
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
  const int64_t rows = dim == 0 ? 0 : local.dim(0), es = dtype_size(local.dtype());
  std::vector<int64_t> send(n, local.numel()), recv(n);
  int64_t total = 0;
  for (int r = 0; r < n; ++r) recv[r] = sizes[r] * (dim == 0 ? other : rows), total += sizes[r];
  Tensor stacked = Tensor::empty({std::accumulate(recv.begin(), recv.end(), int64_t{0})}, local.dtype());
  // Rank r's shard to every rank: the sender repeats its block once per peer.
  Tensor repeated = Tensor::empty({n * local.numel()}, local.dtype());
  for (int r = 0; r < n; ++r)
    std::memcpy(static_cast<char*>(repeated.raw()) + r * local.numel() * es, local.raw(), local.numel() * es);
  tp.all_to_all(repeated.raw(), send, stacked.raw(), recv, comm_type_of(local));
  Shape shape = local.shape();
  shape[dim] = total;
  if (dim == 0) return stacked.view(shape);
  // Columns: rank r's [rows, c_r] block goes to columns [off_r, off_r + c_r) of every row.
  Tensor full = Tensor::empty(shape, local.dtype());
  int64_t src = 0, off = 0;
  for (int r = 0; r < n; ++r) {
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(static_cast<char*>(full.raw()) + (i * total + off) * es,
                  static_cast<const char*>(stacked.raw()) + (src + i * sizes[r]) * es, sizes[r] * es);
    src += rows * sizes[r], off += sizes[r];
  }
  return full;
}

Tensor tp_gather_rows(Communicator& tp, const Tensor& local) {
  tp_require_host(local, "sequence-parallel gather");
  Shape shape = local.shape();
  shape[0] *= tp.size();
  Tensor full = Tensor::empty(shape, local.dtype());
  tp.all_gather(local.raw(), full.raw(), local.numel(), comm_type_of(local));  // rank order = row order
  return full;
}

Tensor tp_reduce_scatter_rows(Communicator& tp, const Tensor& partial) {
  tp_require_host(partial, "sequence-parallel reduce-scatter");
  Shape shape = partial.shape();
  DT_ASSERT(shape[0] % tp.size() == 0, "sequence-parallel reduce-scatter of ", shape_str(shape), " over ", tp.size(),
            " ranks: the tokens do not split");
  shape[0] /= tp.size();
  Tensor mine = Tensor::empty(shape, partial.dtype());
  tp.reduce_scatter(partial.raw(), mine.raw(), mine.numel(), comm_type_of(partial));
  return mine;
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
  const int64_t es = dtype_size(dt);
  Tensor buf = Tensor::empty({n}, dt);
  int64_t off = 0;
  for (Parameter* p : flagged) {
    DT_ASSERT(p->grad.dtype() == dt, p->name, ": sequence-parallel gradients of mixed dtypes");
    tp_require_host(p->grad, "sequence-parallel gradient all-reduce");
    std::memcpy(static_cast<char*>(buf.raw()) + off * es, p->grad.raw(), p->grad.nbytes());
    off += p->grad.numel();
  }
  tp_all_reduce(tp, buf);
  off = 0;
  for (Parameter* p : flagged) {
    std::memcpy(p->grad.raw(), static_cast<const char*>(buf.raw()) + off * es, p->grad.nbytes());
    off += p->grad.numel();
  }
}

namespace {
template <class T>
void embed(T* y, const int32_t* tok, const T* table, int64_t T_, int64_t h, int64_t start, int64_t rows, bool back,
           T* dtable, const T* dy) {
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t row = static_cast<int64_t>(tok[t]) - start;
    const bool mine = row >= 0 && row < rows;
    if (!back) {
      for (int64_t j = 0; j < h; ++j) y[t * h + j] = mine ? table[row * h + j] : T(0);
    } else if constexpr (!std::is_same_v<T, bf16>) {  // gradients are fp32 (or fp64)
      if (mine)
        for (int64_t j = 0; j < h; ++j) dtable[row * h + j] += dy[t * h + j];
    }
  }
}
}  // namespace

void vocab_embedding_forward(Tensor& y, const Tensor& tokens, const Tensor& table, int64_t start) {
  tp_require_host(table, "vocabulary-parallel embedding");
  const int64_t T_ = tokens.numel(), h = table.dim(1), rows = table.dim(0);
  if (table.dtype() == DType::f32)
    embed<float>(y.data<float>(), tokens.data<int32_t>(), table.data<float>(), T_, h, start, rows, false, nullptr,
                 nullptr);
  else if (table.dtype() == DType::bf16)  // mixed precision: the table's compute copy (a row copy, exact)
    embed<bf16>(y.data<bf16>(), tokens.data<int32_t>(), table.data<bf16>(), T_, h, start, rows, false, nullptr,
                nullptr);
  else
    embed<double>(y.data<double>(), tokens.data<int32_t>(), table.data<double>(), T_, h, start, rows, false, nullptr,
                  nullptr);
}

void vocab_embedding_backward(Tensor& dtable, const Tensor& tokens, const Tensor& dy, int64_t start) {
  tp_require_host(dtable, "vocabulary-parallel embedding");
  const int64_t T_ = tokens.numel(), h = dtable.dim(1), rows = dtable.dim(0);
  if (dtable.dtype() == DType::f32)
    embed<float>(nullptr, tokens.data<int32_t>(), nullptr, T_, h, start, rows, true, dtable.data<float>(),
                 dy.data<float>());
  else
    embed<double>(nullptr, tokens.data<int32_t>(), nullptr, T_, h, start, rows, true, dtable.data<double>(),
                  dy.data<double>());
}

}  // namespace decotron
