// Causal grouped-query attention through cuDNN's fused SDPA (the cudnn-frontend graph API,
// header-only; cuDNN 9): the fastest attention on Hopper (performance-targets.md: 1.7x
// FlashAttention-2 forward at sequence 4096). Same layouts and contract as
// ops::attention_forward/backward; the backward is built with cuDNN's deterministic algorithm
// (the project's rule: the same bits on every run). attention.cu tries it first for bf16 and
// falls back to the flash kernels when cuDNN cannot build a plan for the shape or the device
// (one warning). Compiled only where cuDNN and the frontend headers were found
// (DECOTRON_WITH_CUDNN, CMakeLists.txt).
#pragma once
#ifdef DECOTRON_WITH_CUDA
#include "core/tensor.h"
#include "kernels/ops.h"

namespace decotron::cuda {

// Whether this build has the cuDNN path at all.
bool cudnn_attention_built();
// Runs the op through cuDNN and returns true, or returns false (nothing written) when cuDNN has
// no plan for these tensors (dtype other than bf16, a head size or device it does not support,
// misaligned pointers); the first failure of each kind prints why.
bool cudnn_attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const ops::AttnShape& s);
bool cudnn_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& out, const Tensor& lse, const ops::AttnShape& s);

}  // namespace decotron::cuda
#endif
