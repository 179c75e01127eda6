// Flash attention (FlashAttention-2 style) for bf16: causal, grouped-query heads (H query heads
// share G kv heads, h uses g = h / (H / G)), head_dim D in {64, 128} (a template parameter),
// any S >= 1. Layouts as the reference (attention.cu): q, out, dq, dout [B, S, H, D]; k, v,
// dk, dv [B, S, G, D]; lse [B, H, S] fp32, the log-sum-exp of the scaled scores
// (scale = 1/sqrt(D)). Storage bf16, every sum fp32: tensor cores through WMMA (16x16x16 bf16
// fragments, fp32 accumulators). Tiles of 64 queries x 64 keys; 4 warps per block, each warp
// owns 16 rows of the block's tile, so most synchronization is per warp (__syncwarp).
//
// Forward, one block per (64-query tile, head, batch): the Q tile is staged through shared
// memory into registers (matrix_a fragments), then for each key tile at or below the diagonal
// (tiles fully above it are never visited; the diagonal tile and the tail past S are masked):
// K, V tiles to shared memory (16-byte loads, rows past S zero); S = Q K^T by WMMA into shared
// memory (fp32); the online softmax, two lanes per row (32 columns each): running max m and
// sum l, the O rows rescaled by exp(m_old - m_new), P = exp(S scale - m) written as bf16; then
// O += P V by WMMA, the fp32 O accumulator kept in shared memory (load, mma, store). Finally
// out = O / l (bf16) and lse = m + log(l). l sums the fp32 probabilities, P V uses them rounded
// to bf16 (as FlashAttention), so lse is fp32-exact and out carries bf16-size errors.
//
// Backward, deterministic (no floating-point atomics; the same bits on every run), so in two
// kernels, each owning the rows it writes, instead of FlashAttention-2's single kernel that
// adds dQ across key tiles with atomics:
//   delta = rowsum(dout * out) (fp32; one lane group per row);
//   kernel A, one block per (64-key tile, kv head g, batch): K and V of the tile in registers;
//     for each query head of the group, for each query tile at or below the diagonal, in
//     order: S^T = K Q^T and dP^T = V dO^T (WMMA), P = exp(S scale - lse),
//     dS = P (dP - delta) scale (bf16 for the products), dV += P^T dO, dK += dS^T Q into fp32
//     accumulators in shared memory; dK, dV written once as bf16;
//   kernel B, one block per (64-query tile, head, batch): Q and dO in registers; for each key
//     tile at or below the diagonal, in order: recompute S, P, dP, dS with kernel A's math,
//     dQ += dS K; dQ written once.
// Kernel B recomputes S and dP (2 of the 5 backward GEMMs done twice: 7 instead of 5), the
// price of determinism without a dQ partial buffer of size (S/64) x |dQ|.
//
// Shared memory per block (bf16 tiles padded to D + 8 columns, fp32 tiles to +4, against bank
// conflicts and to keep every WMMA pointer 32-byte aligned):
//   forward:  K, V [64][D+8] bf16, S [64][68] fp32, P [64][72] bf16, O [64][D+4] fp32, 1/l [64]
//             = 62,720 B (D 64), 95,488 B (D 128);
//   kernel A: Q, dO [64][D+8], S, dP [64][68], P, dS [64][72], dK, dV [64][D+4], lse, delta
//             = 107,008 B (D 64), 156,160 B (D 128) (fits the 163 KiB of sm_80/sm_87);
//   kernel B: K, V, S, dP, dS [64][72], dQ [64][D+4], lse, delta = 80,384 B, 113,152 B.
// A device with less opt-in shared memory falls back to the reference (flash_attention_supported).
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/flash_attention.h"

namespace decotron::cuda {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;            // queries per query tile and keys per key tile
constexpr int kFlashThreads = 128;   // 4 warps x 16 rows
constexpr int kLdS = kTile + 4;      // fp32 [64][64] score tiles
constexpr int kLdP = kTile + 8;      // bf16 [64][64] probability tiles

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Byte offsets of each kernel's shared-memory regions (all multiples of 128 bytes).
template <int D> struct Layout {
  static constexpr int kLdh = D + 8;  // bf16 [64][D] tiles
  static constexpr int kLdo = D + 4;  // fp32 [64][D] accumulators
  static constexpr size_t kTileH = size_t(kTile) * kLdh * 2, kTileO = size_t(kTile) * kLdo * 4;
  static constexpr size_t kTileS = size_t(kTile) * kLdS * 4, kTileP = size_t(kTile) * kLdP * 2;
  static constexpr size_t kRow = kTile * 4;
  struct Fwd {  // K (first the Q staging), V, S, P, O, 1/l
    static constexpr size_t k = 0, v = k + kTileH, s = v + kTileH, p = s + kTileS, o = p + kTileP, inv_l = o + kTileO,
                            bytes = inv_l + kRow;
  };
  struct DKV {  // Q (first K staging), dO (first V staging), S, dP, P, dS, dK, dV, lse, delta
    static constexpr size_t q = 0, dout = q + kTileH, s = dout + kTileH, dp = s + kTileS, p = dp + kTileS,
                            ds = p + kTileP, dk = ds + kTileP, dv = dk + kTileO, lse = dv + kTileO, delta = lse + kRow,
                            bytes = delta + kRow;
  };
  struct DQ {  // K (first Q staging), V (first dO staging), S, dP, dS, dQ, lse, delta
    static constexpr size_t k = 0, v = k + kTileH, s = v + kTileH, dp = s + kTileS, ds = dp + kTileS, dq = ds + kTileP,
                            lse = dq + kTileO, delta = lse + kRow, bytes = delta + kRow;
  };
};

template <class T> __device__ __forceinline__ T* region(unsigned char* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// Rows [row0, row0 + 64) of head `head` of a [B, S, heads, D] tensor into a [64][D + 8] tile,
// 16 bytes per thread and step (rows past S are zero). Whole block.
template <int D>
__device__ void load_tile(bf16_t* dst, const bf16_t* src, int64_t b, int row0, int S, int heads, int head) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < kTile * kChunks; c += kFlashThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8, i = row0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (i < S) val = *reinterpret_cast<const uint4*>(src + ((b * S + i) * heads + head) * D + col);
    *reinterpret_cast<uint4*>(dst + r * (D + 8) + col) = val;
  }
}

// 64 per-row values (lse or delta of head h) starting at row0; 0 past S. Whole block.
__device__ void load_rows(float* dst, const float* src, int64_t b, int h, int H, int row0, int S) {
  for (int r = threadIdx.x; r < kTile; r += kFlashThreads)
    dst[r] = row0 + r < S ? src[(b * H + h) * S + row0 + r] : 0.0f;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// This warp's 16 rows of an fp32 [64][D + 4] accumulator, times row_scale[row] (or 1), into rows
// of head `head` of a [B, S, heads, D] tensor (rows past S skipped), 16-byte stores.
template <int D>
__device__ void store_rows(bf16_t* dst, const float* acc, const float* row_scale, int64_t b, int row0, int S, int heads,
                           int head) {
  constexpr int kChunks = D / 8;
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = w * 16 + c / kChunks, col = (c % kChunks) * 8, i = row0 + r;
    if (i >= S) continue;
    const float f = row_scale ? row_scale[r] : 1.0f;
    const float* a = acc + r * (D + 4) + col;
    uint4 val;
    val.x = pack_bf16x2(a[0] * f, a[1] * f);
    val.y = pack_bf16x2(a[2] * f, a[3] * f);
    val.z = pack_bf16x2(a[4] * f, a[5] * f);
    val.w = pack_bf16x2(a[6] * f, a[7] * f);
    *reinterpret_cast<uint4*>(dst + ((b * S + i) * heads + head) * D + col) = val;
  }
}

// out[16 x 64] (fp32, ld kLdS) = A (16 x D, this warp's fragments) times the transpose of a
// [64][D + 8] bf16 tile (64 rows x D): the scores of 16 rows against a tile's 64 rows.
template <int D> __device__ void rows_times_tile_t(float* out, const FragA* a, const bf16_t* tile) {
#pragma unroll
  for (int n = 0; n < kTile / 16; ++n) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      FragBCol bt;  // (d, row) = tile[row][d]: the tile's rows as columns
      wmma::load_matrix_sync(bt, tile + n * 16 * (D + 8) + kk * 16, D + 8);
      wmma::mma_sync(acc, a[kk], bt, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, kLdS, wmma::mem_row_major);
  }
}

// acc[16 x D] (fp32 in shared memory, ld D + 4) += P (16 x 64, bf16, ld kLdP) times a [64][D + 8]
// bf16 tile, in k order.
template <int D> __device__ void accumulate_p_times_tile(float* acc, const bf16_t* p, const bf16_t* tile) {
  FragA pa[kTile / 16];
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) wmma::load_matrix_sync(pa[kk], p + kk * 16, kLdP);
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    FragC c;
    wmma::load_matrix_sync(c, acc + n * 16, D + 4, wmma::mem_row_major);
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      FragBRow bt;
      wmma::load_matrix_sync(bt, tile + kk * 16 * (D + 8) + n * 16, D + 8);
      wmma::mma_sync(c, pa[kk], bt, c);
    }
    wmma::store_matrix_sync(acc + n * 16, c, D + 4, wmma::mem_row_major);
  }
}

template <int D> __device__ void zero_acc(float* acc) {
  for (int e = threadIdx.x; e < kTile * (D + 4); e += kFlashThreads) acc[e] = 0.0f;
}

template <int D>
__global__ void flash_fwd_kernel(bf16_t* out, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v, int S,
                                 int H, int G, float scale) {
  using L = typename Layout<D>::Fwd;
  constexpr int kLdh = D + 8, kLdo = D + 4;
  extern __shared__ __align__(128) unsigned char flash_smem[];
  bf16_t* ks = region<bf16_t>(flash_smem, L::k);
  bf16_t* vs = region<bf16_t>(flash_smem, L::v);
  float* ss = region<float>(flash_smem, L::s);
  bf16_t* ps = region<bf16_t>(flash_smem, L::p);
  float* os = region<float>(flash_smem, L::o);
  float* inv_l = region<float>(flash_smem, L::inv_l);
  const int qt = blockIdx.x, h = blockIdx.y, g = h / (H / G), w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z;
  const int q0 = qt * kTile;

  load_tile<D>(ks, q, b, q0, S, H, h);  // Q staged where the K tiles go
  zero_acc<D>(os);
  __syncthreads();
  FragA qf[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(qf[kk], ks + w * 16 * kLdh + kk * 16, kLdh);

  // Softmax state of row w*16 + lane/2, held by both lanes of the pair (columns 2t + half).
  const int row = w * 16 + lane / 2, half = lane % 2, i = q0 + row;
  float m = -INFINITY, l = 0.0f;
  float* srow = ss + row * kLdS;
  bf16_t* prow = ps + row * kLdP;
  float* orow = os + row * kLdo;
  // Key tiles 0..qt: tile qt holds the diagonal (same tiling for queries and keys). Every row
  // sees key k0 <= i of each visited tile unmasked, so m is finite after the first tile.
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();  // all warps are done with the previous K, V (and the Q staging)
    load_tile<D>(ks, k, b, k0, S, G, g);
    load_tile<D>(vs, v, b, k0, S, G, g);
    __syncthreads();
    rows_times_tile_t<D>(ss + w * 16 * kLdS, qf, ks);
    __syncwarp();  // the warp's S rows are stored

    const bool full = kt < qt;  // below the diagonal tile (so also before S): no masking
    float sv[kTile / 2];
    float mt = -INFINITY;
#pragma unroll
    for (int t = 0; t < kTile / 2; ++t) {
      const int c = 2 * t + half, j = k0 + c;
      sv[t] = full || (j <= i && j < S) ? srow[c] * scale : -INFINITY;
      mt = fmaxf(mt, sv[t]);
    }
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    const float m_new = fmaxf(m, mt);
    const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf)
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < kTile / 2; ++t) {
      const float p = expf(sv[t] - m_new);  // 0 where masked
      sum += p;
      prow[2 * t + half] = __float2bfloat16_rn(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    for (int c = half; c < D; c += 2) orow[c] *= alpha;
    __syncwarp();  // P and the rescaled O rows are written
    accumulate_p_times_tile<D>(os + w * 16 * kLdo, ps + w * 16 * kLdP, vs);
  }
  if (half == 0) {
    inv_l[row] = 1.0f / l;  // l >= 1: the row's maximum contributes exp(0)
    if (i < S) lse[(b * H + h) * S + i] = m + logf(l);
  }
  __syncwarp();  // O stored by WMMA, 1/l by the lanes
  store_rows<D>(out, os, inv_l, b, q0, S, H, h);
}

// delta[(b * H + h) * S + i] = dout_i . out_i in fp32; a group of D/8 lanes per row (16-byte
// loads), summed by a shuffle tree. Loops are warp-uniform (the shuffles need every lane).
template <int D>
__global__ void flash_delta_kernel(float* delta, const bf16_t* dout, const bf16_t* out, int S, int H, int64_t rows) {
  constexpr int kLanes = D / 8, kRowsPerWarp = 32 / kLanes;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  const int lane = threadIdx.x % 32, col = (lane % kLanes) * 8;
  for (int64_t base = warp * kRowsPerWarp; base < rows; base += warps * kRowsPerWarp) {
    const int64_t r = base + lane / kLanes;
    float s = 0.0f;
    if (r < rows) {
      const int64_t i = r % S, bh = r / S, h = bh % H, b = bh / H;
      const int64_t o = ((b * S + i) * H + h) * D + col;
      const uint4 a = *reinterpret_cast<const uint4*>(dout + o), c = *reinterpret_cast<const uint4*>(out + o);
      const bf16_t* ah = reinterpret_cast<const bf16_t*>(&a);
      const bf16_t* ch = reinterpret_cast<const bf16_t*>(&c);
#pragma unroll
      for (int e = 0; e < 8; ++e) s += __bfloat162float(ah[e]) * __bfloat162float(ch[e]);
    }
#pragma unroll
    for (int o = kLanes / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (r < rows && lane % kLanes == 0) delta[r] = s;
  }
}

// P and dS of one 16 x 64 block of scores (this warp's rows), from S and dP (fp32, ld kLdS):
// p = exp(s scale - lse), ds = p (dp - delta) scale, both written as bf16 (ld kLdP); entries
// outside valid(row, col) are 0; p may be null (kernel B needs only dS). The queries, whose
// lse and delta apply, are the rows (kQueryRows: kernel B's S) or the columns (kernel A's S^T).
// Two lanes per row, 32 columns each (2t + half).
template <bool kQueryRows, class Valid>
__device__ __forceinline__ void probs_and_grads(bf16_t* p, bf16_t* ds, const float* s, const float* dp,
                                                const float* lse_s, const float* delta_s, float scale, Valid valid) {
  const int lane = threadIdx.x % 32, rr = lane / 2, half = lane % 2;
#pragma unroll 4
  for (int t = 0; t < kTile / 2; ++t) {
    const int c = 2 * t + half;
    const int x = kQueryRows ? rr : c;  // the query's index into lse_s, delta_s
    float pv = 0.0f, dsv = 0.0f;
    if (valid(rr, c)) {
      pv = expf(s[rr * kLdS + c] * scale - lse_s[x]);
      dsv = pv * (dp[rr * kLdS + c] - delta_s[x]) * scale;
    }
    if (p) p[rr * kLdP + c] = __float2bfloat16_rn(pv);
    ds[rr * kLdP + c] = __float2bfloat16_rn(dsv);
  }
}

// Kernel A: dK, dV of one 64-key tile of kv head g.
template <int D>
__global__ void flash_bwd_dkv_kernel(bf16_t* dk, bf16_t* dv, const bf16_t* dout, const bf16_t* q, const bf16_t* k,
                                     const bf16_t* v, const float* lse, const float* delta, int S, int H, int G,
                                     float scale) {
  using L = typename Layout<D>::DKV;
  constexpr int kLdh = D + 8, kLdo = D + 4;
  extern __shared__ __align__(128) unsigned char flash_smem[];
  bf16_t* qs = region<bf16_t>(flash_smem, L::q);
  bf16_t* dos = region<bf16_t>(flash_smem, L::dout);
  float* ss = region<float>(flash_smem, L::s);
  float* dps = region<float>(flash_smem, L::dp);
  bf16_t* ps = region<bf16_t>(flash_smem, L::p);
  bf16_t* dss = region<bf16_t>(flash_smem, L::ds);
  float* dks = region<float>(flash_smem, L::dk);
  float* dvs = region<float>(flash_smem, L::dv);
  float* lse_s = region<float>(flash_smem, L::lse);
  float* delta_s = region<float>(flash_smem, L::delta);
  const int kt = blockIdx.x, g = blockIdx.y, group = H / G, w = threadIdx.x / 32;
  const int64_t b = blockIdx.z;
  const int k0 = kt * kTile, n_tiles = (S + kTile - 1) / kTile;

  load_tile<D>(qs, k, b, k0, S, G, g);  // K and V staged where the Q and dO tiles go
  load_tile<D>(dos, v, b, k0, S, G, g);
  zero_acc<D>(dks);
  zero_acc<D>(dvs);
  __syncthreads();
  FragA kf[D / 16], vf[D / 16];  // this warp's 16 keys
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    wmma::load_matrix_sync(kf[kk], qs + w * 16 * kLdh + kk * 16, kLdh);
    wmma::load_matrix_sync(vf[kk], dos + w * 16 * kLdh + kk * 16, kLdh);
  }
  const int j0 = k0 + w * 16;  // this warp's first key
  for (int hh = 0; hh < group; ++hh) {
    const int h = g * group + hh;
    for (int qt = kt; qt < n_tiles; ++qt) {  // query tiles at or below the diagonal
      const int q0 = qt * kTile;
      __syncthreads();  // all warps are done with the previous Q, dO (and the K, V staging)
      load_tile<D>(qs, q, b, q0, S, H, h);
      load_tile<D>(dos, dout, b, q0, S, H, h);
      load_rows(lse_s, lse, b, h, H, q0, S);
      load_rows(delta_s, delta, b, h, H, q0, S);
      __syncthreads();
      rows_times_tile_t<D>(ss + w * 16 * kLdS, kf, qs);    // S^T: keys x queries
      rows_times_tile_t<D>(dps + w * 16 * kLdS, vf, dos);  // dP^T
      __syncwarp();
      // Entry (key j0 + r, query q0 + c) counts where the query is causal for the key and < S.
      probs_and_grads<false>(ps + w * 16 * kLdP, dss + w * 16 * kLdP, ss + w * 16 * kLdS, dps + w * 16 * kLdS, lse_s,
                             delta_s, scale, [&](int r, int c) { return q0 + c < S && j0 + r <= q0 + c; });
      __syncwarp();
      accumulate_p_times_tile<D>(dvs + w * 16 * kLdo, ps + w * 16 * kLdP, dos);  // dV += P^T dO
      accumulate_p_times_tile<D>(dks + w * 16 * kLdo, dss + w * 16 * kLdP, qs);  // dK += dS^T Q
    }
  }
  __syncwarp();
  store_rows<D>(dk, dks, nullptr, b, k0, S, G, g);
  store_rows<D>(dv, dvs, nullptr, b, k0, S, G, g);
}

// Kernel B: dQ of one 64-query tile of head h.
template <int D>
__global__ void flash_bwd_dq_kernel(bf16_t* dq, const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                                    const float* lse, const float* delta, int S, int H, int G, float scale) {
  using L = typename Layout<D>::DQ;
  constexpr int kLdh = D + 8, kLdo = D + 4;
  extern __shared__ __align__(128) unsigned char flash_smem[];
  bf16_t* ks = region<bf16_t>(flash_smem, L::k);
  bf16_t* vs = region<bf16_t>(flash_smem, L::v);
  float* ss = region<float>(flash_smem, L::s);
  float* dps = region<float>(flash_smem, L::dp);
  bf16_t* dss = region<bf16_t>(flash_smem, L::ds);
  float* dqs = region<float>(flash_smem, L::dq);
  float* lse_s = region<float>(flash_smem, L::lse);
  float* delta_s = region<float>(flash_smem, L::delta);
  const int qt = blockIdx.x, h = blockIdx.y, g = h / (H / G), w = threadIdx.x / 32;
  const int64_t b = blockIdx.z;
  const int q0 = qt * kTile;

  load_tile<D>(ks, q, b, q0, S, H, h);  // Q and dO staged where the K and V tiles go
  load_tile<D>(vs, dout, b, q0, S, H, h);
  load_rows(lse_s, lse, b, h, H, q0, S);
  load_rows(delta_s, delta, b, h, H, q0, S);
  zero_acc<D>(dqs);
  __syncthreads();
  FragA qf[D / 16], dof[D / 16];  // this warp's 16 queries
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    wmma::load_matrix_sync(qf[kk], ks + w * 16 * kLdh + kk * 16, kLdh);
    wmma::load_matrix_sync(dof[kk], vs + w * 16 * kLdh + kk * 16, kLdh);
  }
  const int i0 = q0 + w * 16;  // this warp's first query
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();
    load_tile<D>(ks, k, b, k0, S, G, g);
    load_tile<D>(vs, v, b, k0, S, G, g);
    __syncthreads();
    rows_times_tile_t<D>(ss + w * 16 * kLdS, qf, ks);    // S: queries x keys
    rows_times_tile_t<D>(dps + w * 16 * kLdS, dof, vs);  // dP
    __syncwarp();
    probs_and_grads<true>(nullptr, dss + w * 16 * kLdP, ss + w * 16 * kLdS, dps + w * 16 * kLdS, lse_s + w * 16,
                          delta_s + w * 16, scale, [&](int r, int c) { return i0 + r < S && k0 + c <= i0 + r; });
    __syncwarp();
    accumulate_p_times_tile<D>(dqs + w * 16 * kLdo, dss + w * 16 * kLdP, ks);  // dQ += dS K
  }
  __syncwarp();
  store_rows<D>(dq, dqs, nullptr, b, q0, S, H, h);
}

size_t max_smem(int64_t D) {
  return D == 64 ? std::max({Layout<64>::Fwd::bytes, Layout<64>::DKV::bytes, Layout<64>::DQ::bytes})
                 : std::max({Layout<128>::Fwd::bytes, Layout<128>::DKV::bytes, Layout<128>::DQ::bytes});
}

float scale_of(int D) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))); }

template <int D>
void forward_impl(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v, int S, int H, int G,
                  int B) {
  constexpr size_t smem = Layout<D>::Fwd::bytes;
  allow_shared(flash_fwd_kernel<D>, smem, "attention_forward (flash)");
  const dim3 grid((S + kTile - 1) / kTile, H, B);
  flash_fwd_kernel<D><<<grid, kFlashThreads, smem, context().stream>>>(ptr<bf16_t>(out), ptr<float>(lse),
                                                                       ptr<bf16_t>(q), ptr<bf16_t>(k), ptr<bf16_t>(v),
                                                                       S, H, G, scale_of(D));
  CUDA_CHECK_LAUNCH();
}

template <int D>
void backward_impl(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& out, const Tensor& lse, int S, int H, int G, int B) {
  cudaStream_t st = context().stream;
  const float scale = scale_of(D);
  const int64_t rows = static_cast<int64_t>(B) * H * S;
  Tensor delta = scratch(rows, DType::f32);
  constexpr int kRowsPerBlock = kThreads / 32 * (32 / (D / 8));
  const unsigned delta_blocks = static_cast<unsigned>(
      std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, static_cast<int64_t>(context().sm_count) * 32));
  flash_delta_kernel<D><<<delta_blocks, kThreads, 0, st>>>(ptr<float>(delta), ptr<bf16_t>(dout), ptr<bf16_t>(out), S,
                                                           H, rows);
  CUDA_CHECK_LAUNCH();

  const unsigned tiles = static_cast<unsigned>((S + kTile - 1) / kTile);
  constexpr size_t smem_kv = Layout<D>::DKV::bytes, smem_q = Layout<D>::DQ::bytes;
  allow_shared(flash_bwd_dkv_kernel<D>, smem_kv, "attention_backward (flash)");
  flash_bwd_dkv_kernel<D><<<dim3(tiles, G, B), kFlashThreads, smem_kv, st>>>(
      ptr<bf16_t>(dk), ptr<bf16_t>(dv), ptr<bf16_t>(dout), ptr<bf16_t>(q), ptr<bf16_t>(k), ptr<bf16_t>(v),
      ptr<float>(lse), ptr<float>(delta), S, H, G, scale);
  CUDA_CHECK_LAUNCH();
  allow_shared(flash_bwd_dq_kernel<D>, smem_q, "attention_backward (flash)");
  flash_bwd_dq_kernel<D><<<dim3(tiles, H, B), kFlashThreads, smem_q, st>>>(
      ptr<bf16_t>(dq), ptr<bf16_t>(dout), ptr<bf16_t>(q), ptr<bf16_t>(k), ptr<bf16_t>(v), ptr<float>(lse),
      ptr<float>(delta), S, H, G, scale);
  CUDA_CHECK_LAUNCH();
}

void check_supported(const Tensor& q, const ops::AttnShape& s, const char* op) {
  DT_ASSERT(flash_attention_supported(q, s), op, " (flash): needs bf16 and head_dim 64 or 128, got ",
            dtype_name(q.dtype()), " head_dim ", s.head_dim);
}

}  // namespace

bool flash_attention_supported(const Tensor& q, const ops::AttnShape& s) {
  if (q.dtype() != DType::bf16 || (s.head_dim != 64 && s.head_dim != 128)) return false;
  return max_smem(s.head_dim) <= context().max_shared_optin;
}

void flash_attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const ops::AttnShape& s) {
  check_supported(q, s, "attention_forward");
  const char* op = "attention_forward (flash)";
  expect_dtype(out, DType::bf16, op, "out");
  expect_dtype(k, DType::bf16, op, "k");
  expect_dtype(v, DType::bf16, op, "v");
  expect_dtype(lse, DType::f32, op, "lse");
  if (q.numel() == 0) return;
  const int S = static_cast<int>(s.seq), H = static_cast<int>(s.heads), G = static_cast<int>(s.kv_heads),
            B = static_cast<int>(s.batch);
  if (s.head_dim == 64) forward_impl<64>(out, lse, q, k, v, S, H, G, B);
  else forward_impl<128>(out, lse, q, k, v, S, H, G, B);
}

void flash_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& out, const Tensor& lse, const ops::AttnShape& s) {
  check_supported(q, s, "attention_backward");
  const char* op = "attention_backward (flash)";
  const char* names[] = {"dq", "dk", "dv", "dout", "k", "v", "out"};
  const Tensor* ts[] = {&dq, &dk, &dv, &dout, &k, &v, &out};
  for (int t = 0; t < 7; ++t) expect_dtype(*ts[t], DType::bf16, op, names[t]);
  expect_dtype(lse, DType::f32, op, "lse");
  if (q.numel() == 0) return;
  const int S = static_cast<int>(s.seq), H = static_cast<int>(s.heads), G = static_cast<int>(s.kv_heads),
            B = static_cast<int>(s.batch);
  if (s.head_dim == 64) backward_impl<64>(dq, dk, dv, dout, q, k, v, out, lse, S, H, G, B);
  else backward_impl<128>(dq, dk, dv, dout, q, k, v, out, lse, S, H, G, B);
}

}  // namespace decotron::cuda
