#include "trainer/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace decotron {

double learning_rate(const TrainConfig& t, int64_t it) {
  if (it < t.warmup_iters) return t.lr * static_cast<double>(it + 1) / t.warmup_iters;
  if (t.lr_schedule == "constant") return t.lr;
  if (t.lr_schedule == "cosine") {
    double span = std::max<int64_t>(1, t.iters - t.warmup_iters);
    double progress = std::min(1.0, (it - t.warmup_iters) / span);
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + std::cos(M_PI * progress));
  }
  // WSD: stable at lr, then over the last decay_iters steps Megatron's exponential anneal
  // coef = 2 * 0.5^ratio - 1 (1 at the start of the decay, exactly 0 at its end).
  int64_t decay_start = t.iters - t.decay_iters;
  if (it < decay_start || t.decay_iters == 0) return t.lr;
  double ratio = std::min(1.0, static_cast<double>(it - decay_start + 1) / t.decay_iters);
  double coef = 2.0 * std::pow(0.5, ratio) - 1.0;
  return t.min_lr + coef * (t.lr - t.min_lr);
}

}  // namespace decotron
