#include "inference/bench.h"

#include <chrono>
#include <vector>

#include "core/error.h"
#include "inference/sampler.h"

namespace decotron::inference {

DecodeBench bench_decode(Model& model, int64_t tokens, int64_t prompt_tokens, int64_t warmup) {
  if (tokens <= 0) fail("--tokens must be positive");
  if (prompt_tokens < 1) prompt_tokens = 1;
  if (prompt_tokens + warmup + tokens > model.context_length())
    fail("bench: ", prompt_tokens, " prompt + ", warmup, " warmup + ", tokens, " timed tokens exceed the context of ",
         model.context_length(), "; pass a smaller --tokens");
  const data::Tokenizer& tok = model.tokenizer();
  const int32_t start = tok.bos_id() >= 0 ? tok.bos_id() : tok.eod_id();
  std::vector<int32_t> prompt(prompt_tokens, start);
  model.reset();
  Tensor logits = model.forward(prompt, false);
  const int64_t V = model.config().vocab_size;
  int32_t next = argmax(logits.data<float>(), V);
  for (int64_t i = 0; i < warmup; ++i) {
    logits = model.forward(std::span<const int32_t>(&next, 1), false);
    next = argmax(logits.data<float>(), V);
  }
  model.reset_counters();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < tokens; ++i) {
    logits = model.forward(std::span<const int32_t>(&next, 1), false);
    next = argmax(logits.data<float>(), V);
  }
  DecodeBench b;
  b.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  b.tokens = tokens;
  const RuntimeCounters& c = model.counters();
  b.activation_ratio = c.activation_ratio();
  b.weight_bytes_f32 = c.weight_bytes_f32 / tokens;
  b.weight_bytes_export = c.weight_bytes_export / tokens;
  b.kv_bytes = c.kv_bytes / tokens;
  b.total_weight_bytes_f32 = static_cast<double>(model.weight_bytes_loaded());
  model.reset();
  return b;
}

}  // namespace decotron::inference
