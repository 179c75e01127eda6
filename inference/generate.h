// Text generation with the CPU runtime: prefill the prompt, then decode token by token,
// streaming the text as it grows, until EOD, max_tokens or the end of the context.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "inference/runtime.h"
#include "inference/sampler.h"

namespace decotron::inference {

struct GenerateOptions {
  int64_t max_tokens = 128;  // new tokens at most
  SamplingOptions sampling;
  bool stop_at_eod = true;   // stop when the model emits the tokenizer's EOD id (not printed)
};

struct GenerateResult {
  std::vector<int32_t> prompt, tokens;  // prompt ids and generated ids (without the final EOD)
  enum class Stop : uint8_t { eod, max_tokens, context } stop = Stop::max_tokens;
  double prefill_seconds = 0, decode_seconds = 0;
};

// The prompt's ids: encode(text); an empty text starts from BOS (or EOD if the tokenizer has
// no BOS). Error if it does not fit the model's context with room for one new token.
std::vector<int32_t> prompt_ids(const Model& model, const std::string& text);

// on_text receives each new piece of text as soon as it is complete UTF-8.
GenerateResult generate(Model& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                        const std::function<void(const std::string&)>& on_text);

}  // namespace decotron::inference
