// CLI of the inference runtime: `decotron generate`, `decotron eval`, `decotron bench decode`.
// docs/inference.md describes every flag.
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli/commands.h"
#include "core/error.h"
#include "inference/bench.h"
#include "inference/eval.h"
#include "inference/generate.h"

namespace decotron::cli {

using namespace decotron::inference;

void register_generate(CLI::App& app) {
  struct Args {
    std::string model, prompt;
    GenerateOptions gen;
    bool stats = false;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("generate", "Generate text from an export with the CPU runtime (streamed to stdout)");
  c->add_option("--model", a->model, "Export directory (model.safetensors, config.json, tokenizer.model)")->required();
  c->add_option("--prompt", a->prompt, "Prompt text (empty: start from BOS, or EOD if the tokenizer has none)");
  c->add_option("--max-tokens", a->gen.max_tokens, "New tokens at most (also stops at EOD and at the end of the context)")->capture_default_str();
  c->add_option("--temperature", a->gen.sampling.temperature, "Sampling temperature; 0 is greedy (argmax)")->capture_default_str();
  c->add_option("--top-k", a->gen.sampling.top_k, "Sample among the K most likely tokens; 0: all")->capture_default_str();
  c->add_option("--top-p", a->gen.sampling.top_p, "Nucleus sampling: smallest set of tokens with probability >= P; 1: all")->capture_default_str();
  c->add_option("--seed", a->gen.sampling.seed, "Seed of the sampler (same seed, same text)")->capture_default_str();
  c->add_flag("--stats", a->stats, "Print token counts and speed on stderr at the end");
  c->callback([a] {
    Model model(a->model);
    std::vector<int32_t> ids = prompt_ids(model, a->prompt);
    std::fputs(a->prompt.c_str(), stdout);
    std::fflush(stdout);
    GenerateResult r = generate(model, ids, a->gen, [](const std::string& s) {
      std::fputs(s.c_str(), stdout);
      std::fflush(stdout);
    });
    std::fputc('\n', stdout);
    if (a->stats) {
      const char* why = r.stop == GenerateResult::Stop::eod ? "EOD" : r.stop == GenerateResult::Stop::context ? "end of context" : "max tokens";
      std::fprintf(stderr, "prompt %zu tokens in %.3f s; generated %zu tokens in %.3f s (%.1f tokens/s); stopped at %s\n",
                   r.prompt.size(), r.prefill_seconds, r.tokens.size(), r.decode_seconds,
                   r.decode_seconds > 0 ? r.tokens.size() / r.decode_seconds : 0.0, why);
    }
  });
}

void register_eval(CLI::App& app) {
  struct Args {
    std::string model, text;
    DatasetEvalOptions ds;
    TextEvalOptions tx;
    std::string score = "half";
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("eval", "Perplexity of an export on a Megatron dataset (--data) or a text file (--text)");
  c->add_option("--model", a->model, "Export directory")->required();
  auto* data = c->add_option("--data", a->ds.prefixes, "Megatron dataset prefix(es) (PREFIX.bin/.idx; several are blended as the trainer's data.prefixes): mean cross-entropy over the split's samples, as the trainer's validation loss");
  c->add_option("--weights", a->ds.weights, "--data: blend weights, one per prefix (the trainer's data.weights)");
  auto* text = c->add_option("--text", a->text, "Text file: tokenized, scored in non-overlapping windows (llama.cpp's perplexity procedure)");
  data->excludes(text);
  c->add_option("--split", a->ds.split, "--data: which split to read: train, valid or test")->capture_default_str();
  c->add_option("--split-string", a->ds.split_string, "--data: the trainer's data.split proportions")->capture_default_str();
  c->add_option("--seq-len", a->ds.seq_len, "--data: tokens per sample (0: the model's context)")->capture_default_str();
  c->add_option("--samples", a->ds.samples, "--data: samples to evaluate, the first of the split's order")->capture_default_str();
  c->add_option("--total-samples", a->ds.total_samples, "--data: Megatron's requested size of the split (decides the order; 0: = --samples)")->capture_default_str();
  c->add_option("--seed", a->ds.seed, "--data: the trainer's train.seed")->capture_default_str();
  c->add_option("--cache-dir", a->ds.cache_dir, "--data: sample-index cache (empty: next to the data)");
  c->add_option("--ctx", a->tx.window, "--text: window length in tokens (0: the model's context)")->capture_default_str();
  c->add_option("--score", a->score, "--text: half (score predictions from the second half of each window, as llama.cpp) or all")->capture_default_str();
  c->callback([a] {
    if (a->ds.prefixes.empty() == a->text.empty()) fail("eval: pass exactly one of --data PREFIX or --text FILE");
    Model model(a->model);
    EvalResult r;
    if (!a->ds.prefixes.empty()) {
      r = eval_dataset(model, a->ds);
      std::printf("eval %s (%s split): %" PRId64 " samples, %" PRId64 " tokens: loss %.6f, perplexity %.4f\n",
                  a->ds.prefixes[0].c_str(), a->ds.split.c_str(), r.windows, r.tokens, r.mean_nll(), r.perplexity());
      return;
    }
    if (a->score != "half" && a->score != "all") fail("--score ", a->score, ": use half or all");
    a->tx.score_second_half = a->score == "half";
    std::ifstream in(a->text, std::ios::binary);
    if (!in) fail(a->text, ": cannot open");
    std::stringstream ss;
    ss << in.rdbuf();
    std::vector<int32_t> ids = model.tokenizer().encode(ss.str());
    r = eval_tokens(model, ids, a->tx);
    std::printf("eval %s: %zu tokens, %" PRId64 " windows, %" PRId64 " scored tokens: loss %.6f, perplexity %.4f\n",
                a->text.c_str(), ids.size(), r.windows, r.tokens, r.mean_nll(), r.perplexity());
  });
}

void register_bench_decode(CLI::App& bench) {
  struct Args {
    std::string model;
    int64_t tokens = 64, prompt = 1, warmup = 4;
  };
  auto a = std::make_shared<Args>();
  auto* c = bench.add_subcommand("decode", "Batch-1 decode speed of an export on the CPU runtime");
  c->add_option("--model", a->model, "Export directory")->required();
  c->add_option("--tokens", a->tokens, "Decode steps timed")->capture_default_str();
  c->add_option("--prompt-tokens", a->prompt, "Tokens prefilled before decoding")->capture_default_str();
  c->add_option("--warmup", a->warmup, "Untimed decode steps before timing")->capture_default_str();
  c->callback([a] {
    Model model(a->model);
    DecodeBench b = bench_decode(model, a->tokens, a->prompt, a->warmup);
    const ExportInfo& inf = model.info();
    std::printf("model %s: %s, %" PRId64 " layers, hidden %" PRId64 ", weights %s%s, %.1f MB as fp32 in memory\n",
                a->model.c_str(), inf.model.arch.c_str(), inf.model.layers, inf.model.hidden,
                inf.int8 ? "int8" : export_dtype_name(inf.dtype), " (runtime computes in fp32)",
                b.total_weight_bytes_f32 / 1e6);
    std::printf("decode: %" PRId64 " tokens, %.3f ms/token, %.1f tokens/s\n", b.tokens, b.ms_per_token(),
                b.tokens_per_second());
    std::printf("activation ratio: %.4f\n", b.activation_ratio);
    std::printf("weight bytes read per token: %.3f MB (fp32, as read), %.3f MB (in the export's dtype); "
                "KV cache %.3f MB\n",
                b.weight_bytes_f32 / 1e6, b.weight_bytes_export / 1e6, b.kv_bytes / 1e6);
    std::printf("effective bandwidth: %.2f GB/s (fp32 weight bytes / time)\n",
                b.seconds > 0 ? b.weight_bytes_f32 / (b.ms_per_token() * 1e-3) / 1e9 : 0.0);
  });
}

}  // namespace decotron::cli
