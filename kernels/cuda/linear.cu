// Linear layers on the GPU: the three GEMMs of y = x W^T through cuBLASLt (cublasGemmEx when
// cuBLASLt offers no algorithm). Row-major trick: a row-major [r, c] matrix is a column-major
// [c, r] one, so y = x W^T is computed as y^T = W x^T in column-major terms.
// dtypes: fp32 (strict fp32 compute, no TF32: matches the CPU reference) and bf16 inputs with
// fp32 accumulation, the output bf16 or fp32 (fp32 dW for bf16 training's main gradients).
#include <array>
#include <map>
#include <memory>
#include <mutex>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

cudaDataType_t cuda_type(DType t, const char* op) {
  if (t == DType::f32) return CUDA_R_32F;
  if (t == DType::bf16) return CUDA_R_16BF;
  no_kernel(op, t);
}

uint32_t alignment_of(const void* p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  LtDescs() = default;
  LtDescs(const LtDescs&) = delete;
  LtDescs& operator=(const LtDescs&) = delete;
  ~LtDescs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// What cuBLASLt chose for one GEMM configuration: its descriptors and the heuristic's first
// algorithm (or none: the cublasGemmEx fallback).
struct LtPlan {
  LtDescs d;
  cublasLtMatmulAlgo_t algo{};
  bool has_algo = false;
};

// The plans by configuration (transposes, shape, leading dimensions, dtypes, pointer
// alignments): building the descriptors and asking the heuristic cost host time on every call
// (tens of microseconds, more than a small GEMM's GPU time; a decode step makes ~100 GEMM calls),
// while the answer depends only on these. Emptied past kMaxPlans (shapes that vary from step to
// step, as the rows an expert-parallel rank receives, would otherwise grow it without bound).
using PlanKey = std::array<int64_t, 13>;
constexpr size_t kMaxPlans = 1024;

std::shared_ptr<const LtPlan> plan_for(const PlanKey& key, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                                       int64_t lda, int64_t ldb, int64_t ldc, cudaDataType_t at, cudaDataType_t ct,
                                       uint32_t al_a, uint32_t al_b, uint32_t al_c) {
  static std::mutex mu;
  // Never destroyed, as the context (whose cuBLASLt handle the plans belong to); shared
  // pointers, so a caller's plan outlives a clear.
  static auto* plans = new std::map<PlanKey, std::shared_ptr<const LtPlan>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans->find(key);
  if (it != plans->end()) return it->second;
  if (plans->size() >= kMaxPlans) plans->clear();
  Context& ctx = context();
  auto plan = std::make_shared<LtPlan>();
  LtDescs& d = plan->d;
  const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, at, ta ? k : m, ta ? m : k, lda));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, at, tb ? n : k, tb ? k : n, ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, ct, m, n, ldc));
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
  const uint64_t ws = ctx.workspace_bytes;
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  // Views (Tensor::rows) need not be 256-byte aligned: let the heuristic know.
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(ctx.blas_lt, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &result, &found);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
    plan->algo = result.algo;
    plan->has_algo = true;
  }
  (*plans)[key] = plan;
  return plan;
}

// Column-major C[m, n] = op(A) op(B) + beta C; A and B share a dtype (fp32 or bf16), C is fp32
// or (for bf16 inputs) bf16. Accumulation and scaling in fp32.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb,
          DType in_type, float beta, void* C, int64_t ldc, DType out_type, const char* op) {
  if (m == 0 || n == 0) return;
  DT_ASSERT(out_type == DType::f32 || out_type == in_type, op, ": ", dtype_name(in_type), " inputs with a ",
            dtype_name(out_type), " output");
  Context& ctx = context();
  if (k == 0) {  // an empty sum: C = beta C, with beta 0 or 1
    if (beta == 0.0f) CUDA_CHECK(cudaMemsetAsync(C, 0, m * n * dtype_size(out_type), ctx.stream));
    return;
  }
  const cudaDataType_t at = cuda_type(in_type, op), ct = cuda_type(out_type, op);
  const float alpha = 1.0f;
  const uint32_t al_a = alignment_of(A), al_b = alignment_of(B), al_c = alignment_of(C);
  const PlanKey key{ta, tb, m, n, k, lda, ldb, ldc, static_cast<int64_t>(in_type), static_cast<int64_t>(out_type),
                    al_a, al_b, al_c};
  const std::shared_ptr<const LtPlan> p = plan_for(key, ta, tb, m, n, k, lda, ldb, ldc, at, ct, al_a, al_b, al_c);
  if (p->has_algo) {
    CUBLAS_CHECK(cublasLtMatmul(ctx.blas_lt, p->d.op, &alpha, A, p->d.a, B, p->d.b, &beta, C, p->d.c, C, p->d.c,
                                &p->algo, ctx.workspace, ctx.workspace_bytes, ctx.stream));
    return;
  }
  const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasGemmEx(ctx.blas, opa, opb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, A,
                            at, static_cast<int>(lda), B, at, static_cast<int>(ldb), &beta, C, ct, static_cast<int>(ldc),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void linear_forward(Tensor& y, const Tensor& x, const Tensor& w, bool accumulate) {
  const int64_t K = w.dim(1), N = w.dim(0), M = K ? x.numel() / K : 0;
  DT_ASSERT(x.numel() == M * K && y.numel() == M * N, "linear x ", shape_str(x.shape()), " w ", shape_str(w.shape()),
            " y ", shape_str(y.shape()));
  DT_ASSERT(x.dtype() == w.dtype(), "linear: x ", dtype_name(x.dtype()), " w ", dtype_name(w.dtype()));
  // y^T[N, M] = W[N, K] x^T[K, M]  (column-major: W is K x N, op T; x is K x M)
  gemm(true, false, N, M, K, w.raw(), K, x.raw(), K, x.dtype(), accumulate ? 1.0f : 0.0f, y.raw(), N, y.dtype(),
       "linear_forward");
}

void linear_backward(Tensor* dx, Tensor* dw, const Tensor& dy, const Tensor& x, const Tensor& w, bool accumulate_dx) {
  const int64_t K = w.dim(1), N = w.dim(0), M = K ? x.numel() / K : 0;
  DT_ASSERT(dy.numel() == M * N && dy.dtype() == x.dtype() && w.dtype() == x.dtype(), "linear dy ",
            shape_str(dy.shape()), " ", dtype_name(dy.dtype()));
  if (dx) {
    DT_ASSERT(dx->numel() == M * K, "linear dx ", shape_str(dx->shape()));
    // dx^T[K, M] = W^T[K, N] dy^T[N, M]  (W is K x N, op N; dy is N x M)
    gemm(false, false, K, M, N, w.raw(), K, dy.raw(), N, x.dtype(), accumulate_dx ? 1.0f : 0.0f, dx->raw(), K,
         dx->dtype(), "linear_backward");
  }
  if (dw) {
    DT_ASSERT(dw->numel() == N * K, "linear dw ", shape_str(dw->shape()));
    // dW^T[K, N] += x^T[K, M] dy[M, N]  (x is K x M, op N; dy is N x M, op T)
    gemm(false, true, K, N, M, x.raw(), K, dy.raw(), N, x.dtype(), 1.0f, dw->raw(), K, dw->dtype(), "linear_backward");
  }
}

}  // namespace decotron::cuda
