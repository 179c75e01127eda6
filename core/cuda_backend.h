// The CUDA device: one per-process context (current device, the one stream every kernel and
// copy runs on, the cuBLAS/cuBLASLt handles and their workspace) and the caching allocator
// behind Tensor storage on Device::cuda. Only in CUDA builds (DECOTRON_WITH_CUDA).
//
// The context is the only CUDA state in the process. It is created on first use (the first
// CUDA tensor or op) on the device that is current then (a launcher sets it per rank).
// Kernels take it explicitly where practical (`launch<<<..., ctx.stream>>>`).
#pragma once
#ifdef DECOTRON_WITH_CUDA
#include <cstddef>
#include <cstdint>

#include "core/backend.h"
#include "core/cuda_check.h"

namespace decotron::cuda {

struct Context {
  int device = 0;
  int sm_count = 0;
  size_t max_shared_optin = 0;      // the most dynamic shared memory a block may opt into
  cudaStream_t stream = nullptr;    // every launch, copy and memset is on this stream
  cublasHandle_t blas = nullptr;
  cublasLtHandle_t blas_lt = nullptr;
  void* workspace = nullptr;        // shared by cuBLAS and cuBLASLt (one stream: never concurrent)
  size_t workspace_bytes = 0;
  // Bits set by kernels that find bad input they cannot report themselves (a token id outside
  // the vocabulary, ...). Read by check_device_errors() and by every host-returning op.
  unsigned* error_flags = nullptr;
};

enum DeviceErrorBit : unsigned {
  kBadTokenId = 1u,      // embedding: a token id outside [0, vocab)
  kBadTargetId = 2u,     // cross_entropy: a target id outside [0, vocab)
  kBadPairIndex = 4u,    // combine_pairs, pairs_to_slots: a pair index outside [-1, P); gathered GEMMs: a row outside [0, R)
};

// The process's context; created on first call. Throws decotron::Error if no GPU is visible.
Context& context();

// Waits for the stream, then throws decotron::Error if a kernel has set an error flag (and
// clears the flags).
void check_device_errors();

// Waits for all work on the context's stream.
void synchronize();

// Small kernel arguments (cuBLAS's grouped-GEMM pointer arrays, per-block offsets) to the device
// without waiting for the stream, as a host-to-device Tensor copy does (a GPU drained ~100 times
// a step, once per grouped expert GEMM). The bytes go through a pinned staging ring, whose host
// memory is rewritten only after an event shows its copy done, into a device ring, rewritten
// only by a copy stream-ordered after all work enqueued before it. The returned device pointer
// holds the bytes for work enqueued on the context's stream before the ring comes round again
// (kUploadSegments - 1 segments of further uploads): enqueue the consumer right away. Returns
// nullptr when bytes > kUploadSegmentBytes (the caller copies through a Tensor instead) or 0.
constexpr size_t kUploadSegments = 8;
constexpr size_t kUploadSegmentBytes = size_t(256) << 10;
const void* upload_async(const void* host, size_t bytes);

// The caching allocator's counters (for the memory column of the log and for tests).
struct AllocatorStats {
  size_t bytes_in_use = 0;    // requested bytes of live allocations
  size_t peak_bytes = 0;      // the most bytes_in_use has been
  size_t reserved_bytes = 0;  // bytes held from cudaMalloc: live blocks (rounded) + cached ones
  size_t cached_bytes = 0;    // bytes in the free lists, ready for reuse
  int64_t device_allocs = 0;  // cudaMalloc calls so far
  bool caching = true;        // false when DECOTRON_CUDA_CACHE=0
};
AllocatorStats allocator_stats();
// Returns every cached block to the driver (cudaFree) after waiting for the stream.
void empty_cache();

}  // namespace decotron::cuda

namespace decotron {
DeviceAllocator& cuda_allocator();
}  // namespace decotron

#endif  // DECOTRON_WITH_CUDA
