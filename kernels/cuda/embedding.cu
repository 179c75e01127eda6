// Token embedding on the GPU (fp32, bf16 tables); also the row gather and scatter-add of the
// expert pair path (model/expert_dispatch.cpp).
// Forward: a gather, grid-stride over [T, h]. Backward, deterministic without float atomics:
// count each id's occurrences (integer atomics: exact), bucket the positions by id (prefix sum
// of the counts; placement by integer atomics, then each bucket put in ascending position
// order), then one warp per id sums its dy rows in ascending position, in fp32, before adding
// once into dtable. Work O(n h + V + sum over ids of count^2); the result does not depend on
// the placement order. (The first version scanned the whole id list once per occurring id:
// O(V n), seconds per layer for the pair path's scatters at T = 32768.)
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

// Positions grouped by id: starts = exclusive prefix sum of the counts (integers, exact), over
// blocks of kScanBlock ids: per-block sums, one thread scans those, then each block its own ids.
constexpr int kScanPer = 4;
constexpr int kScanBlock = kThreads * kScanPer;

__global__ void scan_block_sums_kernel(int32_t* bsum, const int32_t* counts, int64_t V) {
  const int64_t base = blockIdx.x * static_cast<int64_t>(kScanBlock);
  int s = 0;
  for (int k = 0; k < kScanPer; ++k) {
    const int64_t v = base + threadIdx.x * kScanPer + k;
    if (v < V) s += counts[v];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) bsum[blockIdx.x] = s;
}

__global__ void scan_serial_kernel(int32_t* bsum, int64_t nb) {  // exclusive, in place; one thread
  if (threadIdx.x != 0) return;
  int s = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const int c = bsum[b];
    bsum[b] = s;
    s += c;
  }
}

// starts[v] for v < V, and starts[V] = the number of valid positions.
__global__ void scan_apply_kernel(int32_t* starts, const int32_t* counts, const int32_t* bsum, int64_t V) {
  __shared__ int part[kThreads];
  const int64_t base = blockIdx.x * static_cast<int64_t>(kScanBlock) + threadIdx.x * kScanPer;
  int local = 0;
  for (int k = 0; k < kScanPer; ++k)
    if (base + k < V) local += counts[base + k];
  part[threadIdx.x] = local;
  __syncthreads();
  for (int o = 1; o < kThreads; o <<= 1) {  // inclusive Hillis-Steele scan of the thread sums
    const int add = threadIdx.x >= o ? part[threadIdx.x - o] : 0;
    __syncthreads();
    part[threadIdx.x] += add;
    __syncthreads();
  }
  int run = bsum[blockIdx.x] + part[threadIdx.x] - local;
  for (int k = 0; k < kScanPer; ++k) {
    const int64_t v = base + k;
    if (v < V) {
      starts[v] = run;
      run += counts[v];
      if (v == V - 1) starts[V] = run;
    }
  }
}

// Each valid position into its id's bucket, in an arbitrary order (integer atomics).
__global__ void place_kernel(int32_t* bucket, int32_t* fill, const int32_t* starts, const int32_t* tokens, int64_t n,
                             int64_t vocab) {
  DT_GRID_STRIDE(t, n) {
    const int32_t id = tokens[t];
    if (id >= 0 && id < vocab) bucket[starts[id] + atomicAdd(&fill[id], 1)] = static_cast<int32_t>(t);
  }
}

// Each bucket in ascending position order: a position's rank is the number of smaller positions
// in its bucket (positions are distinct). Work: the sum over ids of count^2.
__global__ void order_buckets_kernel(int32_t* sorted, const int32_t* bucket, const int32_t* starts,
                                     const int32_t* counts, const int32_t* tokens, int64_t n, int64_t vocab) {
  const int64_t total = starts[vocab];
  DT_GRID_STRIDE(i, n) {
    if (i >= total) continue;
    const int32_t t = bucket[i], id = tokens[t];
    const int32_t s = starts[id], m = counts[id];
    int32_t rank = 0;
    for (int32_t k = 0; k < m; ++k) rank += bucket[s + k] < t ? 1 : 0;
    sorted[s + rank] = t;
  }
}

// One warp per vocabulary row: its dy rows summed in ascending position, fp32, then one add.
template <class T>
__global__ void embedding_backward_kernel(T* dtable, const T* dy, const int32_t* sorted, const int32_t* starts,
                                          const int32_t* counts, int64_t vocab, int64_t h) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t v = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; v < vocab; v += warps) {
    const int32_t m = counts[v];
    if (m == 0) continue;
    const int32_t* pos = sorted + starts[v];
    T* out = dtable + v * h;
    for (int64_t j = lane; j < h; j += 32) {
      float acc = 0.0f;
      for (int32_t k = 0; k < m; ++k) acc += to_float(dy[pos[k] * h + j]);
      out[j] = from_float<T>(to_float(out[j]) + acc);
    }
  }
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
  DT_ASSERT(n < (int64_t(1) << 31) && V < (int64_t(1) << 31), "embedding_backward: ", n, " positions or ", V,
            " rows overflow i32");
  if (n * h == 0) return;
  Context& ctx = context();
  cudaStream_t st = ctx.stream;
  Tensor counts = Tensor::zeros({V}, DType::i32, Device::cuda);
  count_tokens_kernel<<<grid_for(n), kThreads, 0, st>>>(ptr<int32_t>(counts), ptr<int32_t>(tokens), n, V,
                                                         ctx.error_flags);
  CUDA_CHECK_LAUNCH();
  const int64_t nb = (V + kScanBlock - 1) / kScanBlock;
  Tensor bsum = scratch(nb, DType::i32), starts = scratch(V + 1, DType::i32);
  scan_block_sums_kernel<<<static_cast<unsigned>(nb), kThreads, 0, st>>>(ptr<int32_t>(bsum), ptr<int32_t>(counts), V);
  CUDA_CHECK_LAUNCH();
  scan_serial_kernel<<<1, 32, 0, st>>>(ptr<int32_t>(bsum), nb);
  CUDA_CHECK_LAUNCH();
  scan_apply_kernel<<<static_cast<unsigned>(nb), kThreads, 0, st>>>(ptr<int32_t>(starts), ptr<int32_t>(counts),
                                                                    ptr<int32_t>(bsum), V);
  CUDA_CHECK_LAUNCH();
  Tensor fill = Tensor::zeros({V}, DType::i32, Device::cuda);
  Tensor bucket = scratch(n, DType::i32), sorted = scratch(n, DType::i32);
  place_kernel<<<grid_for(n), kThreads, 0, st>>>(ptr<int32_t>(bucket), ptr<int32_t>(fill), ptr<int32_t>(starts),
                                                  ptr<int32_t>(tokens), n, V);
  CUDA_CHECK_LAUNCH();
  order_buckets_kernel<<<grid_for(n), kThreads, 0, st>>>(ptr<int32_t>(sorted), ptr<int32_t>(bucket),
                                                          ptr<int32_t>(starts), ptr<int32_t>(counts),
                                                          ptr<int32_t>(tokens), n, V);
  CUDA_CHECK_LAUNCH();
  DT_CUDA_F32_BF16(dtable.dtype(), "embedding_backward", T, {
    embedding_backward_kernel<T><<<grid_for(V * 32), kThreads, 0, st>>>(
        ptr<T>(dtable), ptr<T>(dy), ptr<int32_t>(sorted), ptr<int32_t>(starts), ptr<int32_t>(counts), V, h);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace decotron::cuda
