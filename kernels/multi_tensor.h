// The optimizer's ops over a fixed list of tensors in a constant number of launches
// (Apex's multi_tensor_apply, as Megatron's FusedAdam and the grad-norm use it). A model has
// a few hundred parameter tensors; one AdamW launch and one synchronizing norm reduction per
// tensor cost a launch each and a host round trip each, every step. Here the list is fixed at
// construction (the optimizer's segments never move: views into the parameters, the gradient
// buffers and the moments), its table is uploaded to the device once, and a step is one
// launch (AdamW) or two launches and one small copy to the host (the squares).
//
// Every tensor of a list is on the same device. CPU: the single-tensor ops of kernels/ops.h in
// a loop (the reference; any float dtype). CUDA: one kernel over fixed chunks of every tensor,
// fp32, with the same per-element arithmetic as ops::adamw_update (so the results equal the
// per-tensor launches bit for bit) and deterministic sums (fixed chunks, fixed order).
#pragma once
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "kernels/ops.h"

namespace decotron::ops {

// One tensor of an AdamW step: equal-length views of the parameter (updated in place), its
// moments (in place) and its gradient; decay: whether the step's weight decay applies.
struct AdamWTensor {
  Tensor param, m, v, grad;
  bool decay = true;
};

class MultiTensorAdamW {
 public:
  explicit MultiTensorAdamW(std::vector<AdamWTensor> tensors);
  ~MultiTensorAdamW();
  // ops::adamw_update on every tensor (s.weight_decay where decay, 0 elsewhere), gradients
  // scaled by grad_scale first.
  void update(const AdamWStep& s, double grad_scale);
  size_t size() const { return tensors_.size(); }

 private:
  std::vector<AdamWTensor> tensors_;
  struct DeviceLaunch;  // the uploaded tables (CUDA)
  std::unique_ptr<DeviceLaunch> device_;
};

class MultiTensorSquares {
 public:
  explicit MultiTensorSquares(std::vector<Tensor> tensors);
  ~MultiTensorSquares();
  // Per tensor, the sum of squares of its entries in double (ops::sum_squares of each; on CUDA
  // summed in another fixed order, so equal to it up to rounding). One copy to the host.
  std::vector<double> compute() const;
  size_t size() const { return tensors_.size(); }

 private:
  std::vector<Tensor> tensors_;
  struct DeviceLaunch;
  std::unique_ptr<DeviceLaunch> device_;
};

}  // namespace decotron::ops
