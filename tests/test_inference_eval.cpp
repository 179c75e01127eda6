// Eval, sampling, generation and the inference CLI: perplexity over a Megatron dataset equals
// the trainer's mean cross-entropy on the same samples; the text procedure scores exactly the
// documented tokens; sampling is deterministic by seed and greedy is argmax.
#include <fstream>
#include <set>

#include "data/loader.h"
#include "inference/eval.h"
#include "inference/generate.h"
#include "inference/runtime.h"
#include "inference/sampler.h"
#include "inference_test_util.h"

using namespace decotron;
using namespace decotron::inference;
using namespace decotron::inference::testing;
using decotron::data::testing::expect_error;
using decotron::data::testing::run_command;
using decotron::data::testing::scratch_dir;

namespace {


// 30 documents of 5..44 random ids below the tokenizer's 360.
std::string write_random_dataset(const std::string& dir) {
  std::vector<std::vector<int32_t>> docs;
  uint32_t s = 99;
  for (int d = 0; d < 30; ++d) {
    s = s * 1103515245u + 12345u;
    docs.push_back(some_tokens(5 + (s >> 16) % 40, 360, s));
  }
  data::testing::write_dataset(dir + "/corpus", docs);
  return dir + "/corpus";
}

}  // namespace

TEST(InferenceEval, DatasetPerplexityEqualsTrainerLoss) {
  for (const char* arch : {"dense", "deco"}) {
    Config c = tiny_infer_config(arch);
    auto m = random_model(c);
    const std::string dir = scratch_dir(cat("infer_eval_ds_", arch));
    Model rt(export_to(*m, c, cat("eval_ds_", arch), FileDType::f32));
    DatasetEvalOptions o;
    o.prefixes = {write_random_dataset(dir)};
    o.split = "valid";
    o.split_string = "60,40,0";
    o.samples = 5;
    o.total_samples = 8;
    o.cache_dir = dir + "/cache";
    EvalResult r = eval_dataset(rt, o);
    EXPECT_EQ(r.windows, 5);
    EXPECT_EQ(r.tokens, 5 * c.model.seq_len);

    // The trainer's side: the same loader options, Transformer::forward over the same samples.
    data::DataOptions d;
    d.prefixes = o.prefixes;
    d.split = o.split_string;
    d.seq_len = c.model.seq_len;
    d.cache_dir = o.cache_dir;
    data::BatchLoader loader(d, data::Split::valid, 5, 8);
    std::vector<int32_t> batch = loader.next();
    const int64_t B = 5, S = c.model.seq_len;
    Tensor tok = Tensor::empty({B * S}, DType::i32), tgt = Tensor::empty({B * S}, DType::i32);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < S; ++i) {
        tok.data<int32_t>()[b * S + i] = batch[b * (S + 1) + i];
        tgt.data<int32_t>()[b * S + i] = batch[b * (S + 1) + i + 1];
      }
    ForwardResult f = m->forward(tok, tgt, {B, S}, {}, 1.0, false);
    const double trainer_loss = f.lm_loss_sum / f.tokens;
    EXPECT_NEAR(r.mean_nll(), trainer_loss, 1e-5 * trainer_loss) << arch;
    EXPECT_NEAR(r.perplexity(), std::exp(trainer_loss), 1e-4 * std::exp(trainer_loss)) << arch;
  }
}

TEST(InferenceEval, TextWindowsScoreTheDocumentedTokens) {
  Config c = tiny_infer_config("deco");
  auto m = random_model(c);
  Model rt(export_to(*m, c, "eval_text", FileDType::f32));
  const int64_t W = c.model.seq_len;
  auto ids = some_tokens(3 * W + 5, 360, 77);  // three full windows and a dropped partial one
  for (bool half : {true, false}) {
    EvalResult r = eval_tokens(rt, ids, {0, half});
    const int64_t first = half ? W / 2 : 0;
    EXPECT_EQ(r.windows, 3);
    EXPECT_EQ(r.tokens, 3 * (W - 1 - first));
    // Reference: trainer logits per window, -log softmax of positions [first, W-1) at the next token.
    double sum = 0;
    for (int64_t k = 0; k < 3; ++k) {
      std::vector<int32_t> w(ids.begin() + k * W, ids.begin() + (k + 1) * W);
      Tensor l = trainer_logits(*m, w);
      const int64_t V = l.dim(1);
      for (int64_t j = first; j < W - 1; ++j) {
        const float* z = l.data<float>() + j * V;
        double mx = *std::max_element(z, z + V), se = 0;
        for (int64_t v = 0; v < V; ++v) se += std::exp(z[v] - mx);
        sum += mx + std::log(se) - z[w[j + 1]];
      }
    }
    EXPECT_NEAR(r.nll_sum, sum, 1e-5 * sum);
  }
  expect_error([&] { eval_tokens(rt, some_tokens(W - 1, 360), {}); }, {"fewer than one window of 16"});
}

TEST(InferenceSampling, GreedyIsArgmaxAndSeedsAreDeterministic) {
  std::vector<float> logits(50);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = static_cast<float>(std::sin(1.7 * i));
  const int32_t best = argmax(logits.data(), 50);
  Sampler greedy({0.0, 0, 1.0, 1});
  EXPECT_EQ(greedy.sample(logits.data(), 50), best);
  Sampler top1({1.0, 1, 1.0, 5});
  EXPECT_EQ(top1.sample(logits.data(), 50), best);
  Sampler nucleus({1.0, 0, 1e-6, 5});
  EXPECT_EQ(nucleus.sample(logits.data(), 50), best);
  auto draw = [&](SamplingOptions o) {
    Sampler s(o);
    std::vector<int32_t> out;
    for (int i = 0; i < 200; ++i) out.push_back(s.sample(logits.data(), 50));
    return out;
  };
  EXPECT_EQ(draw({1.0, 0, 1.0, 42}), draw({1.0, 0, 1.0, 42}));
  EXPECT_NE(draw({1.0, 0, 1.0, 42}), draw({1.0, 0, 1.0, 43}));
  // top-k keeps only the k best; top-p keeps the smallest prefix reaching p.
  std::vector<int32_t> idx(50);
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  for (int32_t t : draw({2.0, 3, 1.0, 7})) EXPECT_TRUE(t == idx[0] || t == idx[1] || t == idx[2]);
  std::set<int32_t> seen;
  for (int32_t t : draw({1.0, 0, 1.0, 8})) seen.insert(t);
  EXPECT_GT(seen.size(), 5u);
  expect_error([] { Sampler s({1.0, 0, 0.0, 0}); }, {"--top-p"});
}

TEST(InferenceGenerate, GreedyFollowsTrainerArgmaxAndStops) {
  Config c = tiny_infer_config("deco");
  auto m = random_model(c);
  Model rt(export_to(*m, c, "generate", FileDType::f32));
  std::vector<int32_t> prompt = prompt_ids(rt, "the kernel maps");
  GenerateOptions o;
  o.max_tokens = 6;
  o.sampling.temperature = 0;
  o.stop_at_eod = false;
  std::string streamed;
  GenerateResult r = generate(rt, prompt, o, [&](const std::string& s) { streamed += s; });
  ASSERT_EQ(r.tokens.size(), 6u);
  EXPECT_EQ(r.stop, GenerateResult::Stop::max_tokens);
  // Each generated token is the argmax of the trainer's logits on everything before it.
  std::vector<int32_t> seq = prompt;
  for (int32_t t : r.tokens) {
    Tensor l = trainer_logits(*m, seq);
    EXPECT_EQ(t, argmax(l.data<float>() + (seq.size() - 1) * l.dim(1), rt.info().tokenizer_vocab));
    seq.push_back(t);
  }
  // The streamed text is the decoded continuation.
  const std::string full = rt.tokenizer().decode(seq), head = rt.tokenizer().decode(prompt);
  EXPECT_EQ(streamed, full.substr(head.size()));
  // Sampling with a seed is reproducible; generation stops at the end of the context.
  o.sampling = {0.9, 20, 0.95, 123};
  o.max_tokens = 100;
  GenerateResult a = generate(rt, prompt, o, [](const std::string&) {});
  GenerateResult b = generate(rt, prompt, o, [](const std::string&) {});
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.stop, GenerateResult::Stop::context);
  // The context holds seq_len positions; the last token is sampled from the last position's
  // logits and never fed back, so prompt + generated = seq_len + 1.
  EXPECT_EQ(static_cast<int64_t>(prompt.size() + a.tokens.size()), c.model.seq_len + 1);
  expect_error([&] { prompt_ids(rt, std::string(200, 'x') + " the kernel memory driver page table lock"); },
               {"the prompt is", "context is 16 tokens"});
}

TEST(InferenceCli, GenerateEvalBench) {
  Config c = tiny_infer_config("deco");
  auto m = random_model(c);
  const std::string dir = export_to(*m, c, "cli", FileDType::bf16);
  const std::string bin = DECOTRON_BINARY;
  auto [rc, out] = run_command(bin + " generate --model " + dir + " --prompt 'the kernel' --max-tokens 4 --temperature 0 --stats");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("the kernel"), std::string::npos) << out;
  std::tie(rc, out) = run_command(bin + " generate --model " + dir + " --prompt '" + std::string(100, 'q') + " the memory driver page'");
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("the prompt is"), std::string::npos) << out;
  const std::string txt = scratch_dir("infer_cli_text") + "/t.txt";
  std::ofstream(txt) << "the kernel maps a page table. the scheduler reads the queue. the driver writes the buffer.";
  std::tie(rc, out) = run_command(bin + " eval --model " + dir + " --text " + txt + " --ctx 8 --score all");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("perplexity"), std::string::npos) << out;
  const std::string ds = scratch_dir("infer_cli_ds");
  const std::string prefix = write_random_dataset(ds);
  std::tie(rc, out) = run_command(bin + " eval --model " + dir + " --data " + prefix + " --split-string 60,40,0 --samples 2 --cache-dir " + ds + "/cache");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("2 samples, 32 tokens"), std::string::npos) << out;
  std::tie(rc, out) = run_command(bin + " bench decode --model " + dir + " --tokens 8");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("ms/token"), std::string::npos) << out;
  EXPECT_NE(out.find("activation ratio"), std::string::npos) << out;
  std::tie(rc, out) = run_command(bin + " generate --model " + ds);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("config.json"), std::string::npos) << out;
}
