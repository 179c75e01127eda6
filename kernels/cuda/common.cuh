// Helpers shared by the CUDA kernels: dtype dispatch (fp32, bf16), element conversion, warp
// and block reductions, and deterministic multi-block reductions (per-block partial sums in
// double, then one fixed-order final sum: no float atomics, the same bits on every run).
#pragma once
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/cuda_backend.h"
#include "core/error.h"
#include "core/tensor.h"

namespace decotron::cuda {

using bf16_t = __nv_bfloat16;

[[noreturn]] inline void no_kernel(const char* op, DType t) {
  if (t == DType::f64) fail("op ", op, " has no fp64 CUDA kernel; fp64 is for CPU gradient checks");
  fail("op ", op, " has no ", dtype_name(t), " CUDA kernel");
}

}  // namespace decotron::cuda

// Runs the body with T = float or T = __nv_bfloat16 after the tensor's dtype.
#define DT_CUDA_F32_BF16(dtype, op, T, ...)                    \
  do {                                                         \
    if ((dtype) == ::decotron::DType::f32) {                   \
      using T = float;                                         \
      __VA_ARGS__;                                             \
    } else if ((dtype) == ::decotron::DType::bf16) {           \
      using T = ::decotron::cuda::bf16_t;                      \
      __VA_ARGS__;                                             \
    } else {                                                   \
      ::decotron::cuda::no_kernel(op, dtype);                  \
    }                                                          \
  } while (0)

// fp32 only.
#define DT_CUDA_F32(dtype, op, T, ...)                         \
  do {                                                         \
    if ((dtype) == ::decotron::DType::f32) {                   \
      using T = float;                                         \
      __VA_ARGS__;                                             \
    } else {                                                   \
      ::decotron::cuda::no_kernel(op, dtype);                  \
    }                                                          \
  } while (0)

namespace decotron::cuda {

template <class T> constexpr DType device_dtype();
template <> constexpr DType device_dtype<float>() { return DType::f32; }
template <> constexpr DType device_dtype<double>() { return DType::f64; }
template <> constexpr DType device_dtype<bf16_t>() { return DType::bf16; }
template <> constexpr DType device_dtype<int32_t>() { return DType::i32; }

// The device pointer of a CUDA tensor, checked against the element type the kernel expects.
template <class T> inline T* ptr(const Tensor& t) {
  DT_ASSERT(t.dtype() == device_dtype<T>(), "CUDA kernel reads a ", dtype_name(t.dtype()), " tensor ",
            shape_str(t.shape()), " as ", dtype_name(device_dtype<T>()));
  DT_ASSERT(t.numel() == 0 || t.device() == Device::cuda, "CUDA kernel given a host tensor");
  return static_cast<T*>(t.raw());
}

inline void expect_dtype(const Tensor& t, DType d, const char* op, const char* name) {
  DT_ASSERT(t.dtype() == d, op, ": ", name, " is ", dtype_name(t.dtype()), ", expected ", dtype_name(d));
}
inline void expect_numel(const Tensor& t, int64_t n, const char* op, const char* name) {
  DT_ASSERT(t.numel() == n, op, ": ", name, " ", shape_str(t.shape()), " should hold ", n, " elements");
}

// ---- element access -----------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16_t x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(float x) { return x; }
__device__ __forceinline__ double to_double(bf16_t x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }
template <class T> __device__ __forceinline__ T from_double(double x);
template <> __device__ __forceinline__ float from_double<float>(double x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ double from_double<double>(double x) { return x; }
template <> __device__ __forceinline__ bf16_t from_double<bf16_t>(double x) {
  return __float2bfloat16_rn(static_cast<float>(x));
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// ---- launch shapes ------------------------------------------------------------------------
constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements (at most 32 waves of blocks).
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  int64_t b = (n + threads - 1) / threads;
  int64_t cap = static_cast<int64_t>(context().sm_count) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(b, cap)));
}

#define DT_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Lets `kernel` use `bytes` of dynamic shared memory (above the default 48 KiB if the device
// allows), or fails naming the op.
template <class Kernel>
void allow_shared(Kernel kernel, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  if (bytes > context().max_shared_optin)
    fail(op, ": needs ", bytes, " bytes of shared memory per block, the GPU allows ", context().max_shared_optin,
         " (the reference CUDA kernel is limited in sequence length / width)");
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// A temporary device buffer from the caching allocator (released to the cache on destruction;
// stream order keeps that safe).
inline Tensor scratch(int64_t n, DType t) { return Tensor::empty({n}, t, Device::cuda); }

// Host bytes on the device for the work enqueued next: through upload_async (no stream wait),
// or, past its segment size, a device Tensor kept in `staged` (one synchronizing copy).
inline const void* to_device(const void* host, size_t bytes, Tensor& staged) {
  if (const void* d = upload_async(host, bytes)) return d;
  Tensor h = Tensor::empty({static_cast<int64_t>((bytes + 7) / 8)}, DType::f64);  // 8-byte slots
  std::memcpy(h.raw(), host, bytes);
  staged = h.to(Device::cuda);
  return staged.raw();
}

// ---- warp and block reductions (blockDim.x a multiple of 32; every thread must call) --------
template <class T> __device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class T> __device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Every thread gets the block's sum, summed in a fixed tree order.
template <class T> __device__ T block_sum(T v) {
  __shared__ T part[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[w] = v;
  __syncthreads();
  v = lane < nw ? part[lane] : T(0);
  return warp_sum(v);
}
template <class T> __device__ T block_max(T v) {
  __shared__ T part[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) part[w] = v;
  __syncthreads();
  v = lane < nw ? part[lane] : part[0];
  return warp_max(v);
}

// ---- deterministic multi-block sums ---------------------------------------------------------
// sum over i in [0, n) of f(i) (f returns double). Block count is a function of n only.
template <class F> __global__ void sum_partials_kernel(F f, int64_t n, double* partials) {
  double acc = 0;
  DT_GRID_STRIDE(i, n) acc += f(i);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}
template <class Out> __global__ void sum_finish_kernel(const double* partials, int n, Out* out, bool accumulate) {
  double acc = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = from_double<Out>((accumulate ? to_double(out[0]) : 0.0) + acc);
}
// out[0] (device) = or += the sum.
template <class F, class Out> void sum_into(F f, int64_t n, Out* out, bool accumulate) {
  cudaStream_t st = context().stream;
  const int blocks = static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 512));
  Tensor partials = scratch(blocks, DType::f64);
  sum_partials_kernel<<<blocks, kThreads, 0, st>>>(f, n, ptr<double>(partials));
  CUDA_CHECK_LAUNCH();
  sum_finish_kernel<Out><<<1, kThreads, 0, st>>>(ptr<double>(partials), blocks, out, accumulate);
  CUDA_CHECK_LAUNCH();
}
// The sum on the host (synchronizes the stream).
template <class F> double sum_to_host(F f, int64_t n) {
  Tensor out = scratch(1, DType::f64);
  sum_into(f, n, ptr<double>(out), false);
  return out.item(0);
}

// Column sums: out[j] (= or +=) sum over r in [0, rows) of f(r, j), j in [0, cols). Rows are
// cut into fixed chunks (a function of rows only); chunk partials are summed in order.
template <class F>
__global__ void col_partials_kernel(F f, int64_t rows, int64_t cols, int64_t chunk_rows, double* partials) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  const int64_t r0 = blockIdx.y * chunk_rows, r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  double acc = 0;
  for (int64_t r = r0; r < r1; ++r) acc += f(r, j);
  partials[blockIdx.y * cols + j] = acc;
}
template <class Out>
__global__ void col_finish_kernel(const double* partials, int64_t chunks, int64_t cols, Out* out, bool accumulate) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  double acc = 0;
  for (int64_t c = 0; c < chunks; ++c) acc += partials[c * cols + j];
  out[j] = from_double<Out>((accumulate ? to_double(out[j]) : 0.0) + acc);
}
template <class F, class Out> void col_sum_into(F f, int64_t rows, int64_t cols, Out* out, bool accumulate) {
  if (cols == 0) return;
  cudaStream_t st = context().stream;
  const int64_t chunk_rows = std::max<int64_t>(64, (rows + 255) / 256);
  const int64_t chunks = std::max<int64_t>(1, (rows + chunk_rows - 1) / chunk_rows);
  Tensor partials = scratch(chunks * cols, DType::f64);
  constexpr int threads = 128;
  dim3 grid(static_cast<unsigned>((cols + threads - 1) / threads), static_cast<unsigned>(chunks));
  col_partials_kernel<<<grid, threads, 0, st>>>(f, rows, cols, chunk_rows, ptr<double>(partials));
  CUDA_CHECK_LAUNCH();
  col_finish_kernel<Out><<<grid.x, threads, 0, st>>>(ptr<double>(partials), chunks, cols, out, accumulate);
  CUDA_CHECK_LAUNCH();
}

}  // namespace decotron::cuda
