// Helpers for the CPU kernels: dtype dispatch (fp32, fp64) and shape checks.
#pragma once
#include <cmath>

#include "core/tensor.h"

#define DT_CPU_FLOAT_DISPATCH(dtype, T, ...)                                                    \
  do {                                                                                          \
    if ((dtype) == ::decotron::DType::f32) {                                                    \
      using T = float;                                                                          \
      __VA_ARGS__;                                                                              \
    } else if ((dtype) == ::decotron::DType::f64) {                                             \
      using T = double;                                                                         \
      __VA_ARGS__;                                                                              \
    } else {                                                                                    \
      ::decotron::fail("the CPU backend computes in fp32 (or fp64 for checks), not ",           \
                       ::decotron::dtype_name(dtype), ": set train.dtype to fp32 for CPU runs"); \
    }                                                                                           \
  } while (0)

namespace decotron::cpu {
inline void expect_same(const Tensor& a, const Tensor& b, const char* what) {
  DT_ASSERT(a.shape() == b.shape(), what, ": ", shape_str(a.shape()), " vs ", shape_str(b.shape()));
  DT_ASSERT(a.dtype() == b.dtype(), what, ": dtype ", dtype_name(a.dtype()), " vs ", dtype_name(b.dtype()));
}
template <class T> inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
}  // namespace decotron::cpu
