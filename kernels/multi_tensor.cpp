#include "kernels/multi_tensor.h"

#include "core/error.h"
#include "kernels/op_profile.h"
#ifdef DECOTRON_WITH_CUDA
#include "kernels/cuda/multi_tensor.h"
#endif

namespace decotron::ops {

namespace {

// Every tensor of a list on one device: the device, or cpu for an empty list.
Device list_device(const std::vector<const Tensor*>& ts, const char* what) {
  if (ts.empty()) return Device::cpu;
  const Device dev = ts.front()->device();
  for (const Tensor* t : ts)
    DT_ASSERT(t->device() == dev, what, ": tensors on different devices in one list");
#ifndef DECOTRON_WITH_CUDA
  DT_ASSERT(dev == Device::cpu, what, ": CUDA tensors in a build without CUDA");
#endif
  return dev;
}

}  // namespace

#ifdef DECOTRON_WITH_CUDA
struct MultiTensorAdamW::DeviceLaunch {
  cuda::MultiTensorAdamWLaunch launch;
};
struct MultiTensorSquares::DeviceLaunch {
  cuda::MultiTensorSquaresLaunch launch;
};
#else
struct MultiTensorAdamW::DeviceLaunch {};
struct MultiTensorSquares::DeviceLaunch {};
#endif

MultiTensorAdamW::MultiTensorAdamW(std::vector<AdamWTensor> tensors) : tensors_(std::move(tensors)) {
  std::vector<const Tensor*> all;
  for (const AdamWTensor& t : tensors_) all.insert(all.end(), {&t.param, &t.m, &t.v, &t.grad});
  if (list_device(all, "multi-tensor AdamW") == decotron::Device::cpu) return;
#ifdef DECOTRON_WITH_CUDA
  device_ = std::make_unique<DeviceLaunch>(DeviceLaunch{cuda::MultiTensorAdamWLaunch(tensors_)});
#endif
}

MultiTensorAdamW::~MultiTensorAdamW() = default;

void MultiTensorAdamW::update(const AdamWStep& s, double grad_scale) {
#ifdef DECOTRON_WITH_CUDA
  if (device_) {
    OpTimer timer("adamw_update (multi-tensor)", decotron::Device::cuda);
    device_->launch.run(s, grad_scale);
    return;
  }
#endif
  for (AdamWTensor& t : tensors_) {
    AdamWStep st = s;
    if (!t.decay) st.weight_decay = 0.0;
    adamw_update(t.param, t.m, t.v, t.grad, st, grad_scale);
  }
}

MultiTensorSquares::MultiTensorSquares(std::vector<Tensor> tensors) : tensors_(std::move(tensors)) {
  std::vector<const Tensor*> all;
  for (const Tensor& t : tensors_) all.push_back(&t);
  if (list_device(all, "multi-tensor sum of squares") == decotron::Device::cpu) return;
#ifdef DECOTRON_WITH_CUDA
  device_ = std::make_unique<DeviceLaunch>(DeviceLaunch{cuda::MultiTensorSquaresLaunch(tensors_)});
#endif
}

MultiTensorSquares::~MultiTensorSquares() = default;

std::vector<double> MultiTensorSquares::compute() const {
#ifdef DECOTRON_WITH_CUDA
  if (device_) {
    OpTimer timer("sum_squares (multi-tensor)", decotron::Device::cuda);
    return device_->launch.run();
  }
#endif
  std::vector<double> out;
  out.reserve(tensors_.size());
  for (const Tensor& t : tensors_) out.push_back(sum_squares(t));
  return out;
}

}  // namespace decotron::ops
