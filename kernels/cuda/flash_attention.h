// Flash attention on the GPU (kernels/cuda/flash_attention.cu): causal grouped-query attention
// in bf16 with tensor cores (WMMA), forward and deterministic backward, same layouts and
// contract as ops::attention_forward/backward. attention.cu dispatches here when
// flash_attention_supported() and falls back to its reference kernels otherwise
// (DECOTRON_ATTENTION=reference forces the reference). CUDA builds only.
#pragma once
#ifdef DECOTRON_WITH_CUDA
#include "core/tensor.h"
#include "kernels/ops.h"

namespace decotron::cuda {

// bf16 q (the other tensors are checked to match when the kernels run), head_dim 64 or 128,
// and the device's opt-in shared memory holds the kernels' tiles (about 153 KiB at D = 128).
bool flash_attention_supported(const Tensor& q, const ops::AttnShape& s);

// The shapes are checked by the caller (attention.cu); these check dtypes and support.
void flash_attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const ops::AttnShape& s);
void flash_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& out, const Tensor& lse, const ops::AttnShape& s);

// Which kernels the latest cuda::attention_forward/backward call ran (for tests and benchmarks).
enum class AttentionPath { none, reference, flash, cudnn };
AttentionPath last_attention_path();
// Tests and benchmarks pick the path over DECOTRON_ATTENTION: flash = skip cuDNN, reference =
// the reference kernels only, cudnn = every path in order (the default); none = back to the
// environment's choice.
void set_attention_override(AttentionPath p);

}  // namespace decotron::cuda
#endif
