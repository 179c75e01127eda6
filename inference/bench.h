// Decode benchmark: batch 1, one token per step through the KV cache, greedy.
#pragma once
#include <cstdint>

#include "inference/runtime.h"

namespace decotron::inference {

struct DecodeBench {
  int64_t tokens = 0;            // decode steps timed
  double seconds = 0;            // their wall time
  double ms_per_token() const { return tokens ? 1e3 * seconds / tokens : 0; }
  double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0; }
  double activation_ratio = 0;   // active (token, expert) pairs / all, over the DECO layers
  double weight_bytes_f32 = 0;   // per token, as this runtime reads them (fp32)
  double weight_bytes_export = 0;  // per token, counted in the export's dtype
  double kv_bytes = 0;           // per token, key/value cache reads
  double total_weight_bytes_f32 = 0;  // all weights held (fp32)
};

// Prefills `prompt_tokens` ids (the tokenizer's BOS or EOD repeated), runs `warmup` untimed
// decode steps, then times `tokens` steps, each fed the previous step's argmax. The steps must
// fit the context (error otherwise).
DecodeBench bench_decode(Model& model, int64_t tokens, int64_t prompt_tokens = 1, int64_t warmup = 4);

}  // namespace decotron::inference
