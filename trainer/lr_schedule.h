// Learning-rate schedules: linear warmup, then WSD (warmup-stable-decay with Megatron's
// "exponential" decay), cosine, or constant.
#pragma once
#include <cstdint>

#include "core/config.h"

namespace decotron {

// Learning rate for 0-based iteration `it`.
double learning_rate(const TrainConfig& t, int64_t it);

}  // namespace decotron
