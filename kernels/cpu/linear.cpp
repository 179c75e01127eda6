// Linear layers on the CPU through OpenBLAS (cblas): the three GEMMs of a linear layer.
#include <cblas.h>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/dispatch.h"

namespace decotron::cpu {

namespace {
void gemm(DType t, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b,
          int64_t ldb, double beta, void* c, int64_t ldc) {
  auto TA = ta ? CblasTrans : CblasNoTrans, TB = tb ? CblasTrans : CblasNoTrans;
  if (m == 0 || n == 0) return;
  if (t == DType::f32)
    cblas_sgemm(CblasRowMajor, TA, TB, m, n, k, 1.0f, static_cast<const float*>(a), lda, static_cast<const float*>(b),
                ldb, static_cast<float>(beta), static_cast<float*>(c), ldc);
  else if (t == DType::f64)
    cblas_dgemm(CblasRowMajor, TA, TB, m, n, k, 1.0, static_cast<const double*>(a), lda,
                static_cast<const double*>(b), ldb, beta, static_cast<double*>(c), ldc);
  else
    fail("the CPU backend computes in fp32 (or fp64 for checks), not ", dtype_name(t));
}
}  // namespace

void linear_forward(Tensor& y, const Tensor& x, const Tensor& w, bool accumulate) {
  int64_t K = w.dim(1), N = w.dim(0), M = x.numel() / K;
  DT_ASSERT(x.numel() == M * K && y.numel() == M * N, "linear x ", shape_str(x.shape()), " w ", shape_str(w.shape()),
            " y ", shape_str(y.shape()));
  gemm(x.dtype(), false, true, M, N, K, x.raw(), K, w.raw(), K, accumulate ? 1.0 : 0.0, y.raw(), N);
}

void linear_backward(Tensor* dx, Tensor* dw, const Tensor& dy, const Tensor& x, const Tensor& w, bool accumulate_dx) {
  int64_t K = w.dim(1), N = w.dim(0), M = x.numel() / K;
  DT_ASSERT(dy.numel() == M * N, "linear dy ", shape_str(dy.shape()));
  if (dx) gemm(x.dtype(), false, false, M, K, N, dy.raw(), N, w.raw(), K, accumulate_dx ? 1.0 : 0.0, dx->raw(), K);
  if (dw) gemm(x.dtype(), true, false, N, K, M, dy.raw(), N, x.raw(), K, 1.0, dw->raw(), K);
}

}  // namespace decotron::cpu
