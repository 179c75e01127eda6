// Host stand-in for the subset of nvcuda::wmma (<mma.h>) the kernels use: 16x16x16 fragments,
// bf16 (or fp32) inputs and fp32 accumulators, fill / load / store / mma.
//
// Every thread of the warp holds the WHOLE 16x16 tile (num_elements = 256, stored row-major
// in logical coordinates): loads read all of it, mma_sync computes all of it (each lane the
// same values). This is exact for kernels that treat fragment layouts as opaque (a per-element
// op applied to every x[i] is fine; relying on which lane owns which element is not, and this
// stand-in cannot catch it).
//
// Stores write only the lane's share (elements e with e % 32 == lane), as on the hardware,
// where each lane stores the elements it holds. That keeps the redundant copies coherent
// without a barrier (an accumulator kept in shared memory and updated by load-mma-store: a
// lane's stored elements depend only on the values it loaded at those positions, which no
// other lane writes), and it leaves the kernel's own warp synchronization visible: lanes
// reading a tile right after store_matrix_sync without __syncwarp()/__syncthreads() can see
// other lanes' elements not yet stored, and a load_matrix_sync of data the lanes just wrote
// without a barrier can see them unwritten. Like any race, these show up only when the thread
// timing exposes them.
//
// mma_sync accumulates each product in fp32 in k order; tensor cores sum the 16 products
// of a k-step in their own order (and may truncate), so results agree to fp32 rounding, not
// bit for bit.
#pragma once
#include <cuda_bf16.h>

#include <type_traits>

namespace emu {
inline float wmma_to_float(float x) { return x; }
inline float wmma_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> T wmma_from_float(float x);
template <> inline float wmma_from_float<float>(float x) { return x; }
template <> inline __nv_bfloat16 wmma_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
}  // namespace emu

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "wmma_emu.h: only 16x16x16 fragments");
  static constexpr int num_elements = 256;
  using element_type = T;
  T x[256];  // logical row-major: x[r * 16 + c]
};

namespace detail {
inline int lane() { return emu::cur_tid % 32; }
template <class L> constexpr bool is_col_major() { return std::is_same_v<L, col_major>; }
}  // namespace detail

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < 256; ++i) f.x[i] = static_cast<T>(v);
}

// matrix_a / matrix_b: the layout is part of the fragment type.
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = detail::is_col_major<L>() ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t l) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
  for (int e = detail::lane(); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[e];
  }
}

// d = a b + c (d may be c).
template <int M, int N, int K, class Tab, class LA, class LB, class Tc>
inline void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Tab, LA>& a,
                     const fragment<matrix_b, M, N, K, Tab, LB>& b, const fragment<accumulator, M, N, K, Tc>& c) {
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float acc = emu::wmma_to_float(c.x[r * 16 + col]);
      for (int k = 0; k < 16; ++k) acc += emu::wmma_to_float(a.x[r * 16 + k]) * emu::wmma_to_float(b.x[k * 16 + col]);
      out[r * 16 + col] = acc;
    }
  for (int i = 0; i < 256; ++i) d.x[i] = emu::wmma_from_float<Tc>(out[i]);
}

}  // namespace nvcuda::wmma
