#include "cli/bench_ceilings.h"

#include <chrono>
#include <functional>

#include "core/tensor.h"
#include "kernels/op_profile.h"
#include "kernels/ops.h"

namespace decotron::cli {

namespace {

// Seconds per call of f: one untimed call, then `reps` between two synchronizations.
double per_call(const std::function<void()>& f, Device dev, int reps) {
  f();
  ops::synchronize(dev);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  ops::synchronize(dev);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

}  // namespace

double measure_gemm_tflops(Device dev) {
  const int64_t n = dev == Device::cuda ? 8192 : 1024;
  const DType dt = dev == Device::cuda ? DType::bf16 : DType::f32;
  Tensor a = Tensor::zeros({n, n}, dt, dev), b = Tensor::zeros({n, n}, dt, dev),
         c = Tensor::zeros({n, n}, DType::f32, dev);
  const double t = per_call([&] { ops::linear_forward(c, a, b); }, dev, dev == Device::cuda ? 20 : 3);
  return 2.0 * n * n * n / t / 1e12;
}

double measure_copy_gbs(Device dev) {
  const int64_t n = (dev == Device::cuda ? 512 : 128) << 20;  // bytes
  Tensor a = Tensor::zeros({n / 4}, DType::f32, dev), b = Tensor::zeros({n / 4}, DType::f32, dev);
  const double t = per_call([&] { b.copy_from(a); }, dev, dev == Device::cuda ? 20 : 3);
  return 2.0 * n / t / 1e9;
}

}  // namespace decotron::cli
