// Philox random fills on the GPU, the same numbers as core/rng.h on the CPU (bit for bit):
// element i of t gets std * rng::normal(seed, stream, first_index + i) (+ mean when mean != 0),
// each operation rounded on its own (no fused multiply-add), so a parameter initialized on the
// GPU equals one initialized on the CPU with the same float expression. fp32 and bf16 tensors
// (bf16: the fp32 value rounded to nearest even). CUDA builds only.
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
