// kernels/multi_tensor.h on the GPU: AdamW over every tensor of the list in one launch, and the
// per-tensor sums of squares in two launches and one copy to the host. STATUS: emulator-verified
// (tools/cuda_emu), not yet run on a GPU.
//
// A tensor of n elements is cut into ceil(n / kMultiTensorChunk) chunks; the chunk table lists
// (tensor, first element) for every chunk of every tensor in list order, and a grid-stride loop
// hands chunks to blocks. The AdamW arithmetic is adamw.cu's, expression for expression, so a
// step equals the per-tensor launches bit for bit. The squares: a fixed tree per chunk
// (block_sum in double), then per tensor its chunks summed in order: deterministic.
#include <cmath>
#include <cstring>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/multi_tensor.h"

namespace decotron::cuda {

namespace {

struct AdamWEntry {
  float* p;
  float* m;
  float* v;
  const float* g;
  int64_t n;
  double decay;  // 1 or 0: the step's weight decay times this
};

struct SquaresEntry {
  const float* x;
  int64_t n;
};

struct Chunk {
  int64_t tensor, begin;
};

// A host array of POD entries as a device tensor (8-byte slots).
template <class E> Tensor upload(const std::vector<E>& host) {
  static_assert(sizeof(E) % 8 == 0, "table entries are 8-byte slots");
  const int64_t slots = static_cast<int64_t>(host.size() * sizeof(E) / 8);
  Tensor t = Tensor::empty({std::max<int64_t>(slots, 1)}, DType::f64);
  if (!host.empty()) std::memcpy(t.raw(), host.data(), host.size() * sizeof(E));
  return t.to(Device::cuda);
}

void add_chunks(std::vector<Chunk>& chunks, int64_t tensor, int64_t n) {
  for (int64_t b = 0; b < n; b += kMultiTensorChunk) chunks.push_back(Chunk{tensor, b});
}

float* f32_ptr(const Tensor& t, const char* what) {
  DT_ASSERT(t.dtype() == DType::f32, "multi-tensor AdamW: ", what, " is ", dtype_name(t.dtype()),
            "; the CUDA optimizer keeps fp32 masters, moments and gradients");
  return ptr<float>(t);
}

unsigned chunk_blocks(int64_t chunks) {
  const int64_t cap = static_cast<int64_t>(context().sm_count) * 8;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(chunks, cap)));
}

__global__ void multi_adamw_kernel(const AdamWEntry* table, const Chunk* chunks, int64_t chunk_count, double lr,
                                   double beta1, double beta2, double eps, double wd, double bc1, double bc2,
                                   double grad_scale) {
  for (int64_t c = blockIdx.x; c < chunk_count; c += gridDim.x) {
    const Chunk ch = chunks[c];
    const AdamWEntry e = table[ch.tensor];
    const int64_t end = ch.begin + kMultiTensorChunk < e.n ? ch.begin + kMultiTensorChunk : e.n;
    const double wdt = wd * e.decay;
    for (int64_t i = ch.begin + threadIdx.x; i < end; i += blockDim.x) {
      // As adamw_kernel (adamw.cu).
      const double gi = static_cast<double>(e.g[i]) * grad_scale;
      const double mi = beta1 * e.m[i] + (1 - beta1) * gi;
      const double vi = beta2 * e.v[i] + (1 - beta2) * gi * gi;
      e.m[i] = static_cast<float>(mi);
      e.v[i] = static_cast<float>(vi);
      const double pi = e.p[i];
      const double update = (mi / bc1) / (sqrt(vi / bc2) + eps) + wdt * pi;
      e.p[i] = static_cast<float>(pi - lr * update);
    }
  }
}

__global__ void chunk_squares_kernel(const SquaresEntry* table, const Chunk* chunks, int64_t chunk_count,
                                     double* partials) {
  for (int64_t c = blockIdx.x; c < chunk_count; c += gridDim.x) {  // uniform over the block
    const Chunk ch = chunks[c];
    const SquaresEntry e = table[ch.tensor];
    const int64_t end = ch.begin + kMultiTensorChunk < e.n ? ch.begin + kMultiTensorChunk : e.n;
    double acc = 0;
    for (int64_t i = ch.begin + threadIdx.x; i < end; i += blockDim.x) {
      const double x = e.x[i];
      acc += x * x;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[c] = acc;
  }
}

// Tensor t: its chunks' partials [first[t], first[t+1]) summed in order.
__global__ void tensor_squares_kernel(const int64_t* first, const double* partials, int64_t tensors, double* out) {
  DT_GRID_STRIDE(t, tensors) {
    double acc = 0;
    for (int64_t c = first[t]; c < first[t + 1]; ++c) acc += partials[c];
    out[t] = acc;
  }
}

}  // namespace

MultiTensorAdamWLaunch::MultiTensorAdamWLaunch(const std::vector<ops::AdamWTensor>& tensors) {
  std::vector<AdamWEntry> table;
  std::vector<Chunk> chunks;
  for (const ops::AdamWTensor& t : tensors) {
    const int64_t n = t.param.numel();
    DT_ASSERT(t.m.numel() == n && t.v.numel() == n && t.grad.numel() == n, "multi-tensor AdamW: tensor ",
              table.size(), " has ", n, " parameters but moments of ", t.m.numel(), " and ", t.v.numel(),
              " and a gradient of ", t.grad.numel());
    add_chunks(chunks, static_cast<int64_t>(table.size()), n);
    table.push_back(AdamWEntry{f32_ptr(t.param, "a parameter"), f32_ptr(t.m, "exp_avg"), f32_ptr(t.v, "exp_avg_sq"),
                               f32_ptr(t.grad, "a gradient"), n, t.decay ? 1.0 : 0.0});
  }
  table_ = upload(table);
  chunks_ = upload(chunks);
  chunk_count_ = static_cast<int64_t>(chunks.size());
}

void MultiTensorAdamWLaunch::run(const ops::AdamWStep& s, double grad_scale) const {
  DT_ASSERT(s.step >= 1, "adamw_update: step is 1-based, got ", s.step);
  if (chunk_count_ == 0) return;
  const double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.step));
  const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.step));
  multi_adamw_kernel<<<chunk_blocks(chunk_count_), kThreads, 0, context().stream>>>(
      static_cast<const AdamWEntry*>(table_.raw()), static_cast<const Chunk*>(chunks_.raw()), chunk_count_, s.lr,
      s.beta1, s.beta2, s.eps, s.weight_decay, bc1, bc2, grad_scale);
  CUDA_CHECK_LAUNCH();
}

MultiTensorSquaresLaunch::MultiTensorSquaresLaunch(const std::vector<Tensor>& tensors) {
  std::vector<SquaresEntry> table;
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;
  for (const Tensor& t : tensors) {
    DT_ASSERT(t.dtype() == DType::f32, "multi-tensor sum of squares: a ", dtype_name(t.dtype()),
              " tensor; the CUDA optimizer's gradients are fp32");
    first.push_back(static_cast<int64_t>(chunks.size()));
    add_chunks(chunks, static_cast<int64_t>(table.size()), t.numel());
    table.push_back(SquaresEntry{ptr<float>(t), t.numel()});
  }
  first.push_back(static_cast<int64_t>(chunks.size()));
  table_ = upload(table);
  chunks_ = upload(chunks);
  first_chunk_ = upload(first);
  chunk_count_ = static_cast<int64_t>(chunks.size());
  tensor_count_ = static_cast<int64_t>(tensors.size());
}

std::vector<double> MultiTensorSquaresLaunch::run() const {
  std::vector<double> out(tensor_count_, 0.0);
  if (tensor_count_ == 0) return out;
  cudaStream_t st = context().stream;
  Tensor partials = scratch(std::max<int64_t>(chunk_count_, 1), DType::f64);
  Tensor sums = scratch(tensor_count_, DType::f64);
  if (chunk_count_ > 0) {
    chunk_squares_kernel<<<chunk_blocks(chunk_count_), kThreads, 0, st>>>(
        static_cast<const SquaresEntry*>(table_.raw()), static_cast<const Chunk*>(chunks_.raw()), chunk_count_,
        ptr<double>(partials));
    CUDA_CHECK_LAUNCH();
  }
  tensor_squares_kernel<<<grid_for(tensor_count_), kThreads, 0, st>>>(
      static_cast<const int64_t*>(first_chunk_.raw()), ptr<double>(partials), tensor_count_, ptr<double>(sums));
  CUDA_CHECK_LAUNCH();
  Tensor host = sums.to(Device::cpu);  // waits for the stream
  std::memcpy(out.data(), host.raw(), out.size() * sizeof(double));
  return out;
}

}  // namespace decotron::cuda
