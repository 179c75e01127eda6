#include "inference/generate.h"

#include <chrono>

#include "core/error.h"

namespace decotron::inference {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
bool ends_in_replacement_char(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}
}  // namespace

std::vector<int32_t> prompt_ids(const Model& model, const std::string& text) {
  const data::Tokenizer& tok = model.tokenizer();
  std::vector<int32_t> ids = tok.encode(text);
  if (ids.empty()) ids.push_back(tok.bos_id() >= 0 ? tok.bos_id() : tok.eod_id());
  if (static_cast<int64_t>(ids.size()) >= model.context_length())
    fail("the prompt is ", ids.size(), " tokens but the model's context is ", model.context_length(),
         " tokens (room is needed for at least one new token); shorten the prompt");
  return ids;
}

GenerateResult generate(Model& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                        const std::function<void(const std::string&)>& on_text) {
  const data::Tokenizer& tok = model.tokenizer();
  GenerateResult res;
  res.prompt = prompt;
  Sampler sampler(opt.sampling);
  model.reset();
  auto t0 = std::chrono::steady_clock::now();
  Tensor logits = model.forward(prompt, false);
  res.prefill_seconds = seconds_since(t0);
  // Streaming: decode prompt + generated ids and print what follows the prompt's text (so
  // SentencePiece's leading-space rule and multi-token characters come out right).
  const std::string prompt_text = tok.decode(prompt);
  std::string shown;  // generated text printed so far
  std::vector<int32_t> all = prompt;
  t0 = std::chrono::steady_clock::now();
  const int64_t n_sample = model.info().tokenizer_vocab;  // ids past the tokenizer cannot be printed
  while (true) {
    if (static_cast<int64_t>(res.tokens.size()) >= opt.max_tokens) {
      res.stop = GenerateResult::Stop::max_tokens;
      break;
    }
    const int32_t next = sampler.sample(logits.data<float>(), n_sample);
    if (opt.stop_at_eod && next == tok.eod_id()) {
      res.stop = GenerateResult::Stop::eod;
      break;
    }
    res.tokens.push_back(next);
    all.push_back(next);
    const std::string text = tok.decode(all);
    if (text.compare(0, prompt_text.size(), prompt_text) == 0 && !ends_in_replacement_char(text)) {
      const std::string gen = text.substr(prompt_text.size());
      if (gen.size() > shown.size() && gen.compare(0, shown.size(), shown) == 0) {
        on_text(gen.substr(shown.size()));
        shown = gen;
      }
    }
    if (model.position() >= model.context_length()) {
      res.stop = GenerateResult::Stop::context;
      break;
    }
    logits = model.forward(std::span<const int32_t>(&next, 1), false);
  }
  res.decode_seconds = seconds_since(t0);
  // Whatever is still held back (an incomplete character at the very end).
  const std::string text = tok.decode(all);
  if (text.compare(0, prompt_text.size(), prompt_text) == 0) {
    const std::string gen = text.substr(prompt_text.size());
    if (gen.size() > shown.size() && gen.compare(0, shown.size(), shown) == 0) on_text(gen.substr(shown.size()));
  }
  return res;
}

}  // namespace decotron::inference
