// Host stand-ins for the CUDA runtime, cuBLAS and cuBLASLt calls the backend makes.
#include "emu.h"
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cstdio>
#include <cstdlib>

namespace emu {
thread_local Block* cur_block = nullptr;
thread_local int cur_tid = 0;
std::vector<double> smem_buf;
void set_ids(dim3 t, dim3 b, dim3 bd, dim3 gd) { threadIdx = t, blockIdx = b, blockDim = bd, gridDim = gd; }
}  // namespace emu
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

extern "C" {
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 2 : 232448;
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = reinterpret_cast<cudaStream_t>(0x1); return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaMalloc(void** p, size_t n) { *p = std::aligned_alloc(256, (n + 255) / 256 * 256); std::memset(*p, 0xCD, (n + 255) / 256 * 256); return cudaSuccess; }
cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) { std::memmove(d, s, n); return cudaSuccess; }
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) { *p = std::malloc(n); return cudaSuccess; }
cudaError_t cudaFreeHost(void* p) { std::free(p); return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }  // copies are done when enqueued
cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t) { std::memset(d, v, n); return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

cublasStatus_t cublasCreate_v2(cublasHandle_t* h) { *h = reinterpret_cast<cublasHandle_t>(0x2); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream_v2(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
const char* cublasGetStatusString(cublasStatus_t) { return "emulated cublas error"; }
cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) { *h = reinterpret_cast<cublasLtHandle_t>(0x3); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t, cudaDataType_t) { *d = reinterpret_cast<cublasLtMatmulDesc_t>(new char[8]); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { delete[] reinterpret_cast<char*>(d); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t, cublasLtMatmulDescAttributes_t, const void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType, uint64_t, uint64_t, int64_t) { *l = reinterpret_cast<cublasLtMatrixLayout_t>(new char[8]); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatrixLayoutDestroy(const cublasLtMatrixLayout_t l) { delete[] reinterpret_cast<char*>(l); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) { *p = reinterpret_cast<cublasLtMatmulPreference_t>(new char[8]); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { delete[] reinterpret_cast<char*>(p); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t, cublasLtMatmulPreferenceAttributes_t, const void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatmulPreference_t, int, cublasLtMatmulHeuristicResult_t*, int* n) { *n = 0; return CUBLAS_STATUS_NOT_SUPPORTED; }
cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t, const void*, const void*, cublasLtMatrixLayout_t, const void*, cublasLtMatrixLayout_t, const void*, const void*, cublasLtMatrixLayout_t, void*, cublasLtMatrixLayout_t, const cublasLtMatmulAlgo_t*, void*, size_t, cudaStream_t) { abort(); }

static float ld(const void* p, cudaDataType t, int64_t i) {
  if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
  if (t == CUDA_R_16BF) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  abort();
}
// Column-major C[m,n] = alpha op(A) op(B) + beta C, naive, fp32 accumulation.
cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType at, int lda, const void* B, cudaDataType bt, int ldb, const void* beta,
                            void* C, cudaDataType ct, int ldc, cublasComputeType_t, cublasGemmAlgo_t) {
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float acc = 0;
      for (int p = 0; p < k; ++p) {
        float a = ta == CUBLAS_OP_N ? ld(A, at, i + (int64_t)p * lda) : ld(A, at, p + (int64_t)i * lda);
        float b = tb == CUBLAS_OP_N ? ld(B, bt, p + (int64_t)j * ldb) : ld(B, bt, j + (int64_t)p * ldb);
        acc += a * b;
      }
      int64_t o = i + (int64_t)j * ldc;
      float r = al * acc + (be != 0 ? be * ld(C, ct, o) : 0.0f);
      if (ct == CUDA_R_32F) static_cast<float*>(C)[o] = r;
      else static_cast<__nv_bfloat16*>(C)[o] = __float2bfloat16_rn(r);
    }
  return CUBLAS_STATUS_SUCCESS;
}

// Grouped GEMM: each group's problems through the naive cublasGemmEx above (device pointer
// arrays are host memory here).
cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[],
                                          const int m[], const int n[], const int k[], const void* alpha,
                                          const void* const A[], cudaDataType_t at, const int lda[], const void* const B[],
                                          cudaDataType_t bt, const int ldb[], const void* beta, void* const C[],
                                          cudaDataType_t ct, const int ldc[], int groups, const int group_size[],
                                          cublasComputeType_t compute) {
  const float* al = static_cast<const float*>(alpha);
  const float* be = static_cast<const float*>(beta);
  for (int g = 0, idx = 0; g < groups; ++g)
    for (int i = 0; i < group_size[g]; ++i, ++idx)
      cublasGemmEx(h, ta[g], tb[g], m[g], n[g], k[g], &al[g], A[idx], at, lda[g], B[idx], bt, ldb[g], &be[g], C[idx], ct,
                   ldc[g], compute, CUBLAS_GEMM_DEFAULT);
  return CUBLAS_STATUS_SUCCESS;
}
}
