#include "core/config.h"
#include "core/error.h"
#include "trainer/training_data.h"

namespace decotron {

std::unique_ptr<TrainingData> make_training_data(const Config& cfg, int64_t consumed_samples) {
  fail(cfg.where("data.prefixes"), ": reading Megatron datasets is not built yet; use --synthetic-data");
}

}  // namespace decotron
