// CLI for the data pipeline: `decotron tokenizer ...`, `decotron preprocess`, `decotron data ...`.
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <random>

#include "cli/commands.h"
#include "core/error.h"
#include "data/blended_dataset.h"
#include "data/indexed_dataset.h"
#include "data/loader.h"
#include "data/preprocess.h"
#include "data/tokenizer.h"

namespace decotron::cli {

using namespace decotron::data;

void register_tokenizer(CLI::App& app) {
  auto* tok = app.add_subcommand("tokenizer", "Train or try a SentencePiece tokenizer");
  tok->require_subcommand(1);

  auto opt = std::make_shared<TokenizerTrainOptions>();
  auto* train = tok->add_subcommand("train", "Train a SentencePiece model on text/JSONL files (.gz accepted)");
  train->add_option("--input", opt->inputs, "Input files: .jsonl/.json (one JSON object per line) or text (one document per file), optionally .gz")->required()->check(CLI::ExistingFile);
  train->add_option("--model-prefix", opt->model_prefix, "Output: writes PREFIX.model and PREFIX.vocab")->required();
  train->add_option("--vocab-size", opt->vocab_size, "Vocabulary size")->capture_default_str();
  train->add_option("--model-type", opt->model_type, "bpe or unigram")->capture_default_str();
  train->add_option("--character-coverage", opt->character_coverage, "Share of characters covered by pieces; the rest use byte fallback")->capture_default_str();
  train->add_option("--normalization", opt->normalization, "identity (keep newlines/spaces, Llama-2 style) or nmt_nfkc (SentencePiece default)")->capture_default_str();
  train->add_option("--byte-fallback", opt->byte_fallback, "Encode unknown characters as bytes (true/false)")->capture_default_str();
  train->add_option("--input-sentence-size", opt->input_sentence_size, "Lines sampled for training (caps time and memory)")->capture_default_str();
  train->add_option("--json-keys", opt->json_key, "Key of the document text in JSONL inputs")->capture_default_str();
  train->add_option("--threads", opt->threads, "Trainer threads (0: all cores)")->capture_default_str();
  train->callback([opt] {
    const auto t0 = std::chrono::steady_clock::now();
    train_tokenizer(*opt);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    Tokenizer t(opt->model_prefix + ".model");
    std::printf("wrote %s.model (%" PRId64 " pieces, eod id %d) in %.1f s\n", opt->model_prefix.c_str(), t.vocab_size(), t.eod_id(), s);
  });

  auto model = std::make_shared<std::string>();
  auto text = std::make_shared<std::string>();
  auto* enc = tok->add_subcommand("encode", "Print the token ids and pieces of a text");
  enc->add_option("--tokenizer-model", *model, "SentencePiece .model")->required()->check(CLI::ExistingFile);
  enc->add_option("--text", *text, "Text to encode")->required();
  enc->callback([model, text] {
    Tokenizer t(*model);
    for (int32_t id : t.encode(*text)) std::printf("%d\t%s\n", id, t.piece(id).c_str());
  });
}

void register_preprocess(CLI::App& app) {
  auto opt = std::make_shared<PreprocessOptions>();
  auto keys = std::make_shared<std::vector<std::string>>(std::vector<std::string>{"text"});
  auto split_sentences = std::make_shared<std::string>("no");
  auto no_progress = std::make_shared<bool>(false);
  auto* p = app.add_subcommand("preprocess", "Tokenize documents into a Megatron indexed dataset PREFIX.{bin,idx}");
  p->add_option("--input", opt->inputs, "Input files, in order: .jsonl/.json (one JSON object per line) or text files (.txt, .rst, ...: one document per file), optionally .gz")->required()->check(CLI::ExistingFile);
  p->add_option("--output-prefix", opt->output_prefix, "Writes exactly PREFIX.bin and PREFIX.idx")->required();
  p->add_option("--tokenizer-model", opt->tokenizer_model, "SentencePiece .model")->required()->check(CLI::ExistingFile);
  p->add_option("--json-keys", *keys, "JSON key holding the document text (one key)")->capture_default_str();
  p->add_flag("--append-eod", opt->append_eod, "Append the tokenizer's EOD (= EOS) id to every document");
  p->add_option("--workers", opt->workers, "Tokenizer threads (0: all cores); the output does not depend on it")->capture_default_str();
  p->add_option("--split-sentences", *split_sentences, "Only 'no' is supported: one sequence per document")->capture_default_str();
  p->add_flag("--no-progress", *no_progress, "Do not draw the progress line on stderr");
  p->callback([opt, keys, split_sentences, no_progress] {
    if (*split_sentences != "no")
      fail("--split-sentences ", *split_sentences, " is not supported: GPT pretraining uses one sequence per document; pass --split-sentences no");
    if (keys->size() != 1) fail("--json-keys: give exactly one key (got ", keys->size(), "); run preprocess once per key");
    opt->json_key = (*keys)[0];
    opt->progress = !*no_progress;
    PreprocessStats st = preprocess(*opt);
    IndexedDataset ds(opt->output_prefix);
    std::printf("preprocess: %" PRId64 " documents (%" PRId64 " empty skipped), %" PRId64 " tokens from %.1f MB in %.1f s "
                "(%.0f docs/s, %.2f M tokens/s); wrote %s.{bin,idx} (%s)\n",
                st.documents, st.skipped_empty, st.tokens, st.input_bytes / 1e6, st.seconds, st.documents / std::max(st.seconds, 1e-9),
                st.tokens / std::max(st.seconds, 1e-9) / 1e6, opt->output_prefix.c_str(), dtype_code_name(ds.dtype_code()));
  });
}

namespace {

std::pair<int64_t, int64_t> parse_range(const std::string& s) {
  const auto colon = s.find(':');
  try {
    if (colon == std::string::npos) {
      const int64_t a = std::stoll(s);
      return {a, a + 1};
    }
    return {std::stoll(s.substr(0, colon)), std::stoll(s.substr(colon + 1))};
  } catch (const std::exception&) {
    fail("--samples '", s, "': write A:B (samples A to B-1) or a single index");
  }
}

struct InspectArgs {
  std::vector<std::string> prefixes;
  std::vector<double> weights;
  std::string split = "train", split_string = "969,30,1", samples = "0:4", tokenizer, cache_dir;
  int64_t seq_len = 4096, num_samples = 0, show_tokens = 24, vocab_check = 0;
  uint64_t seed = 1234;
  bool validate = false;
};

void run_inspect(const InspectArgs& a) {
  auto [beg, end] = parse_range(a.samples);
  if (beg < 0 || end <= beg) fail("--samples ", a.samples, ": need 0 <= A < B");
  std::unique_ptr<Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = std::make_unique<Tokenizer>(a.tokenizer);
  for (const auto& p : a.prefixes) {
    IndexedDataset ds(p);
    std::printf("%s: %" PRId64 " sequences, %" PRId64 " documents, %" PRId64 " tokens, %s\n", p.c_str(), ds.num_sequences(),
                ds.num_documents(), ds.num_tokens(), dtype_code_name(ds.dtype_code()));
    const int64_t vocab = tok ? tok->vocab_size() : a.vocab_check;
    if (a.validate) {
      if (vocab <= 0) fail("--validate needs --tokenizer-model or --vocab-size to know the valid id range");
      ds.validate_tokens(vocab);
      std::printf("  all %" PRId64 " tokens are in [0, %" PRId64 ")\n", ds.num_tokens(), vocab);
    }
  }
  BlendSpec spec;
  spec.prefixes = a.prefixes;
  spec.weights = a.weights;
  spec.gpt.seq_len = a.seq_len;
  spec.gpt.seed = a.seed;
  spec.gpt.split = a.split_string;
  spec.gpt.cache_dir = a.cache_dir;
  spec.vocab_size = tok ? tok->vocab_size() : a.vocab_check;
  const Split split = parse_split_name(a.split);
  const int64_t n = a.num_samples > 0 ? a.num_samples : end;
  auto top = build_split_dataset(spec, split, n);
  for (int k = 0; k < top->num_parts(); ++k) {
    const auto& g = top->part(k);
    const auto r = g.sequence_range();
    std::printf("component %d (%s), split %s: sequences [%" PRId64 ", %" PRId64 "), %" PRId64 " tokens/epoch, %" PRId64
                " epochs%s, %" PRId64 " samples\n",
                k, g.data().prefix().c_str(), split_name(split), r.first, r.second, g.indices().tokens_per_epoch, g.indices().epochs,
                g.indices().separate_last_epoch ? " (last epoch shuffled separately)" : "", g.size());
  }
  std::printf("%s: %" PRId64 " samples built for %" PRId64 " requested (the request decides the order; --num-samples)\n",
              split_name(split), top->size(), n);
  std::vector<int32_t> buf(static_cast<size_t>(top->sample_tokens()));
  for (int64_t i = beg; i < end && i < top->size(); ++i) {
    auto [k, j] = top->locate(i);
    const auto& g = top->part(k);
    std::printf("sample %" PRId64 ": dataset %d (%s) sample %" PRId64 "\n  covers:", i, k, g.data().prefix().c_str(), j);
    for (const auto& pc : g.pieces(j)) std::printf(" doc %" PRId64 " [%" PRId64 ", %" PRId64 ")", pc.sequence, pc.offset, pc.offset + pc.count);
    top->get(i, buf.data());
    const size_t show = std::min(buf.size(), static_cast<size_t>(std::max<int64_t>(0, a.show_tokens)));
    std::printf("\n  ids:");
    for (size_t t = 0; t < show; ++t) std::printf(" %d", buf[t]);
    if (tok) {
      std::string text = tok->decode(std::span<const int32_t>(buf.data(), show));
      for (char& c : text)
        if (c == '\n') c = ' ';
      std::printf("\n  text: \"%s\"", text.c_str());
    }
    std::printf("\n");
  }
}

struct BenchArgs {
  std::vector<std::string> prefixes;
  int64_t micro_batch = 8, seq_len = 4096, vocab = 73448, batches = 2000, synth_tokens = 64 << 20;
  std::string cache_dir;
};

void run_bench(const BenchArgs& a) {
  DataOptions o;
  o.prefixes = a.prefixes;
  o.seq_len = a.seq_len;
  o.split = "1";
  o.vocab_size = a.vocab;
  std::string tmp;
  if (o.prefixes.empty()) {
    // Synthetic int32 corpus: random documents of 50..8000 tokens, ids below the vocab.
    tmp = (std::filesystem::temp_directory_path() / cat("decotron_loader_bench_", ::getpid())).string();
    std::filesystem::create_directories(tmp);
    IndexedDatasetWriter w(tmp + "/synth", token_dtype_for_vocab(a.vocab));
    std::mt19937 rng(1);
    std::vector<int32_t> doc;
    for (int64_t total = 0; total < a.synth_tokens;) {
      doc.resize(50 + rng() % 7950);
      for (auto& t : doc) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(a.vocab));
      w.add_document(doc);
      total += static_cast<int64_t>(doc.size());
    }
    w.finalize();
    o.prefixes = {tmp + "/synth"};
    std::printf("synthetic corpus: %" PRId64 " tokens, %s, in %s\n", w.num_tokens(), dtype_code_name(static_cast<uint8_t>(token_dtype_for_vocab(a.vocab))), tmp.c_str());
  }
  o.cache_dir = a.cache_dir.empty() ? (tmp.empty() ? std::string() : tmp + "/cache") : a.cache_dir;
  using C = std::chrono::steady_clock;
  auto t0 = C::now();
  BatchLoader loader(o, Split::train, a.micro_batch, a.batches * a.micro_batch);
  auto first = loader.next();
  auto t1 = C::now();
  int64_t sum = 0;
  for (int64_t b = 1; b < a.batches; ++b) sum += loader.next()[0];
  auto t2 = C::now();
  const double build = std::chrono::duration<double>(t1 - t0).count(), run = std::chrono::duration<double>(t2 - t1).count();
  const double batches = static_cast<double>(a.batches - 1), tokens = batches * a.micro_batch * (a.seq_len + 1);
  std::printf("setup + first batch: %.3f s; %" PRId64 " micro-batches of %" PRId64 " x %" PRId64 ": %.0f batches/s, %.0f samples/s, "
              "%.1f M tokens/s, %.2f GB/s of int32 output (checksum %" PRId64 ")\n",
              build, a.batches - 1, a.micro_batch, a.seq_len + 1, batches / run, batches * a.micro_batch / run, tokens / run / 1e6,
              tokens * 4 / run / 1e9, sum + first[0]);
  if (!tmp.empty()) std::filesystem::remove_all(tmp);
}

}  // namespace

void register_data(CLI::App& app) {
  auto* data = app.add_subcommand("data", "Inspect indexed datasets and the sample order; benchmark the loader");
  data->require_subcommand(1);

  auto ia = std::make_shared<InspectArgs>();
  auto* ins = data->add_subcommand("inspect", "Print samples as training sees them: source dataset, documents, offsets, tokens");
  ins->add_option("--data-prefix", ia->prefixes, "Dataset prefix(es) (PREFIX.bin/.idx); several form a blend")->required();
  ins->add_option("--weights", ia->weights, "Blend weights, one per prefix (omit: plain/unweighted, as Megatron)");
  ins->add_option("--split", ia->split, "train, valid or test")->capture_default_str();
  ins->add_option("--data-split", ia->split_string, "Megatron split string (train,valid,test shares)")->capture_default_str();
  ins->add_option("--seq-len", ia->seq_len, "Sequence length")->capture_default_str();
  ins->add_option("--seed", ia->seed, "Megatron --seed")->capture_default_str();
  ins->add_option("--samples", ia->samples, "Sample range A:B (top-level indices A..B-1) or one index")->capture_default_str();
  ins->add_option("--num-samples", ia->num_samples, "Samples requested from the split, as the run computes it; it decides the order (default: B)");
  ins->add_option("--tokenizer-model", ia->tokenizer, "SentencePiece model: decode tokens and check ids");
  ins->add_option("--vocab-size", ia->vocab_check, "Check token ids against this size (when no tokenizer model)");
  ins->add_option("--tokens", ia->show_tokens, "How many first tokens of each sample to show")->capture_default_str();
  ins->add_option("--cache-dir", ia->cache_dir, "Index cache directory (default: PREFIX/cache/GPTDataset_indices)");
  ins->add_flag("--validate", ia->validate, "Scan every token of every prefix against the vocabulary first");
  ins->callback([ia] { run_inspect(*ia); });

  auto ba = std::make_shared<BenchArgs>();
  auto* bench = data->add_subcommand("bench-loader", "Measure BatchLoader throughput (synthetic int32 corpus unless --data-prefix)");
  bench->add_option("--data-prefix", ba->prefixes, "Dataset prefix(es); default: a synthetic corpus in a temp dir");
  bench->add_option("--micro-batch", ba->micro_batch, "Samples per micro-batch")->capture_default_str();
  bench->add_option("--seq-len", ba->seq_len, "Sequence length")->capture_default_str();
  bench->add_option("--vocab-size", ba->vocab, "Vocabulary size (decides uint16/int32 storage; ids are checked)")->capture_default_str();
  bench->add_option("--batches", ba->batches, "Micro-batches to read")->capture_default_str();
  bench->add_option("--synthetic-tokens", ba->synth_tokens, "Size of the synthetic corpus")->capture_default_str();
  bench->add_option("--cache-dir", ba->cache_dir, "Index cache directory");
  bench->callback([ba] { run_bench(*ba); });
}

}  // namespace decotron::cli
