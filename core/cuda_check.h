// Checked calls: every CUDA, cuBLAS, NCCL and MPI call goes through one of these, which name the
// call, the file and the line (and, for NCCL/MPI, the rank and host) when it fails.
#pragma once
#include <string>

#include "core/error.h"

namespace decotron {
[[noreturn]] void device_call_failed(const char* lib, const char* call, const std::string& what, const char* file,
                                     int line);
std::string rank_and_host();  // "rank 3 on node7" (or "" outside a multi-rank job)
}  // namespace decotron

#ifdef DECOTRON_WITH_CUDA
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#define CUDA_CHECK(call)                                                                              \
  do {                                                                                                \
    cudaError_t err_ = (call);                                                                        \
    if (err_ != cudaSuccess) ::decotron::device_call_failed("CUDA", #call, cudaGetErrorString(err_), __FILE__, __LINE__); \
  } while (0)
#define CUBLAS_CHECK(call)                                                                            \
  do {                                                                                                \
    cublasStatus_t st_ = (call);                                                                      \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                                 \
      ::decotron::device_call_failed("cuBLAS", #call, cublasGetStatusString(st_), __FILE__, __LINE__); \
  } while (0)
// After a kernel launch: launch errors now, execution errors at the next synchronizing call.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
#endif

#define NCCL_CHECK(call)                                                                              \
  do {                                                                                                \
    auto res_ = (call);                                                                               \
    if (res_ != 0)                                                                                    \
      ::decotron::device_call_failed("NCCL", #call, ::decotron::cat(ncclGetErrorString(res_), " (", ::decotron::rank_and_host(), ")"), __FILE__, __LINE__); \
  } while (0)
#define MPI_CHECK(call)                                                                               \
  do {                                                                                                \
    int rc_ = (call);                                                                                 \
    if (rc_ != 0) ::decotron::device_call_failed("MPI", #call, ::decotron::cat("error code ", rc_, " (", ::decotron::rank_and_host(), ")"), __FILE__, __LINE__); \
  } while (0)
