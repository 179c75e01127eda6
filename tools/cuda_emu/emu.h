// Host emulation of the CUDA execution model, for checking kernels without a GPU: every
// block runs its threads as std::threads, __syncthreads, __syncwarp and warp collectives on
// barriers; nvcuda::wmma from wmma_emu.h.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <math.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
using std::max;
using std::min;

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  unsigned char buf[32][8];
};
struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  explicit Block(int n) : bar(n) {
    for (int i = 0; i < n / 32; ++i) warps.push_back(std::make_unique<Warp>());
  }
};
extern thread_local Block* cur_block;
extern thread_local int cur_tid;
extern std::vector<double> smem_buf;
template <class T> T* dyn_smem() { return reinterpret_cast<T*>(smem_buf.data()); }
struct Cfg {
  dim3 g, b;
  size_t smem;
  Cfg(dim3 g_, dim3 b_, size_t s = 0, cudaStream_t = nullptr) : g(g_), b(b_), smem(s) {}
};
void set_ids(dim3 t, dim3 b, dim3 bd, dim3 gd);
template <class F, class... A> void launch(Cfg c, F f, A... a) {
  const int n = c.b.x * c.b.y * c.b.z;
  if (n % 32 != 0 || n > 1024) abort();
  smem_buf.assign(c.smem / 8 + 64, 0.0);
  for (unsigned bz = 0; bz < c.g.z; ++bz)
    for (unsigned by = 0; by < c.g.y; ++by)
      for (unsigned bx = 0; bx < c.g.x; ++bx) {
        Block blk(n);
        std::vector<std::thread> ts;
        ts.reserve(n);
        for (int t = 0; t < n; ++t)
          ts.emplace_back([&, t] {
            cur_block = &blk;
            cur_tid = t;
            set_ids(dim3(t % c.b.x, (t / c.b.x) % c.b.y, t / (c.b.x * c.b.y)), dim3(bx, by, bz), c.b, c.g);
            f(a...);
            blk.warps[t / 32]->bar.arrive_and_drop();
            blk.bar.arrive_and_drop();
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace emu

extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline void __syncthreads() { emu::cur_block->bar.arrive_and_wait(); }
// cp.async (cuda_pipeline.h), deferred as on the GPU: a copy lands only when a wait retires its
// group (each emulated thread keeps its own groups), so a kernel that reads a buffer before
// waiting for it reads stale data here too and its test fails. (Copies are taken at the wait,
// not at the issue: a kernel that overwrites the source in between would differ from the GPU.)
namespace emu {
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
};
inline thread_local std::vector<AsyncCopy> open_group;
inline thread_local std::vector<std::vector<AsyncCopy>> committed_groups;
}  // namespace emu
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes) {
  emu::open_group.push_back({dst, src, bytes});
}
inline void __pipeline_commit() {
  emu::committed_groups.push_back(std::move(emu::open_group));
  emu::open_group.clear();
}
inline void __pipeline_wait_prior(size_t newest_left) {  // all but the newest `newest_left` groups land
  auto& g = emu::committed_groups;
  const size_t done = g.size() > newest_left ? g.size() - newest_left : 0;
  for (size_t i = 0; i < done; ++i)
    for (const auto& c : g[i]) std::memcpy(c.dst, c.src, c.bytes);
  g.erase(g.begin(), g.begin() + static_cast<std::ptrdiff_t>(done));
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::cur_block->warps[emu::cur_tid / 32]->bar.arrive_and_wait(); }
template <class T> T __shfl_sync(unsigned, T v, int src) {
  static_assert(sizeof(T) <= 8);
  emu::Warp& w = *emu::cur_block->warps[emu::cur_tid / 32];
  const int lane = emu::cur_tid % 32;
  std::memcpy(w.buf[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, w.buf[src & 31], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}
template <class T> T __shfl_xor_sync(unsigned mask, T v, int o) { return __shfl_sync(mask, v, (emu::cur_tid % 32) ^ o); }
inline unsigned __ballot_sync(unsigned, int p) {
  emu::Warp& w = *emu::cur_block->warps[emu::cur_tid / 32];
  const int lane = emu::cur_tid % 32;
  w.buf[lane][0] = p ? 1 : 0;
  w.bar.arrive_and_wait();
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= unsigned(w.buf[i][0]) << i;
  w.bar.arrive_and_wait();
  return m;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
template <class R, class... P> cudaError_t cudaFuncSetAttribute(R (*)(P...), cudaFuncAttribute, int) { return cudaSuccess; }
#include "wmma_emu.h"  // nvcuda::wmma (kernels include <mma.h>; transform.py drops that line)
