// The expert GEMMs that gather their pairs' rows themselves (kernels/cuda/gathered_gemm.h).
//
// Why: at DECO's shapes an expert is 64 wide, so an expert GEMM does 64 multiply-adds per input
// element it reads: memory-bound. Gathering the pairs' rows into a [P, h] copy first (P ~ 8 x
// the tokens at ratio 0.2 with 42 experts) writes and re-reads P x h for every GEMM that uses
// them, more traffic than the GEMMs' own. These kernels read each pair's row straight from the
// token matrix (8 or so pairs share a token, so many of the reads hit L2) and never write the
// copy: forward pre = X W_pre_e^T, backward dY = dOut W_down_e, and the weight gradients
// dW_pre_e = dpre^T X, dW_down_e = dOut^T y.
//
// gathered_gemm: one block (4 warps) per (64 pairs of one expert, 64 output columns); the pairs'
// rows go through shared memory 32 columns at a time, double-buffered (16-byte cp.async copies
// where the rows are 8-aligned, zeros past the ends), the expert's weight slice beside them, and
// each warp multiplies its 16 pairs by the slice on tensor cores (WMMA 16x16x16 bf16, fp32
// accumulators). The tile list
// (expert, first pair, end) is built on the host from the offsets it already holds, ordered by
// the tiles' positions within their experts so that the experts sharing tokens read them
// together, from L2 (tile_list).
//
// gathered_weight_grad: one block per (expert, 64 rows j, 64 columns k of the weight block): it
// runs over ALL of the expert's pairs, 32 at a time (double-buffered, cp.async), in pair order,
// accumulating G^T X in fp32 fragments, and adds the sum once into the fp32 gradient. One block
// owns each output element, so the result is the same bits on every run (no atomics, no split
// of the sum). All blocks
// start together (E x h/64 ~ 500 of them at the 0.1B shape) and walk their experts' pairs in
// token order at about the same pace, so they too read a token's row at about the same time.
//
// An index outside [0, rows) sets kBadPairIndex and reads as a zero row (never out of bounds).
#include <cuda_pipeline.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gathered_gemm.h"

namespace decotron::cuda {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTileRows = 64;     // pairs per gathered_gemm tile; rows j and columns k per weight-grad tile
constexpr int kTileCols = 64;     // output columns per tile
constexpr int kKStep = 32;        // gathered_gemm: columns of the rows staged per step
constexpr int kPairStep = 32;     // gathered_weight_grad: pairs staged per step
constexpr int kGemmThreads = 128;  // 4 warps of 16 rows each
constexpr int kLdC = kTileCols + 4;  // fp32 [64][64] accumulator staging
constexpr int kLd32 = kKStep + 8;    // bf16 tiles 32 wide (+8: bank spread, 32-byte aligned rows)
constexpr int kLd64 = kTileCols + 8; // bf16 tiles 64 wide
// One staged operand tile, the largest of [64][kLd32] (pairs' rows; rows_of_expert's slice),
// [32][kLd64] (cols_of_expert's slice; the weight gradient's tiles): 5 KiB. Four of them (two
// operands, double-buffered) hold the fp32 [64][kLdC] accumulator staging after the loop.
constexpr int kStageElems = kTileRows * kLd32;
static_assert(kKStep * kLd64 <= kStageElems && kPairStep * kLd64 <= kStageElems, "every tile fits a stage");
static_assert(kTileRows * kLdC * sizeof(float) <= 4 * kStageElems * sizeof(bf16_t), "staging fits");

using FragARow = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::row_major>;
using FragACol = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::col_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Elements [col, col + 8) of `row` into dst (16-byte aligned, shared), zero past `limit` or for a
// null row. A whole chunk of an 8-aligned row (`vec`) goes as one asynchronous 16-byte copy
// (cp.async: global -> shared without passing through registers, so the next step's loads run
// while the tensor cores work on this one); the caller commits and waits. The rest is written
// by plain stores, visible after the caller's next barrier like the copies.
__device__ __forceinline__ void load8(bf16_t* dst, const bf16_t* row, int64_t col, int64_t limit, bool vec) {
  if (vec && row && col + 8 <= limit) {
    __pipeline_memcpy_async(dst, row + col, 16);
    return;
  }
  for (int i = 0; i < 8; ++i) dst[i] = row && col + i < limit ? row[col + i] : __float2bfloat16_rn(0.0f);
}

// The source row of pair p, or -1 (past the tile's end, or a bad index: flagged).
__device__ __forceinline__ int64_t source_row(const int32_t* index, int64_t p, int64_t end, int64_t rows,
                                              unsigned* flags) {
  if (p >= end) return -1;
  const int32_t t = index[p];
  if (t < 0 || t >= rows) {
    atomicOr(flags, static_cast<unsigned>(kBadPairIndex));
    return -1;
  }
  return t;
}

// Each warp's 16 x 64 fp32 accumulators into its rows of the block's [64][kLdC] staging tile,
// readable by the whole block on return (every thread must call).
__device__ __forceinline__ void stage_accumulators(float* Cs, const FragC* acc, int w) {
  for (int nn = 0; nn < kTileCols / 16; ++nn)
    wmma::store_matrix_sync(Cs + w * 16 * kLdC + nn * 16, acc[nn], kLdC, wmma::mem_row_major);
  __syncthreads();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <ExpertBlock L>
__global__ void __launch_bounds__(kGemmThreads)
    gathered_gemm_kernel(bf16_t* C, const bf16_t* rows, int64_t num_rows, const int32_t* index, int64_t h,
                         const bf16_t* W, int64_t ldw, int64_t n, const int32_t* tiles, bool vec_rows, bool vec_w,
                         unsigned* flags) {
  // rows_of_expert stages the slice as [64 j][32 k] (read by col-major B fragments), cols_of_expert
  // as [32 k][64 j] (row-major B fragments): both copy along W's contiguous direction.
  constexpr bool kRowsOf = L == ExpertBlock::rows_of_expert;
  // Two buffers of each operand (the step being multiplied, the step being loaded); the fp32
  // accumulators are staged over them after the loop.
  __shared__ __align__(32) bf16_t smem[4 * kStageElems];
  bf16_t* const As = smem;                    // [2][64 pairs][32 k]
  bf16_t* const Bs = smem + 2 * kStageElems;  // [2][64 j][32 k] or [2][32 k][64 j]
  __shared__ int64_t src[kTileRows];
  const int64_t e = tiles[3 * blockIdx.x], r0 = tiles[3 * blockIdx.x + 1], r1 = tiles[3 * blockIdx.x + 2];
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
  const int tid = threadIdx.x, w = tid / 32;
  for (int i = tid; i < kTileRows; i += kGemmThreads) src[i] = source_row(index, r0 + i, r1, num_rows, flags);
  __syncthreads();
  FragC acc[kTileCols / 16];
  for (auto& a : acc) wmma::fill_fragment(a, 0.0f);
  auto issue = [&](int64_t k0, int buf) {  // step k0's operands into buffer buf
    bf16_t* A = As + buf * kStageElems;
    bf16_t* B = Bs + buf * kStageElems;
    for (int c = tid; c < kTileRows * (kKStep / 8); c += kGemmThreads) {
      const int r = c / (kKStep / 8), col = (c % (kKStep / 8)) * 8;
      load8(A + r * kLd32 + col, src[r] >= 0 ? rows + src[r] * h : nullptr, k0 + col, h, vec_rows);
    }
    if constexpr (kRowsOf) {
      for (int c = tid; c < kTileCols * (kKStep / 8); c += kGemmThreads) {
        const int j = c / (kKStep / 8), col = (c % (kKStep / 8)) * 8;
        const bf16_t* wrow = j0 + j < n ? W + (e * n + j0 + j) * ldw : nullptr;
        load8(B + j * kLd32 + col, wrow, k0 + col, h, vec_w);
      }
    } else {
      for (int c = tid; c < kKStep * (kTileCols / 8); c += kGemmThreads) {
        const int k = c / (kTileCols / 8), col = (c % (kTileCols / 8)) * 8;
        const bf16_t* wrow = k0 + k < h ? W + (k0 + k) * ldw + e * n : nullptr;
        load8(B + k * kLd64 + col, wrow, j0 + col, n, vec_w);
      }
    }
    __pipeline_commit();
  };
  issue(0, 0);
  int buf = 0;
  for (int64_t k0 = 0; k0 < h; k0 += kKStep) {
    // The other buffer was last read before the previous step's closing barrier.
    if (k0 + kKStep < h) {
      issue(k0 + kKStep, buf ^ 1);
      __pipeline_wait_prior(1);  // this step's copies have landed; the next step's may still fly
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    const bf16_t* A = As + buf * kStageElems;
    const bf16_t* B = Bs + buf * kStageElems;
#pragma unroll
    for (int kk = 0; kk < kKStep / 16; ++kk) {
      FragARow a;
      wmma::load_matrix_sync(a, A + w * 16 * kLd32 + kk * 16, kLd32);
#pragma unroll
      for (int nn = 0; nn < kTileCols / 16; ++nn) {
        if constexpr (kRowsOf) {
          FragBCol b;
          wmma::load_matrix_sync(b, B + nn * 16 * kLd32 + kk * 16, kLd32);
          wmma::mma_sync(acc[nn], a, b, acc[nn]);
        } else {
          FragBRow b;
          wmma::load_matrix_sync(b, B + kk * 16 * kLd64 + nn * 16, kLd64);
          wmma::mma_sync(acc[nn], a, b, acc[nn]);
        }
      }
    }
    __syncthreads();
    buf ^= 1;
  }
  float* const Cs = reinterpret_cast<float*>(smem);  // every read of the operands is behind the last barrier
  stage_accumulators(Cs, acc, w);
  for (int i = tid; i < kTileRows * kTileCols; i += kGemmThreads) {
    const int r = i / kTileCols, c = i % kTileCols;
    if (r0 + r < r1 && j0 + c < n) C[(r0 + r) * n + j0 + c] = __float2bfloat16_rn(Cs[r * kLdC + c]);
  }
}

template <ExpertBlock L>
__global__ void __launch_bounds__(kGemmThreads)
    gathered_weight_grad_kernel(float* grad, int64_t ldg, const bf16_t* G, int64_t n, const bf16_t* rows,
                                int64_t num_rows, const int32_t* index, int64_t h, const int32_t* offsets,
                                int64_t col_tiles, bool vec_g, bool vec_rows, unsigned* flags) {
  __shared__ __align__(32) bf16_t smem[4 * kStageElems];
  bf16_t* const Gs = smem;                    // [2][32 pairs][64 j]
  bf16_t* const As = smem + 2 * kStageElems;  // [2][32 pairs][64 k]
  const int64_t e = blockIdx.x / col_tiles, j0 = (blockIdx.x % col_tiles) * kTileRows;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
  const int64_t p_begin = offsets[e], p_end = offsets[e + 1];
  if (p_begin == p_end) return;  // no pairs: nothing to add
  const int tid = threadIdx.x, w = tid / 32;
  FragC acc[kTileCols / 16];
  for (auto& a : acc) wmma::fill_fragment(a, 0.0f);
  auto issue = [&](int64_t p0, int buf) {  // pairs [p0, p0 + 32) into buffer buf
    bf16_t* Gb = Gs + buf * kStageElems;
    bf16_t* Ab = As + buf * kStageElems;
    for (int c = tid; c < kPairStep * (kTileCols / 8); c += kGemmThreads) {
      const int r = c / (kTileCols / 8), col = (c % (kTileCols / 8)) * 8;
      const int64_t t = source_row(index, p0 + r, p_end, num_rows, flags);  // each thread its own chunks'
      load8(Gb + r * kLd64 + col, p0 + r < p_end ? G + (p0 + r) * n : nullptr, j0 + col, n, vec_g);
      load8(Ab + r * kLd64 + col, t >= 0 ? rows + t * h : nullptr, k0 + col, h, vec_rows);
    }
    __pipeline_commit();
  };
  issue(p_begin, 0);
  int buf = 0;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kPairStep) {
    if (p0 + kPairStep < p_end) {
      issue(p0 + kPairStep, buf ^ 1);
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    const bf16_t* Gt = Gs + buf * kStageElems;
    const bf16_t* At = As + buf * kStageElems;
#pragma unroll
    for (int kk = 0; kk < kPairStep / 16; ++kk) {
      // G^T: element (j, p) of the warp's 16 rows j sits at Gs[p][j], a column-major A.
      FragACol a;
      wmma::load_matrix_sync(a, Gt + kk * 16 * kLd64 + w * 16, kLd64);
#pragma unroll
      for (int nn = 0; nn < kTileCols / 16; ++nn) {
        FragBRow b;
        wmma::load_matrix_sync(b, At + kk * 16 * kLd64 + nn * 16, kLd64);
        wmma::mma_sync(acc[nn], a, b, acc[nn]);
      }
    }
    __syncthreads();
    buf ^= 1;
  }
  float* const Cs = reinterpret_cast<float*>(smem);  // [64 j][64 k], over the operands
  stage_accumulators(Cs, acc, w);
  for (int i = tid; i < kTileRows * kTileCols; i += kGemmThreads) {
    if constexpr (L == ExpertBlock::rows_of_expert) {  // consecutive threads along k: W's rows
      const int j = i / kTileCols, k = i % kTileCols;
      if (j0 + j < n && k0 + k < h) grad[(e * n + j0 + j) * ldg + k0 + k] += Cs[j * kLdC + k];
    } else {  // along j: W's columns e n + j are contiguous
      const int j = i % kTileRows, k = i / kTileRows;
      if (j0 + j < n && k0 + k < h) grad[(k0 + k) * ldg + e * n + j0 + j] += Cs[j * kLdC + k];
    }
  }
}

int g_fused = -1;  // -1: not read yet

// gathered_gemm's tiles (expert, first pair, end), 3 ints each, in launch order. An expert's
// pairs are in token order, and at ratio rho its 64-pair tiles each span ~64 / rho tokens; in
// expert-major order the blocks running at once (~4 per SM) would read rows from all over the
// [T, h] input (~T x h bytes, as much as L2 holds). Ordered instead by their position within
// their expert (tile start - off[e]) / n_e, the tiles of every expert at the same token range
// run together: the ~8 experts that share a token read its row while it is in L2, so the
// pairs' P x h reads come mostly from L2 and each row from memory about once. (Blocks start
// roughly in index order; the order changes no result, every tile writes its own rows.)
std::vector<int32_t> tile_list(const std::vector<int64_t>& off) {
  struct Tile {
    double position;
    int32_t e, r0, r1;
  };
  std::vector<Tile> t;
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const double n = static_cast<double>(off[e + 1] - off[e]);
    for (int64_t r = off[e]; r < off[e + 1]; r += kTileRows)
      t.push_back(Tile{static_cast<double>(r - off[e]) / n, static_cast<int32_t>(e), static_cast<int32_t>(r),
                       static_cast<int32_t>(std::min<int64_t>(r + kTileRows, off[e + 1]))});
  }
  std::stable_sort(t.begin(), t.end(), [](const Tile& a, const Tile& b) { return a.position < b.position; });
  std::vector<int32_t> flat;
  flat.reserve(3 * t.size());
  for (const Tile& x : t) flat.insert(flat.end(), {x.e, x.r0, x.r1});
  return flat;
}

}  // namespace

bool fused_expert_gather() {
  if (g_fused < 0) {
    const char* env = std::getenv("DECOTRON_EXPERT_GATHER");
    g_fused = env && std::strcmp(env, "copy") == 0 ? 0 : 1;
  }
  return g_fused == 1;
}

void set_fused_expert_gather(bool on) { g_fused = on ? 1 : 0; }

void gathered_gemm(bf16_t* C, const bf16_t* rows, int64_t num_rows, const int32_t* index, int64_t h, const bf16_t* W,
                   ExpertBlock layout, int64_t ldw, int64_t n, const std::vector<int64_t>& off) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1, P = off.back();
  if (P == 0 || n == 0) return;
  DT_ASSERT(h > 0, "gathered_gemm: a GEMM over an empty sum");
  std::vector<int32_t> tiles = tile_list(off);
  Tensor staged;
  const auto* dtiles = static_cast<const int32_t*>(to_device(tiles.data(), tiles.size() * sizeof(int32_t), staged));
  Context& ctx = context();
  const bool vec_rows = h % 8 == 0 && aligned16(rows);
  const bool vec_w = ldw % 8 == 0 && aligned16(W) && (layout == ExpertBlock::rows_of_expert || n % 8 == 0);
  const dim3 grid(static_cast<unsigned>(tiles.size() / 3), static_cast<unsigned>((n + kTileCols - 1) / kTileCols));
  if (layout == ExpertBlock::rows_of_expert)
    gathered_gemm_kernel<ExpertBlock::rows_of_expert><<<grid, kGemmThreads, 0, ctx.stream>>>(
        C, rows, num_rows, index, h, W, ldw, n, dtiles, vec_rows, vec_w, ctx.error_flags);
  else
    gathered_gemm_kernel<ExpertBlock::cols_of_expert><<<grid, kGemmThreads, 0, ctx.stream>>>(
        C, rows, num_rows, index, h, W, ldw, n, dtiles, vec_rows, vec_w, ctx.error_flags);
  CUDA_CHECK_LAUNCH();
}

void gathered_weight_grad(float* grad, ExpertBlock layout, int64_t ldg, const bf16_t* G, int64_t n,
                          const bf16_t* rows, int64_t num_rows, const int32_t* index, int64_t h,
                          const std::vector<int64_t>& off) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  if (E == 0 || off.back() == 0 || n == 0 || h == 0) return;
  std::vector<int32_t> offsets(off.begin(), off.end());
  Tensor staged;
  const auto* doff = static_cast<const int32_t*>(to_device(offsets.data(), offsets.size() * sizeof(int32_t), staged));
  Context& ctx = context();
  const int64_t col_tiles = (n + kTileRows - 1) / kTileRows;
  const bool vec_g = n % 8 == 0 && aligned16(G), vec_rows = h % 8 == 0 && aligned16(rows);
  const dim3 grid(static_cast<unsigned>(E * col_tiles), static_cast<unsigned>((h + kTileCols - 1) / kTileCols));
  if (layout == ExpertBlock::rows_of_expert)
    gathered_weight_grad_kernel<ExpertBlock::rows_of_expert><<<grid, kGemmThreads, 0, ctx.stream>>>(
        grad, ldg, G, n, rows, num_rows, index, h, doff, col_tiles, vec_g, vec_rows, ctx.error_flags);
  else
    gathered_weight_grad_kernel<ExpertBlock::cols_of_expert><<<grid, kGemmThreads, 0, ctx.stream>>>(
        grad, ldg, G, n, rows, num_rows, index, h, doff, col_tiles, vec_g, vec_rows, ctx.error_flags);
  CUDA_CHECK_LAUNCH();
}

}  // namespace decotron::cuda
