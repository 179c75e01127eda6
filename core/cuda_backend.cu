// The CUDA device: context (stream, cuBLAS/cuBLASLt handles, workspace), device discovery and
// the caching allocator behind CUDA tensors. See core/cuda_backend.h.
#include "core/cuda_backend.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/error.h"

namespace decotron {

bool cuda_available() {
  static const bool available = [] {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear: no driver / no device is an answer, not an error
      return false;
    }
    return n > 0;
  }();
  return available;
}

namespace cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // cuBLAS's recommendation for Hopper

Context* create_context() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    cudaGetLastError();
    fail("no CUDA device is visible (", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices",
         "): run on a machine with a GPU, or set the device to cpu");
  }
  auto* c = new Context();
  CUDA_CHECK(cudaGetDevice(&c->device));
  CUDA_CHECK(cudaDeviceGetAttribute(&c->sm_count, cudaDevAttrMultiProcessorCount, c->device));
  int smem = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->device));
  c->max_shared_optin = static_cast<size_t>(smem);
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasCreate(&c->blas));
  CUBLAS_CHECK(cublasSetStream(c->blas, c->stream));
  CUBLAS_CHECK(cublasLtCreate(&c->blas_lt));
  c->workspace_bytes = kWorkspaceBytes;
  CUDA_CHECK(cudaMalloc(&c->workspace, c->workspace_bytes));
  // A fixed user workspace keeps cuBLAS's algorithm choice, and so its results, reproducible.
  CUBLAS_CHECK(cublasSetWorkspace(c->blas, c->workspace, c->workspace_bytes));
  CUDA_CHECK(cudaMalloc(&c->error_flags, sizeof(unsigned)));
  CUDA_CHECK(cudaMemsetAsync(c->error_flags, 0, sizeof(unsigned), c->stream));
  CUDA_CHECK(cudaStreamSynchronize(c->stream));
  return c;
}

}  // namespace

Context& context() {
  // Never destroyed: handles and memory go back to the driver with the process, which avoids
  // freeing after the CUDA runtime has shut down at exit.
  static Context* ctx = create_context();
  return *ctx;
}

void synchronize() { CUDA_CHECK(cudaStreamSynchronize(context().stream)); }

namespace {

// The ring behind upload_async: kUploadSegments segments, filled in turn. Leaving a segment
// records an event after its copies; entering one waits for the event recorded when it was last
// left (by then, normally long done: 2 MiB of uploads ago), so its pinned bytes may be rewritten.
// Its device twin needs no wait: the next copy into it runs after everything enqueued before.
// 2 MiB of pinned host and 2 MiB of device memory, outside the caching allocator (not in peak).
class UploadRing {
 public:
  const void* upload(const void* src, size_t bytes) {
    if (bytes > kUploadSegmentBytes) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    Context& c = context();
    if (!host_) {
      CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), kUploadSegments * kUploadSegmentBytes,
                               cudaHostAllocDefault));
      CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dev_), kUploadSegments * kUploadSegmentBytes));
      for (auto& e : left_) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    const size_t n = (bytes + 255) / 256 * 256;  // keeps every upload 256-byte aligned
    if (used_ + n > kUploadSegmentBytes) {
      CUDA_CHECK(cudaEventRecord(left_[cur_], c.stream));
      recorded_[cur_] = true;
      cur_ = (cur_ + 1) % kUploadSegments;
      if (recorded_[cur_]) CUDA_CHECK(cudaEventSynchronize(left_[cur_]));
      used_ = 0;
    }
    const size_t at = cur_ * kUploadSegmentBytes + used_;
    std::memcpy(host_ + at, src, bytes);
    CUDA_CHECK(cudaMemcpyAsync(dev_ + at, host_ + at, bytes, cudaMemcpyHostToDevice, c.stream));
    used_ += n;
    return dev_ + at;
  }

 private:
  std::mutex mu_;
  char* host_ = nullptr;
  char* dev_ = nullptr;
  cudaEvent_t left_[kUploadSegments] = {};
  bool recorded_[kUploadSegments] = {};
  size_t cur_ = 0, used_ = 0;
};

}  // namespace

const void* upload_async(const void* host, size_t bytes) {
  static UploadRing* ring = new UploadRing();  // never destroyed, as the context
  return bytes == 0 ? nullptr : ring->upload(host, bytes);
}

void check_device_errors() {
  Context& c = context();
  unsigned flags = 0;
  CUDA_CHECK(cudaMemcpyAsync(&flags, c.error_flags, sizeof(flags), cudaMemcpyDeviceToHost, c.stream));
  CUDA_CHECK(cudaStreamSynchronize(c.stream));
  if (flags == 0) return;
  CUDA_CHECK(cudaMemsetAsync(c.error_flags, 0, sizeof(unsigned), c.stream));
  std::string what;
  if (flags & kBadTokenId) what += " a token id outside the vocabulary (embedding);";
  if (flags & kBadTargetId) what += " a target id outside the vocabulary (cross_entropy);";
  if (flags & (kBadTokenId | kBadTargetId))
    fail("a CUDA kernel found bad input:", what,
         " the data's token ids must be below the model's vocabulary size (check the tokenizer against the model "
         "config)");
  fail("a CUDA kernel found bad input: a pair index outside the routed pairs (combine_pairs, pairs_to_slots) or a "
       "pair's row outside its rows (the gathered expert GEMMs); slot_pair and the pairs' index must come from "
       "route_pairs over the same tokens (a bug in the caller: please report it)");
}

namespace {

// Caching allocator. Blocks are rounded to a size class (512 B steps up to 1 MiB, then 1 MiB
// steps up to 64 MiB, then 2 MiB steps) and kept on free lists keyed by size when released.
// Everything runs on the context's one stream, so a released block may be handed out again at
// once: the work that used it is ordered before any work on its next owner.
// DECOTRON_CUDA_CACHE=0 turns caching off (cudaMalloc/cudaFree per tensor, for
// compute-sanitizer and leak hunting).
class CachingAllocator final : public DeviceAllocator {
 public:
  CachingAllocator() {
    const char* env = std::getenv("DECOTRON_CUDA_CACHE");
    caching_ = !(env && std::strcmp(env, "0") == 0);
  }

  static size_t size_class(size_t bytes) {
    constexpr size_t KiB = 1024, MiB = KiB * KiB;
    auto round_up = [](size_t x, size_t m) { return (x + m - 1) / m * m; };
    if (bytes <= MiB) return round_up(bytes, 512);
    if (bytes <= 64 * MiB) return round_up(bytes, MiB);
    return round_up(bytes, 2 * MiB);
  }

  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    Context& ctx = context();
    std::lock_guard<std::mutex> lock(mu_);
    size_t block = caching_ ? size_class(bytes) : bytes;
    void* p = nullptr;
    if (caching_) {
      // The smallest cached block that fits and wastes at most a quarter of it.
      auto it = free_.lower_bound(block);
      if (it != free_.end() && it->first <= block + block / 4) {
        block = it->first;
        p = it->second.back();
        it->second.pop_back();
        if (it->second.empty()) free_.erase(it);
        cached_ -= block;
      }
    }
    if (!p) {
      cudaError_t err = cudaMalloc(&p, block);
      if (err != cudaSuccess) {
        cudaGetLastError();
        release_cached(ctx);
        err = cudaMalloc(&p, block);
      }
      if (err != cudaSuccess) {
        cudaGetLastError();
        fail("out of GPU memory allocating ", bytes, " bytes (", in_use_, " bytes in use, ", reserved_,
             " reserved): reduce train.micro_batch or the sequence length");
      }
      reserved_ += block;
      ++device_allocs_;
    }
    live_[p] = block;
    in_use_ += bytes;
    if (in_use_ > peak_) peak_ = in_use_;
    return p;
  }

  void release(void* ptr, size_t bytes) override {
    if (!ptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(ptr);
    DT_ASSERT(it != live_.end(), "CUDA release of a pointer this allocator does not own");
    size_t block = it->second;
    live_.erase(it);
    in_use_ -= bytes;
    if (caching_) {
      free_[block].push_back(ptr);
      cached_ += block;
    } else {
      // cudaFree does not order itself after our non-blocking stream: wait for it first.
      CUDA_CHECK(cudaStreamSynchronize(context().stream));
      CUDA_CHECK(cudaFree(ptr));
      reserved_ -= block;
    }
  }

  void fill_zero(void* ptr, size_t bytes) override {
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, context().stream));
  }

  // Copies with the host wait for the stream (the host buffer is readable, or reusable, on
  // return); device-to-device copies are only enqueued.
  void copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) override {
    if (bytes == 0) return;
    Context& c = context();
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c.stream));
    if (dst_dev == Device::cpu || src_dev == Device::cpu) CUDA_CHECK(cudaStreamSynchronize(c.stream));
  }

  size_t bytes_in_use() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_use_;
  }
  size_t peak_bytes() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return peak_;
  }

  AllocatorStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    AllocatorStats s;
    s.bytes_in_use = in_use_;
    s.peak_bytes = peak_;
    s.reserved_bytes = reserved_;
    s.cached_bytes = cached_;
    s.device_allocs = device_allocs_;
    s.caching = caching_;
    return s;
  }

  void empty_cache() {
    Context& ctx = context();
    std::lock_guard<std::mutex> lock(mu_);
    release_cached(ctx);
  }

 private:
  void release_cached(Context& ctx) {  // with mu_ held
    if (free_.empty()) return;
    CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
    for (auto& [block, ptrs] : free_)
      for (void* p : ptrs) {
        CUDA_CHECK(cudaFree(p));
        reserved_ -= block;
      }
    free_.clear();
    cached_ = 0;
  }

  mutable std::mutex mu_;
  bool caching_ = true;
  std::map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
  size_t in_use_ = 0, peak_ = 0, reserved_ = 0, cached_ = 0;
  int64_t device_allocs_ = 0;
};

CachingAllocator& the_allocator() {
  static CachingAllocator* a = new CachingAllocator();  // never destroyed (see context())
  return *a;
}

}  // namespace

AllocatorStats allocator_stats() { return the_allocator().stats(); }
void empty_cache() { the_allocator().empty_cache(); }

}  // namespace cuda

DeviceAllocator& cuda_allocator() { return cuda::the_allocator(); }

}  // namespace decotron
