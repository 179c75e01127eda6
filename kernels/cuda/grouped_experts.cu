// The routed experts' pair ops on the GPU: the sparse expert path (deco-model.md, "Identities
// that make sparse computation exact"); kernels/cpu/grouped_experts.cpp is the reference and
// states the math. STATUS: emulator-verified (tools/cuda_emu), not yet run on a GPU.
//
// Pair p's input row is x_rows[index[p]] and its output gradient dout_rows[index[p]]. Under bf16
// (fused_expert_gather, the default) the GEMMs that read those rows gather them in their own
// loads (kernels/cuda/gathered_gemm.cu): no [P, h] copy. Otherwise (fp32, or
// DECOTRON_EXPERT_GATHER=copy) the rows are gathered into [P, h] copies (embedding_forward)
// for cuBLAS.
// grouped_experts_forward, per call:
//   1. per local expert e with pairs [off[e], off[e+1]): pre_e = X_e W_pre_e^T (and
//      up_e = X_e W_up_e^T when gated): gathered_gemm, or cuBLAS on the copy;
//   2. one fused kernel over all P pairs (a warp per pair): rs_p of the block centred by the
//      given mu_p (one dot x_t . w_bar per token, the caller's: not re-read per pair),
//      y_p = s_p * SiLU(gamma * (pre_p - mu_p) * rs_p) (* up_p), caching rs;
//   3. per expert: outp_e = Y_e W_down_e^T (cuBLAS: its input is the [P, d] Y).
// grouped_experts_backward:
//   1. per expert: dY_e = dOut_e W_down_e (gathered_gemm from dout_rows, or cuBLAS on the copy);
//   2. one fused kernel (a warp per pair, a fixed chunk of pairs per block): dsp = dY . z, the
//      NormSiLU backward to dc (dpre) and dup, g_p = sum of dc (the mean's gradient), dgamma
//      partial sums per block;
//   3. per expert (beta = 1 for the weight gradients): dW_down_e += dOut_e^T Y_e,
//      dW_pre_e += dc_e^T X_e (gathered_weight_grad, straight into the fp32 gradients, or
//      cuBLAS), dX_e = dc_e W_pre_e (+ the gated up-projection's two GEMMs; cuBLAS);
//   (the mean's terms, -g_p w_bar in dx_p and g_p x_p in W_pre's rank-one gradient, are the
//   caller's, per token: kernels/ops.h, pair_combine.cu).
//
// The cuBLAS GEMMs of one kind go out as one cublasGemmGroupedBatchedEx call (cuBLAS >= 12.5;
// GemmBatch, with a loop of cublasGemmEx calls over the local experts as the fallback; E_local
// <= 42 in the paper's configs at one rank). Each 64-wide expert GEMM re-reads its gathered rows
// for only 64 outputs, so this is memory-bound at d = 64 (performance-targets.md: 42 per-expert
// GEMMs at 20% take ~0.17 ms, about the dense GEMM's time), hence the fused gathers.

// Determinism: every reduction is a warp tree, a fixed-order sum of per-block partials or a
// column sum of common.cuh; no float atomics. cuBLAS is reproducible with the fixed workspace.
// dtypes: fp32, and bf16 activations/weights with fp32 accumulation. The router side stays fp32:
// sp and dsp are fp32, and so are the cached mu and rs (as NormSiLU's stats on CUDA); weight
// gradients and gx may be fp32 or the activation dtype (fp32 weight gradients of bf16 GEMMs:
// each call's product rounded to bf16 once, see WeightGrad).
//
// route_pairs: per (expert, chunk of 256 tokens) counts of active pairs, copied to the host (the
// offsets live there: one small synchronizing copy per layer), then each block writes its
// chunk's pairs in token order (ballot compaction): the CPU's lists exactly. sum_rows and
// add_rows_ are plain kernels.
#include <cstdio>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/gathered_gemm.h"

namespace decotron::cuda {

namespace {

// One thread per column, rows summed in order: deterministic.
template <class T> __global__ void sum_rows_kernel(T* out, const T* x, int64_t rows, int64_t cols) {
  DT_GRID_STRIDE(k, cols) {
    float s = 0.0f;
    for (int64_t i = 0; i < rows; ++i) s += to_float(x[i * cols + k]);
    out[k] = from_float<T>(s);
  }
}

template <class T> __global__ void add_rows_kernel(T* x, const T* row, float alpha, int64_t rows, int64_t cols) {
  DT_GRID_STRIDE(i, rows * cols) x[i] = from_float<T>(to_float(x[i]) + alpha * to_float(row[i % cols]));
}

// ---- route_pairs ---------------------------------------------------------------------------------------
// Block (expert i, chunk c) looks at tokens [c * kRouteChunk, (c+1) * kRouteChunk) of expert
// e_begin + i, one thread per token.
constexpr int kRouteChunk = 256;

__device__ __forceinline__ bool route_active(const float* r, int64_t t, int64_t T, int64_t E, int64_t e, bool all) {
  return t < T && (all || r[t * E + e] > 0.0f);
}

__global__ void route_count_kernel(int32_t* counts, const float* r, int64_t T, int64_t E, int64_t e_begin, bool all) {
  const int64_t t = blockIdx.y * static_cast<int64_t>(kRouteChunk) + threadIdx.x;
  const int c = block_sum(route_active(r, t, T, E, e_begin + blockIdx.x, all) ? 1 : 0);
  if (threadIdx.x == 0) counts[blockIdx.x * static_cast<int64_t>(gridDim.y) + blockIdx.y] = c;
}

// Also the token-major view: slot_pair[t, i] = p, or -1 for every inactive (t, i).
__global__ void route_fill_kernel(int32_t* tokens, int32_t* slots, int32_t* slot_pair, const int32_t* starts,
                                  const float* r, int64_t T, int64_t E, int64_t e_begin, bool all) {
  __shared__ int warp_base[kRouteChunk / 32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t t = blockIdx.y * static_cast<int64_t>(kRouteChunk) + threadIdx.x, e = e_begin + blockIdx.x;
  const int64_t El = gridDim.x;
  const bool hit = route_active(r, t, T, E, e, all);
  const unsigned mask = __ballot_sync(0xffffffffu, hit);
  if (lane == 0) warp_base[w] = __popc(mask);
  __syncthreads();
  if (!hit) {
    if (t < T) slot_pair[t * El + blockIdx.x] = -1;
    return;
  }
  int base = starts[blockIdx.x * static_cast<int64_t>(gridDim.y) + blockIdx.y];
  for (int k = 0; k < w; ++k) base += warp_base[k];
  const int64_t p = base + __popc(mask & ((1u << lane) - 1u));
  tokens[p] = static_cast<int32_t>(t);
  slots[p] = static_cast<int32_t>(t * E + e);
  slot_pair[t * El + blockIdx.x] = static_cast<int32_t>(p);
}

// ---- grouped experts -------------------------------------------------------------------------------

bool uses_mean(NormSiluMode m) { return m == NormSiluMode::full || m == NormSiluMode::no_rms; }
bool uses_rms(NormSiluMode m) { return m == NormSiluMode::full || m == NormSiluMode::no_mean; }

// A lane keeps entries j = lane + 32 s (s < kSlots) of its pair's expert block in registers.
constexpr int kMaxWidth = 256;
constexpr int kSlots = kMaxWidth / 32;
constexpr int kWarps = kThreads / 32;

// Row-major C[M, N] = op(A) op(B) (beta 0) or += (beta 1), the arguments as the CPU reference's
// cpu::gemm. A and B of dtype `in` (fp32 or bf16), C of dtype `out` (= in, or fp32); fp32
// accumulation (CUBLAS_COMPUTE_32F: no TF32). Column-major terms: C^T = op(B)^T op(A)^T.
void rgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb,
           DType in, float beta, void* C, int64_t ldc, DType out) {
  if (M == 0 || N == 0) return;
  DT_ASSERT(K > 0, "grouped experts: a GEMM over an empty sum");
  DT_ASSERT(out == DType::f32 || out == in, "grouped experts: ", dtype_name(in), " GEMM inputs with a ",
            dtype_name(out), " output");
  const cudaDataType_t it = in == DType::f32 ? CUDA_R_32F : CUDA_R_16BF;
  const cudaDataType_t ot = out == DType::f32 ? CUDA_R_32F : CUDA_R_16BF;
  const float alpha = 1.0f;
  Context& ctx = context();
  CUBLAS_CHECK(cublasGemmEx(ctx.blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                            static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B, it,
                            static_cast<int>(ldb), A, it, static_cast<int>(lda), &beta, C, ot, static_cast<int>(ldc),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Set when cuBLAS refuses a grouped call: the loop from then on, for the rest of the run.
bool g_grouped_refused = false;
bool grouped_gemm_usable() {
#if CUBLAS_VERSION >= 120500
  return !g_grouped_refused;
#else
  return false;
#endif
}

// The per-expert GEMMs of one step (same transposes, dtypes and beta; each expert its own
// shapes and pointers), issued as one cublasGemmGroupedBatchedEx call (cuBLAS 12.5+, each
// expert a group of one) instead of one cublasGemmEx launch per expert: at d = 64 the GEMMs are
// small and the launches cost as much as the math (~40% of the loop's time at the 0.1B shape,
// docs/PERFORMANCE.md). cuBLAS's grouped GEMM takes equal input and output dtypes only: dY is
// then computed in the activation dtype, fp32 weight gradients of bf16 GEMMs go through
// WeightGrad below, and any call cuBLAS refuses loops (then for the rest of the run, with one
// note). The pointer arrays go to the device through upload_async (core/cuda_backend.h): no
// stream wait per call.
class GemmBatch {
 public:
  GemmBatch(bool ta, bool tb, DType in, DType out, float beta) : ta_(ta), tb_(tb), in_(in), out_(out), beta_(beta) {}
  void add(int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb, void* C,
           int64_t ldc) {
    if (M == 0 || N == 0) return;
    items_.push_back(Item{M, N, K, A, lda, B, ldb, C, ldc});
  }
  void run() {
    if (items_.empty()) return;
    if (in_ == out_ && items_.size() > 1 && grouped()) return;
    for (const Item& g : items_) rgemm(ta_, tb_, g.M, g.N, g.K, g.A, g.lda, g.B, g.ldb, in_, beta_, g.C, g.ldc, out_);
  }

 private:
  struct Item {
    int64_t M, N, K;
    const void* A;
    int64_t lda;
    const void* B;
    int64_t ldb;
    void* C;
    int64_t ldc;
  };
  // One grouped call in the column-major terms of rgemm (C^T = op(B)^T op(A)^T); false when
  // cuBLAS has no grouped GEMM here.
  bool grouped() {
#if CUBLAS_VERSION >= 120500
    if (g_grouped_refused) return false;
    const int n = static_cast<int>(items_.size());
    std::vector<cublasOperation_t> transa(n, tb_ ? CUBLAS_OP_T : CUBLAS_OP_N), transb(n, ta_ ? CUBLAS_OP_T : CUBLAS_OP_N);
    std::vector<int> m(n), nn(n), k(n), lda(n), ldb(n), ldc(n), group_size(n, 1);
    std::vector<float> alpha(n, 1.0f), beta(n, beta_);
    std::vector<const void*> host(3 * static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      const Item& g = items_[i];
      m[i] = static_cast<int>(g.N), nn[i] = static_cast<int>(g.M), k[i] = static_cast<int>(g.K);
      lda[i] = static_cast<int>(g.ldb), ldb[i] = static_cast<int>(g.lda), ldc[i] = static_cast<int>(g.ldc);
      host[i] = g.B, host[n + i] = g.A, host[2 * n + i] = g.C;
    }
    // The pointer arrays through the upload ring (a Tensor copy past ~10,000 experts).
    Tensor staged;
    const void* const* dA =
        static_cast<const void* const*>(to_device(host.data(), host.size() * sizeof(void*), staged));
    const void* const* dB = dA + n;
    void* const* dC = const_cast<void* const*>(dA + 2 * n);
    const cudaDataType_t it = in_ == DType::f32 ? CUDA_R_32F : CUDA_R_16BF;
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        context().blas, transa.data(), transb.data(), m.data(), nn.data(), k.data(), alpha.data(), dA, it, lda.data(),
        dB, it, ldb.data(), beta.data(), dC, it, ldc.data(), n, group_size.data(), CUBLAS_COMPUTE_32F);
    if (st == CUBLAS_STATUS_SUCCESS) return true;
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) CUBLAS_CHECK(st);
    g_grouped_refused = true;
    std::fprintf(stderr, "note: cublasGemmGroupedBatchedEx refused the expert GEMMs (%s); looping over the experts\n",
                 cublasGetStatusString(st));
    return false;
#else
    return false;
#endif
  }
  bool ta_, tb_;
  DType in_, out_;
  float beta_;
  std::vector<Item> items_;
};

// Element e of a matrix of dtype dt starting at base (byte arithmetic for the sub-blocks).
const void* at(const Tensor& t, int64_t offset) {
  return static_cast<const char*>(t.raw()) + offset * static_cast<int64_t>(dtype_size(t.dtype()));
}
void* at(Tensor& t, int64_t offset) { return static_cast<char*>(t.raw()) + offset * static_cast<int64_t>(dtype_size(t.dtype())); }

template <class T> __global__ void accumulate_kernel(float* g, const T* b, int64_t n) {
  DT_GRID_STRIDE(i, n) g[i] += to_float(b[i]);
}

// Where the experts' GEMMs put one weight gradient (beta 1, accumulating over micro-batches).
// With bf16 GEMMs and an fp32 gradient cuBLAS's grouped GEMM (one dtype only) cannot write the
// gradient itself; rather than 42 launches of cublasGemmEx per gradient (small [d, h] outputs
// over a long sum: a few blocks each, the GPU mostly idle), the products go in one grouped call
// to a zeroed bf16 buffer of the gradient's shape, and one kernel adds that into the fp32
// gradient: the micro-batch's product rounded to bf16 once, as PyTorch's autocast rounds its
// bf16 matmuls' weight gradients, then accumulated in fp32. Same dtypes, or no grouped GEMM
// (cuBLAS < 12.5, or refused): straight into the gradient.
class WeightGrad {
 public:
  WeightGrad(Tensor& grad, DType act) : grad_(grad), widen_(grad.dtype() != act && grouped_gemm_usable()) {
    if (widen_) buf_ = Tensor::zeros({grad.numel()}, act, Device::cuda);
  }
  DType out() const { return widen_ ? buf_.dtype() : grad_.dtype(); }
  void* at_offset(int64_t offset) { return at(widen_ ? buf_ : grad_, offset); }
  // After the GEMMs: the buffer into the gradient.
  void finish() {
    if (!widen_) return;
    DT_CUDA_F32_BF16(buf_.dtype(), "grouped_experts_backward", T, {
      accumulate_kernel<T><<<grid_for(buf_.numel()), kThreads, 0, context().stream>>>(ptr<float>(grad_), ptr<T>(buf_),
                                                                                      buf_.numel());
      CUDA_CHECK_LAUNCH();
    });
  }

 private:
  Tensor& grad_;
  bool widen_;
  Tensor buf_;
};

// Forward epilogue, one warp per pair: rs (1 without the RMS step) of the block centred by the
// given mu (null without the mean step: 0), y = s * SiLU(gamma * (pre - mu) * rs) [* up].
template <class T>
__global__ void pairs_forward_kernel(T* y, float* rs_out, const T* pre, const T* up, const float* mu_in,
                                     const float* sp, const T* gamma, int64_t P, int d, bool rms, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t p = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; p < P; p += warps) {
    const float mu = mu_in ? mu_in[p] : 0.0f;
    const T* pr = pre + p * d;
    float c[kSlots];
    float ss = 0.0f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int j = lane + 32 * s;
      c[s] = j < d ? to_float(pr[j]) - mu : 0.0f;
      ss += c[s] * c[s];
    }
    float rs = 1.0f;
    if (rms) rs = 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
    if (lane == 0) rs_out[p] = rs;
    const float se = sp[p];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int j = lane + 32 * s;
      if (j >= d) continue;
      const float a = rms ? to_float(gamma[j]) * c[s] * rs : c[s];
      float z = a * sigmoidf_(a);
      if (up) z *= to_float(up[p * d + j]);
      y[p * d + j] = from_float<T>(se * z);
    }
  }
}

// Backward per pair, one warp per pair; block b takes pairs [b * per_block, (b+1) * per_block),
// warp w the pairs begin + w, + kWarps, ... Writes dpre (the gradient reaching the centred block,
// dc), dup (gated), dsp = dY . z, gmean = sum of dc (mean modes) and, with the RMS step, the
// block's dgamma partials (lanes in registers, then the warps summed in order).
template <class T, class DY>
__global__ void pairs_backward_kernel(T* dpre, T* dup, float* dsp, float* gmean, double* dgamma_part, const DY* dy,
                                      const T* pre, const T* up, const float* mu, const float* rs_cache,
                                      const float* sp, const T* gamma, int64_t P, int d, int64_t per_block, bool mean,
                                      bool rms) {
  __shared__ float wpart[kWarps][kMaxWidth];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t begin = blockIdx.x * per_block, end = begin + per_block < P ? begin + per_block : P;
  float dg[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) dg[s] = 0.0f;
  for (int64_t p = begin + w; p < end; p += kWarps) {
    const float m = mu[p], rs = rs_cache[p], se = sp[p];
    float dc[kSlots], chat[kSlots];
    float dsum = 0.0f, dot = 0.0f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int j = lane + 32 * s;
      dc[s] = 0.0f, chat[s] = 0.0f;
      if (j >= d) continue;
      const int64_t i = p * d + j;
      const float cval = to_float(pre[i]) - m;
      const float gj = rms ? to_float(gamma[j]) : 1.0f;
      chat[s] = cval * rs;
      const float a = rms ? gj * chat[s] : cval;
      const float sg = sigmoidf_(a), act = a * sg;
      const float u = up ? to_float(up[i]) : 1.0f;
      const float dyj = to_float(dy[i]);
      dsum += dyj * (act * u);
      const float dz = dyj * se;
      if (up) dup[i] = from_float<T>(dz * act);
      const float da = dz * u * sg * (1.0f + a * (1.0f - sg));
      if (rms) {
        dg[s] += da * chat[s];
        dc[s] = da * gj;  // d chat, turned into d c below
        dot += dc[s] * chat[s];
      } else {
        dc[s] = da;
      }
    }
    dsum = warp_sum(dsum);
    if (lane == 0) dsp[p] = dsum;
    if (rms) {
      const float mm = warp_sum(dot) / static_cast<float>(d);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) dc[s] = rs * (dc[s] - chat[s] * mm);  // 0 stays 0 for j >= d
    }
    float gs = 0.0f;  // stays 0 without the mean step
    if (mean) {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) gs += dc[s];
      gs = warp_sum(gs);
    }
    if (lane == 0) gmean[p] = gs;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int j = lane + 32 * s;
      if (j < d) dpre[p * d + j] = from_float<T>(dc[s]);
    }
  }
  if (!rms) return;  // uniform over the block
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int j = lane + 32 * s;
    if (j < d) wpart[w][j] = dg[s];
  }
  __syncthreads();
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    double acc = 0;
    for (int k = 0; k < kWarps; ++k) acc += wpart[k][j];
    dgamma_part[blockIdx.x * static_cast<int64_t>(d) + j] = acc;
  }
}

void check_offsets(const std::vector<int64_t>& off, int64_t P, int64_t d, const Tensor& w_pre, const Tensor& w_down,
                   const char* op) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  DT_ASSERT(E >= 1 && off.front() == 0 && off.back() == P, op, ": offsets do not cover the ", P, " pairs");
  for (int64_t e = 0; e < E; ++e) DT_ASSERT(off[e] <= off[e + 1], op, ": offsets decrease at expert ", e);
  DT_ASSERT(w_pre.dim(0) == E * d && w_down.dim(1) == E * d, op, ": ", E, " experts of width ", d, " but W_pre has ",
            w_pre.dim(0), " rows and W_down ", w_down.dim(1), " columns");
  if (d > kMaxWidth) fail(op, ": expert width ", d, " is above the CUDA kernel's limit of ", kMaxWidth);
}

// The weights: the activation dtype, their shapes.
void expect_weights(DType dt, int64_t E, int64_t h, int64_t d, const Tensor& w_pre, const Tensor* w_up_gated,
                    const Tensor& gamma, const Tensor& w_down, const char* op) {
  expect_numel(w_pre, E * d * h, op, "w_pre");
  expect_numel(w_down, h * E * d, op, "w_down");
  expect_dtype(w_pre, dt, op, "w_pre");
  expect_dtype(gamma, dt, op, "gamma");
  expect_dtype(w_down, dt, op, "w_down");
  if (w_up_gated) {
    expect_numel(*w_up_gated, E * d * h, op, "w_up_gated");
    expect_dtype(*w_up_gated, dt, op, "w_up_gated");
  }
}

// A weight gradient: fp32, or the activation dtype.
void expect_grad(const Tensor& g, DType act, int64_t n, const char* op, const char* name) {
  expect_numel(g, n, op, name);
  DT_ASSERT(g.dtype() == DType::f32 || g.dtype() == act, op, ": ", name, " is ", dtype_name(g.dtype()),
            " for ", dtype_name(act), " activations");
}

}  // namespace

void sum_rows(Tensor& out, const Tensor& x) {
  const int64_t rows = x.dim(0), cols = x.numel() / std::max<int64_t>(rows, 1);
  expect_numel(out, cols, "sum_rows", "out");
  if (cols == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), "sum_rows", T, {
    sum_rows_kernel<T><<<grid_for(cols), kThreads, 0, context().stream>>>(ptr<T>(out), ptr<T>(x), rows, cols);
    CUDA_CHECK_LAUNCH();
  });
}

void add_rows_(Tensor& x, const Tensor& row, double alpha) {
  const int64_t rows = x.dim(0), cols = x.numel() / std::max<int64_t>(rows, 1);
  expect_numel(row, cols, "add_rows_", "row");
  if (x.numel() == 0) return;
  DT_CUDA_F32_BF16(x.dtype(), "add_rows_", T, {
    add_rows_kernel<T><<<grid_for(rows * cols), kThreads, 0, context().stream>>>(
        ptr<T>(x), ptr<T>(row), static_cast<float>(alpha), rows, cols);
    CUDA_CHECK_LAUNCH();
  });
}

void route_pairs(RoutedPairs& pairs, const Tensor& r, int64_t e_begin, int64_t e_end, bool all_pairs) {
  const int64_t T = r.dim(0), E = r.dim(1), El = e_end - e_begin;
  DT_ASSERT(0 <= e_begin && e_begin <= e_end && e_end <= E, "route_pairs: experts [", e_begin, ", ", e_end, ") of ", E);
  DT_ASSERT(T * E < (int64_t(1) << 31), "route_pairs: ", T, " x ", E, " router entries overflow i32 slots");
  expect_dtype(r, DType::f32, "route_pairs", "r (router logits)");
  pairs.offsets.assign(1, 0);
  const int64_t chunks = (T + kRouteChunk - 1) / kRouteChunk;
  pairs.slot_pair = Tensor::empty({T, El}, DType::i32, Device::cuda);
  if (El == 0 || T == 0) {
    pairs.offsets.assign(El + 1, 0);
    pairs.tokens = Tensor::empty({0}, DType::i32, Device::cuda);
    pairs.slots = Tensor::empty({0}, DType::i32, Device::cuda);
    return;
  }
  cudaStream_t st = context().stream;
  const dim3 grid(static_cast<unsigned>(El), static_cast<unsigned>(chunks));
  // 1. Active pairs per (expert, chunk of tokens); to the host, which needs the offsets anyway.
  Tensor counts = scratch(El * chunks, DType::i32);
  route_count_kernel<<<grid, kRouteChunk, 0, st>>>(ptr<int32_t>(counts), ptr<float>(r), T, E, e_begin, all_pairs);
  CUDA_CHECK_LAUNCH();
  Tensor hc = counts.to(Device::cpu);  // waits for the stream
  // 2. Each (expert, chunk)'s first pair: experts in order, chunks (tokens) ascending within.
  Tensor starts = Tensor::empty({El * chunks}, DType::i32);
  int64_t run = 0;
  for (int64_t e = 0; e < El; ++e) {
    for (int64_t c = 0; c < chunks; ++c) {
      starts.data<int32_t>()[e * chunks + c] = static_cast<int32_t>(run);
      run += hc.data<int32_t>()[e * chunks + c];
    }
    pairs.offsets.push_back(run);
  }
  pairs.tokens = Tensor::empty({run}, DType::i32, Device::cuda);
  pairs.slots = Tensor::empty({run}, DType::i32, Device::cuda);
  if (run == 0) {  // every entry -1: all bytes 0xff
    CUDA_CHECK(cudaMemsetAsync(pairs.slot_pair.raw(), 0xff, static_cast<size_t>(T * El) * sizeof(int32_t), st));
    return;
  }
  Tensor staged;
  const void* dstarts = to_device(starts.raw(), static_cast<size_t>(El * chunks) * sizeof(int32_t), staged);
  // 3. Each block writes its chunk's active tokens in ascending order (ballot compaction).
  route_fill_kernel<<<grid, kRouteChunk, 0, st>>>(ptr<int32_t>(pairs.tokens), ptr<int32_t>(pairs.slots),
                                                  ptr<int32_t>(pairs.slot_pair), static_cast<const int32_t*>(dstarts), ptr<float>(r), T, E, e_begin,
                                                  all_pairs);
  CUDA_CHECK_LAUNCH();
}

// The pairs' rows as a [P, h] copy (the cuBLAS path).
Tensor gather_copy(const Tensor& rows, const Tensor& index) {
  Tensor out = Tensor::empty({index.numel(), rows.dim(1)}, rows.dtype(), Device::cuda);
  if (index.numel() > 0) embedding_forward(out, index, rows);
  return out;
}

void expect_pair_rows(const Tensor& rows, const Tensor& index, DType dt, const char* op, const char* name) {
  DT_ASSERT(rows.ndim() == 2, op, ": ", name, " ", shape_str(rows.shape()), " is not [rows, h]");
  expect_dtype(rows, dt, op, name);
  expect_dtype(index, DType::i32, op, "index");
}

// Whether this call reads the pairs' rows through the index inside the GEMMs.
bool fused_gather(DType dt) { return dt == DType::bf16 && fused_expert_gather(); }

void grouped_experts_forward(Tensor& outp, GroupedExperts& c, const Tensor& x_rows, const Tensor& index,
                             const std::vector<int64_t>& off, const Tensor& sp, const Tensor* mu, const Tensor& w_pre,
                             const Tensor* w_up_gated, const Tensor& gamma, const Tensor& w_down, NormSiluMode mode,
                             double eps) {
  static const char* op = "grouped_experts_forward";
  const DType dt = x_rows.dtype();
  expect_pair_rows(x_rows, index, dt, op, "x_rows");
  const int64_t P = index.numel(), h = x_rows.dim(1), d = gamma.numel(), E = static_cast<int64_t>(off.size()) - 1;
  check_offsets(off, P, d, w_pre, w_down, op);
  expect_numel(outp, P * h, op, "outp");
  expect_numel(sp, P, op, "sp");
  expect_dtype(sp, DType::f32, op, "sp (router scores)");
  expect_dtype(outp, dt, op, "outp");
  expect_weights(dt, E, h, d, w_pre, w_up_gated, gamma, w_down, op);
  DT_ASSERT(uses_mean(mode) == (mu != nullptr), op, ": mu is ", mu ? "given" : "missing", " for NormSiLU mode ",
            static_cast<int>(mode));
  if (mu) {
    expect_numel(*mu, P, op, "mu");
    expect_dtype(*mu, DType::f32, op, "mu (NormSiLU's means)");
  }
  c.mu = mu ? *mu : Tensor::zeros({P}, DType::f32, Device::cuda);
  c.rs = Tensor::empty({P}, DType::f32, Device::cuda);
  c.pre = Tensor::empty({P, d}, dt, Device::cuda);
  c.up = w_up_gated ? Tensor::empty({P, d}, dt, Device::cuda) : Tensor();
  c.y = Tensor::empty({P, d}, dt, Device::cuda);
  if (P == 0) return;
  DT_CUDA_F32_BF16(dt, op, T, {
    if (fused_gather(dt)) {
      const int64_t R = x_rows.dim(0);
      gathered_gemm(ptr<bf16_t>(c.pre), ptr<bf16_t>(x_rows), R, ptr<int32_t>(index), h, ptr<bf16_t>(w_pre),
                    ExpertBlock::rows_of_expert, h, d, off);
      if (w_up_gated)
        gathered_gemm(ptr<bf16_t>(c.up), ptr<bf16_t>(x_rows), R, ptr<int32_t>(index), h, ptr<bf16_t>(*w_up_gated),
                      ExpertBlock::rows_of_expert, h, d, off);
    } else {
      const Tensor xp = gather_copy(x_rows, index);
      GemmBatch pre(false, true, dt, dt, 0.0f), up(false, true, dt, dt, 0.0f);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t n = off[e + 1] - off[e];
        pre.add(n, d, h, at(xp, off[e] * h), h, at(w_pre, e * d * h), h, at(c.pre, off[e] * d), d);
        if (w_up_gated)
          up.add(n, d, h, at(xp, off[e] * h), h, at(*w_up_gated, e * d * h), h, at(c.up, off[e] * d), d);
      }
      pre.run();
      up.run();
    }
    GemmBatch down(false, true, dt, dt, 0.0f);
    pairs_forward_kernel<T><<<grid_for(P * 32), kThreads, 0, context().stream>>>(
        ptr<T>(c.y), ptr<float>(c.rs), ptr<T>(c.pre), w_up_gated ? ptr<T>(c.up) : nullptr,
        mu ? ptr<float>(*mu) : nullptr, ptr<float>(sp), ptr<T>(gamma), P, static_cast<int>(d), uses_rms(mode),
        static_cast<float>(eps));
    CUDA_CHECK_LAUNCH();
    for (int64_t e = 0; e < E; ++e)
      down.add(off[e + 1] - off[e], h, d, at(c.y, off[e] * d), d, at(w_down, e * d), E * d, at(outp, off[e] * h), h);
    down.run();
  });
}

void grouped_experts_backward(Tensor& dxp, Tensor& dsp, Tensor& gmean, Tensor& dw_pre, Tensor* dw_up_gated,
                              Tensor& dgamma, Tensor& dw_down, const Tensor& dout_rows, const GroupedExperts& c,
                              const Tensor& x_rows, const Tensor& index, const std::vector<int64_t>& off,
                              const Tensor& sp, const Tensor& w_pre, const Tensor* w_up_gated, const Tensor& gamma,
                              const Tensor& w_down, NormSiluMode mode, double eps) {
  (void)eps;  // rs is cached
  static const char* op = "grouped_experts_backward";
  const DType dt = x_rows.dtype();
  expect_pair_rows(x_rows, index, dt, op, "x_rows");
  expect_pair_rows(dout_rows, index, dt, op, "dout_rows");
  const int64_t P = index.numel(), h = x_rows.dim(1), d = gamma.numel(), E = static_cast<int64_t>(off.size()) - 1;
  check_offsets(off, P, d, w_pre, w_down, op);
  DT_ASSERT(dout_rows.dim(1) == h, op, ": dout_rows ", shape_str(dout_rows.shape()), " for x_rows ",
            shape_str(x_rows.shape()));
  const bool mean = uses_mean(mode), rms = uses_rms(mode);
  expect_weights(dt, E, h, d, w_pre, w_up_gated, gamma, w_down, op);
  expect_numel(dxp, P * h, op, "dxp");
  expect_dtype(dxp, dt, op, "dxp");
  expect_numel(dsp, P, op, "dsp");
  expect_dtype(dsp, DType::f32, op, "dsp (router score gradients)");
  expect_numel(sp, P, op, "sp");
  expect_dtype(sp, DType::f32, op, "sp (router scores)");
  expect_numel(gmean, P, op, "gmean");
  expect_dtype(gmean, DType::f32, op, "gmean (mean gradients per pair)");
  expect_grad(dw_pre, dt, E * d * h, op, "dw_pre");
  expect_grad(dw_down, dt, h * E * d, op, "dw_down");
  expect_grad(dgamma, dt, d, op, "dgamma");
  DT_ASSERT((w_up_gated == nullptr) == (dw_up_gated == nullptr), op, ": gated weights without their gradient");
  if (dw_up_gated) expect_grad(*dw_up_gated, dt, E * d * h, op, "dw_up_gated");
  DT_ASSERT(c.pre.numel() == P * d && c.y.numel() == P * d && c.mu.numel() == P && c.rs.numel() == P &&
                (!w_up_gated || c.up.numel() == P * d),
            op, ": the forward cache does not hold ", P, " pairs");
  if (P == 0) return;
  // Gathers fused into the GEMMs write the weight gradients themselves: fp32 ones.
  const bool fused = fused_gather(dt) && dw_pre.dtype() == DType::f32 && dw_down.dtype() == DType::f32 &&
                     (!dw_up_gated || dw_up_gated->dtype() == DType::f32);
  const Tensor xp = fused ? Tensor() : gather_copy(x_rows, index);
  const Tensor doutp = fused ? Tensor() : gather_copy(dout_rows, index);
  const int64_t R = x_rows.dim(0), Rd = dout_rows.dim(0);
  cudaStream_t st = context().stream;
  DT_CUDA_F32_BF16(dt, op, T, {
    // 1. dY_e = dOut_e W_down_e: gathered from dout_rows; or fp32 from the per-expert loop, or,
    // where cuBLAS's grouped GEMM takes the call (one dtype), in the activation dtype. Under bf16
    // rounded once, as autocast's bf16 matmul outputs are (the NormSiLU backward and dsp = dY . z
    // still sum in fp32).
    const DType dy_dt = fused || grouped_gemm_usable() ? dt : DType::f32;
    Tensor dy = scratch(P * d, dy_dt);
    if (fused) {
      gathered_gemm(ptr<bf16_t>(dy), ptr<bf16_t>(dout_rows), Rd, ptr<int32_t>(index), h, ptr<bf16_t>(w_down),
                    ExpertBlock::cols_of_expert, E * d, d, off);
    } else {
      GemmBatch dY(false, false, dt, dy_dt, 0.0f);
      for (int64_t e = 0; e < E; ++e)
        dY.add(off[e + 1] - off[e], d, h, at(doutp, off[e] * h), h, at(w_down, e * d), E * d, at(dy, off[e] * d), d);
      dY.run();
    }
    // 2. The per-pair NormSiLU backward; dgamma partials per block, then summed in block order.
    Tensor dpre = scratch(P * d, dt);
    Tensor dup = w_up_gated ? scratch(P * d, dt) : Tensor();
    const int64_t per_block = std::max<int64_t>(64, (P + 1023) / 1024);
    const int64_t blocks = (P + per_block - 1) / per_block;
    Tensor part = scratch(rms ? blocks * d : 1, DType::f64);
    auto pairs_backward = [&](auto* dy_ptr) {
      using DY = std::remove_const_t<std::remove_pointer_t<decltype(dy_ptr)>>;
      pairs_backward_kernel<T, DY><<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(
          ptr<T>(dpre), w_up_gated ? ptr<T>(dup) : nullptr, ptr<float>(dsp), ptr<float>(gmean), ptr<double>(part),
          dy_ptr, ptr<T>(c.pre), w_up_gated ? ptr<T>(c.up) : nullptr, ptr<float>(c.mu), ptr<float>(c.rs),
          ptr<float>(sp), ptr<T>(gamma), P, static_cast<int>(d), per_block, mean, rms);
      CUDA_CHECK_LAUNCH();
    };
    if (dy_dt == DType::f32) pairs_backward(ptr<float>(dy));
    else pairs_backward(ptr<T>(dy));
    if (rms) {
      const unsigned gblocks = static_cast<unsigned>((d + 127) / 128);
      if (dgamma.dtype() == DType::f32)
        col_finish_kernel<float><<<gblocks, 128, 0, st>>>(ptr<double>(part), blocks, d, ptr<float>(dgamma), true);
      else
        col_finish_kernel<T><<<gblocks, 128, 0, st>>>(ptr<double>(part), blocks, d, ptr<T>(dgamma), true);
      CUDA_CHECK_LAUNCH();
    }
    // 3. The experts' GEMMs on their rows; weight gradients accumulate (beta 1). Batched by
    // kind, in the loop's order of dependencies: dX = dpre W_pre (beta 0) before dX += dup W_up.
    GemmBatch dx_pre(false, false, dt, dt, 0.0f), dx_up(false, false, dt, dt, 1.0f);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = off[e + 1] - off[e];
      if (n == 0) continue;
      void* dxe = at(dxp, off[e] * h);
      dx_pre.add(n, h, d, at(dpre, off[e] * d), d, at(w_pre, e * d * h), h, dxe, h);
      if (w_up_gated) dx_up.add(n, h, d, at(dup, off[e] * d), d, at(*w_up_gated, e * d * h), h, dxe, h);
    }
    if (fused) {
      const int32_t* idx = ptr<int32_t>(index);
      gathered_weight_grad(ptr<float>(dw_down), ExpertBlock::cols_of_expert, E * d, ptr<bf16_t>(c.y), d,
                           ptr<bf16_t>(dout_rows), Rd, idx, h, off);
      gathered_weight_grad(ptr<float>(dw_pre), ExpertBlock::rows_of_expert, h, ptr<bf16_t>(dpre), d,
                           ptr<bf16_t>(x_rows), R, idx, h, off);
      if (w_up_gated)
        gathered_weight_grad(ptr<float>(*dw_up_gated), ExpertBlock::rows_of_expert, h, ptr<bf16_t>(dup), d,
                             ptr<bf16_t>(x_rows), R, idx, h, off);
      dx_pre.run();
      dx_up.run();
      return;
    }
    WeightGrad g_down(dw_down, dt), g_pre(dw_pre, dt);
    std::optional<WeightGrad> g_up;
    if (w_up_gated) g_up.emplace(*dw_up_gated, dt);
    GemmBatch dw_down_b(true, false, dt, g_down.out(), 1.0f), dw_pre_b(true, false, dt, g_pre.out(), 1.0f),
        dw_up_b(true, false, dt, g_up ? g_up->out() : dt, 1.0f);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = off[e + 1] - off[e];
      if (n == 0) continue;
      const void* xe = at(xp, off[e] * h);
      dw_down_b.add(h, d, n, at(doutp, off[e] * h), h, at(c.y, off[e] * d), d, g_down.at_offset(e * d), E * d);
      dw_pre_b.add(d, h, n, at(dpre, off[e] * d), d, xe, h, g_pre.at_offset(e * d * h), h);
      if (w_up_gated) dw_up_b.add(d, h, n, at(dup, off[e] * d), d, xe, h, g_up->at_offset(e * d * h), h);
    }
    dw_down_b.run();
    dw_pre_b.run();
    dx_pre.run();
    dw_up_b.run();
    dx_up.run();
    g_down.finish();
    g_pre.finish();
    if (g_up) g_up->finish();
  });
}

}  // namespace decotron::cuda
