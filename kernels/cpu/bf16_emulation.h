// bf16 on the CPU, emulated: the CPU kernels compute in fp32 (and fp64 for gradient checks),
// so the op dispatch (kernels/ops.cpp) widens every bf16 tensor of a call to an fp32 copy,
// runs the fp32 kernel, and rounds the outputs (non-const tensors) back into their bf16
// storage. The results are what a bf16 GPU kernel with fp32 arithmetic gives, up to the order
// of the sums: bf16 storage, fp32 math. It exists so that the bf16 training path (mixed
// precision: bf16 activations and weight copies, fp32 master weights and gradients) runs and
// is tested on any machine; it is slower than fp32 on the CPU, never a way to save time.
#pragma once
#include <deque>
#include <initializer_list>
#include <utility>

#include "core/tensor.h"

namespace decotron::cpu {

class Bf16AsFp32 {
 public:
  static bool any(std::initializer_list<const Tensor*> ts) {
    for (const Tensor* t : ts)
      if (t && t->defined() && t->dtype() == DType::bf16) return true;
    return false;
  }
  // An input: its fp32 copy if bf16, else itself.
  const Tensor& in(const Tensor& t) {
    if (!t.defined() || t.dtype() != DType::bf16) return t;
    return keep_.emplace_back(cast_cpu(t, DType::f32));
  }
  const Tensor* in(const Tensor* t) { return t ? &in(*t) : nullptr; }
  // An output (overwritten or accumulated into): its fp32 copy, rounded back by finish().
  Tensor& out(Tensor& t) {
    if (!t.defined() || t.dtype() != DType::bf16) return t;
    Tensor& wide = keep_.emplace_back(cast_cpu(t, DType::f32));
    outs_.emplace_back(&t, &wide);
    return wide;
  }
  Tensor* out(Tensor* t) { return t ? &out(*t) : nullptr; }
  // Rounds every output back into its bf16 tensor (nearest even, as __float2bfloat16_rn).
  void finish() {
    for (auto& [narrow, wide] : outs_) {
      const float* src = wide->data<float>();
      bf16* dst = narrow->data<bf16>();
      for (int64_t i = 0, n = narrow->numel(); i < n; ++i) dst[i] = bf16(src[i]);
    }
    outs_.clear();
  }

 private:
  std::deque<Tensor> keep_;  // deque: references stay valid as it grows
  std::deque<std::pair<Tensor*, Tensor*>> outs_;
};

}  // namespace decotron::cpu
