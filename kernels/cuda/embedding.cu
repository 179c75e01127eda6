// Token embedding on the GPU (fp32, bf16 tables).
// Forward: a gather, grid-stride over [T, h]. Backward, deterministic without float atomics:
// count each token id's occurrences (integer atomics: exact), then one block per vocabulary
// row that occurs scans the token list in order and sums the matching dy rows in ascending
// token position, in fp32, before adding once into dtable.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

template <class T>
__global__ void embedding_forward_kernel(T* y, const int32_t* tokens, const T* table, int64_t n, int64_t h, int64_t vocab,
                                         unsigned* flags) {
  DT_GRID_STRIDE(i, n * h) {
    const int64_t t = i / h, j = i - t * h;
    const int32_t id = tokens[t];
    if (id < 0 || id >= vocab) {
      if (j == 0) atomicOr(flags, static_cast<unsigned>(kBadTokenId));
      y[i] = from_float<T>(0.0f);
    } else {
      y[i] = table[id * h + j];
    }
  }
}

__global__ void count_tokens_kernel(int32_t* counts, const int32_t* tokens, int64_t n, int64_t vocab, unsigned* flags) {
  DT_GRID_STRIDE(t, n) {
    const int32_t id = tokens[t];
    if (id < 0 || id >= vocab) atomicOr(flags, static_cast<unsigned>(kBadTokenId));
    else atomicAdd(&counts[id], 1);
  }
}

constexpr int kEmbThreads = 256;

template <class T>
__global__ void embedding_backward_kernel(T* dtable, const int32_t* tokens, const T* dy, const int32_t* counts,
                                          int64_t n, int64_t h) {
  const int64_t v = blockIdx.x;
  int remaining = counts[v];
  if (remaining == 0) return;  // uniform across the block
  extern __shared__ float acc[];  // [h]
  __shared__ int hits[kEmbThreads];
  __shared__ int warp_base[kEmbThreads / 32 + 1];
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, nw = kEmbThreads / 32;
  for (int64_t j = tid; j < h; j += kEmbThreads) acc[j] = 0.0f;
  for (int64_t base = 0; base < n && remaining > 0; base += kEmbThreads) {
    const int64_t t = base + tid;
    const bool hit = t < n && tokens[t] == v;
    const unsigned mask = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_base[w] = __popc(mask);
    __syncthreads();
    if (tid == 0) {
      int s = 0;
      for (int k = 0; k < nw; ++k) {
        int c = warp_base[k];
        warp_base[k] = s;
        s += c;
      }
      warp_base[nw] = s;
    }
    __syncthreads();
    if (hit) hits[warp_base[w] + __popc(mask & ((1u << lane) - 1u))] = tid;  // in token order
    __syncthreads();
    const int m = warp_base[nw];
    for (int k = 0; k < m; ++k) {
      const T* row = dy + (base + hits[k]) * h;
      for (int64_t j = tid; j < h; j += kEmbThreads) acc[j] += to_float(row[j]);
    }
    remaining -= m;
    __syncthreads();  // hits[] and warp_base[] are rewritten by the next chunk
  }
  T* out = dtable + v * h;
  for (int64_t j = tid; j < h; j += kEmbThreads) out[j] = from_float<T>(to_float(out[j]) + acc[j]);
}

}  // namespace

void embedding_forward(Tensor& y, const Tensor& tokens, const Tensor& table) {
  const int64_t h = table.dim(1), V = table.dim(0), n = tokens.numel();
  expect_dtype(tokens, DType::i32, "embedding_forward", "tokens");
  expect_numel(y, n * h, "embedding_forward", "y");
  DT_ASSERT(y.dtype() == table.dtype(), "embedding_forward: y ", dtype_name(y.dtype()), " table ", dtype_name(table.dtype()));
  if (n * h == 0) return;
  Context& ctx = context();
  DT_CUDA_F32_BF16(table.dtype(), "embedding_forward", T, {
    embedding_forward_kernel<T><<<grid_for(n * h), kThreads, 0, ctx.stream>>>(
        ptr<T>(y), ptr<int32_t>(tokens), ptr<T>(table), n, h, V, ctx.error_flags);
    CUDA_CHECK_LAUNCH();
  });
}

void embedding_backward(Tensor& dtable, const Tensor& tokens, const Tensor& dy) {
  const int64_t h = dtable.dim(1), V = dtable.dim(0), n = tokens.numel();
  expect_dtype(tokens, DType::i32, "embedding_backward", "tokens");
  expect_numel(dy, n * h, "embedding_backward", "dy");
  DT_ASSERT(dy.dtype() == dtable.dtype(), "embedding_backward: dy ", dtype_name(dy.dtype()), " dtable ",
            dtype_name(dtable.dtype()));
  if (n * h == 0) return;
  Context& ctx = context();
  Tensor counts = Tensor::zeros({V}, DType::i32, Device::cuda);
  count_tokens_kernel<<<grid_for(n), kThreads, 0, ctx.stream>>>(ptr<int32_t>(counts), ptr<int32_t>(tokens), n, V,
                                                                 ctx.error_flags);
  CUDA_CHECK_LAUNCH();
  const size_t smem = h * sizeof(float);
  DT_CUDA_F32_BF16(dtable.dtype(), "embedding_backward", T, {
    allow_shared(embedding_backward_kernel<T>, smem, "embedding_backward");
    embedding_backward_kernel<T><<<static_cast<unsigned>(V), kEmbThreads, smem, ctx.stream>>>(
        ptr<T>(dtable), ptr<int32_t>(tokens), ptr<T>(dy), ptr<int32_t>(counts), n, h);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace decotron::cuda
