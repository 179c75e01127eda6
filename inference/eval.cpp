#include "inference/eval.h"

#include <algorithm>

#include "core/error.h"
#include "data/loader.h"
#include "kernels/ops.h"

namespace decotron::inference {

namespace {
// Sum of the cross-entropy of logits [n, V] against targets, with the trainer's kernel.
double nll(Tensor& logits, const int32_t* targets, int64_t n) {
  Tensor t = Tensor::empty({n}, DType::i32);
  std::copy_n(targets, n, t.data<int32_t>());
  return ops::cross_entropy(logits, t, 0.0);
}
}  // namespace

EvalResult eval_dataset(Model& model, const DatasetEvalOptions& opt) {
  const int64_t S = opt.seq_len > 0 ? opt.seq_len : model.context_length();
  if (S > model.context_length())
    fail("--seq-len ", S, " is longer than the model's context of ", model.context_length(), " tokens");
  if (opt.samples <= 0) fail("--samples must be positive (the number of samples to evaluate)");
  data::DataOptions d;
  d.prefixes = opt.prefixes;
  d.weights = opt.weights;
  d.split = opt.split_string;
  d.seq_len = S;
  d.seed = opt.seed;
  d.cache_dir = opt.cache_dir;
  d.vocab_size = model.config().vocab_size;
  const int64_t total = opt.total_samples > 0 ? opt.total_samples : opt.samples;
  if (total < opt.samples) fail("--total-samples ", total, " is smaller than --samples ", opt.samples);
  data::BatchLoader loader(d, data::parse_split_name(opt.split), /*micro_batch=*/1, total);
  EvalResult r;
  for (int64_t i = 0; i < opt.samples; ++i) {
    std::vector<int32_t> row = loader.next();  // seq_len + 1 ids
    model.reset();
    Tensor logits = model.forward(std::span<const int32_t>(row.data(), S), true);
    r.nll_sum += nll(logits, row.data() + 1, S);
    r.tokens += S;
    r.windows += 1;
  }
  model.reset();
  return r;
}

EvalResult eval_tokens(Model& model, const std::vector<int32_t>& ids, const TextEvalOptions& opt) {
  const int64_t W = opt.window > 0 ? opt.window : model.context_length();
  if (W > model.context_length()) fail("--ctx ", W, " is longer than the model's context of ", model.context_length());
  if (W < 2) fail("--ctx ", W, ": a window needs at least 2 tokens");
  const int64_t n = static_cast<int64_t>(ids.size()), windows = n / W;
  if (windows == 0)
    fail("the text has ", n, " tokens, fewer than one window of ", W, "; pass a smaller --ctx or a longer text");
  const int64_t first = opt.score_second_half ? W / 2 : 0;
  EvalResult r;
  for (int64_t k = 0; k < windows; ++k) {
    const int32_t* w = ids.data() + k * W;
    model.reset();
    Tensor logits = model.forward(std::span<const int32_t>(w, W), true);
    Tensor scored = logits.rows(first, W - 1 - first);
    r.nll_sum += nll(scored, w + first + 1, W - 1 - first);
    r.tokens += W - 1 - first;
    r.windows += 1;
  }
  model.reset();
  return r;
}

}  // namespace decotron::inference
