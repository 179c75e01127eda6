// Float64 finite-difference gradient checking shared by the gradient tests.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "core/rng.h"
#include "core/tensor.h"

namespace decotron::testing {

inline Tensor randn64(const Shape& shape, uint64_t stream, double scale = 1.0, uint64_t seed = 7) {
  Tensor t = Tensor::empty(shape, DType::f64);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = scale * rng::normal(seed, stream, i);
  return t;
}

inline double dot64(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.data<double>()[i] * b.data<double>()[i];
  return s;
}

// Compares `analytic` (d loss / d x) with central differences of `loss` around x, entry by entry
// (every entry, or `max_entries` spread over the tensor). Fails with the worst entry.
inline void expect_gradient(const std::string& what, Tensor& x, const Tensor& analytic,
                            const std::function<double()>& loss, double rtol = 1e-6, int64_t max_entries = 400,
                            double h = 1e-6) {
  ASSERT_EQ(x.numel(), analytic.numel()) << what;
  const int64_t n = x.numel();
  const int64_t stride = std::max<int64_t>(1, n / max_entries);
  double gmax = 0;
  for (int64_t i = 0; i < n; ++i) gmax = std::max(gmax, std::abs(analytic.data<double>()[i]));
  double* p = x.data<double>();
  for (int64_t i = 0; i < n; i += stride) {
    double keep = p[i];
    p[i] = keep + h;
    double lp = loss();
    p[i] = keep - h;
    double lm = loss();
    p[i] = keep;
    double numeric = (lp - lm) / (2 * h);
    double a = analytic.data<double>()[i];
    // Relative to the entry, with a floor relative to the tensor's largest gradient entry.
    // The absolute floor covers round-off: about 1e-16 * |loss| / h.
    double tol = rtol * std::max(std::abs(numeric), 1e-3 * gmax) + 2e-9;
    ASSERT_NEAR(a, numeric, tol) << what << " entry " << i << " of " << n;
  }
}

}  // namespace decotron::testing
