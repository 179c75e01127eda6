// Philox random fills on the GPU, the same numbers as core/rng.h on the CPU (bit for bit):
// element i of t gets mean + std * rng::normal(seed, stream, first_index + i), rounded once
// per operation (no fused multiply-add), so a parameter initialized on the GPU equals one
// initialized on the CPU. fp32 and bf16 tensors. CUDA builds only.
#pragma once
#ifdef DECOTRON_WITH_CUDA
#include <cstdint>

#include "core/tensor.h"

namespace decotron::cuda {
void fill_normal(Tensor& t, uint64_t seed, uint64_t stream, float mean = 0.0f, float std = 1.0f,
                 uint64_t first_index = 0);
void fill_uniform(Tensor& t, uint64_t seed, uint64_t stream, uint64_t first_index = 0);  // rng::uniform, (0, 1]
}  // namespace decotron::cuda
#endif
