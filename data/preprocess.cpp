#include "data/preprocess.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <future>
#include <thread>

#include "core/error.h"
#include "data/indexed_dataset.h"
#include "data/text_input.h"
#include "data/tokenizer.h"

namespace decotron::data {

namespace {

using Clock = std::chrono::steady_clock;

std::string human(double v) {
  const char* units[] = {"", "k", "M", "G", "T"};
  int u = 0;
  while (v >= 1000 && u < 4) {
    v /= 1000;
    ++u;
  }
  char b[32];
  std::snprintf(b, sizeof b, u ? "%.1f%s" : "%.0f%s", v, units[u]);
  return b;
}

std::string hms(double s) {
  if (!(s >= 0) || s > 1e7) return "--:--";
  const long t = static_cast<long>(s + 0.5);
  char b[32];
  if (t >= 3600) std::snprintf(b, sizeof b, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else std::snprintf(b, sizeof b, "%ld:%02ld", t / 60, t % 60);
  return b;
}

// A progress line on stderr: redrawn in place on a terminal, a plain line every 10 s otherwise
// (so logs of batch jobs stay readable).
class Progress {
 public:
  Progress(bool enabled, uint64_t total_bytes) : enabled_(enabled), tty_(::isatty(2)), total_(total_bytes), t0_(Clock::now()) {}
  void update(int64_t docs, int64_t tokens, uint64_t bytes, bool force = false) {
    if (!enabled_) return;
    const auto now = Clock::now();
    const double since = std::chrono::duration<double>(now - last_).count();
    if (!force && since < (tty_ ? 0.25 : 10.0)) return;
    last_ = now;
    const double el = std::max(1e-9, std::chrono::duration<double>(now - t0_).count());
    const double frac = total_ ? std::min(1.0, static_cast<double>(bytes) / static_cast<double>(total_)) : 0;
    const double eta = frac > 0 && el > 1.0 ? el * (1 - frac) / frac : -1;  // unknown in the first second
    std::fprintf(stderr, "%s[%5.1f%%] %s docs, %s tokens | %s docs/s, %s tok/s | %s/%sB read | ETA %s%s",
                 tty_ ? "\r" : "", 100 * frac, human(static_cast<double>(docs)).c_str(), human(static_cast<double>(tokens)).c_str(),
                 human(docs / el).c_str(), human(tokens / el).c_str(), human(static_cast<double>(bytes)).c_str(),
                 human(static_cast<double>(total_)).c_str(), hms(eta).c_str(), tty_ ? "\033[K" : "\n");
    std::fflush(stderr);
  }
  void finish() {
    if (enabled_ && tty_) std::fputc('\n', stderr);
  }

 private:
  bool enabled_, tty_;
  uint64_t total_;
  Clock::time_point t0_, last_{};
};

struct Chunk {
  std::vector<std::string> docs;
};
using Tokens = std::vector<std::vector<int32_t>>;

}  // namespace

PreprocessStats preprocess(const PreprocessOptions& opt) {
  if (opt.inputs.empty()) fail("preprocess: no --input files given");
  if (opt.output_prefix.empty()) fail("preprocess: --output-prefix is required");
  const uint64_t total = total_file_bytes(opt.inputs);
  const Tokenizer tok(opt.tokenizer_model);
  const int workers = opt.workers > 0 ? opt.workers : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (opt.append_eod && tok.eod_id() < 0) fail("preprocess: --append-eod but ", opt.tokenizer_model, " has no EOS/EOD id");

  IndexedDatasetWriter writer(opt.output_prefix, token_dtype_for_vocab(tok.vocab_size()));
  PreprocessStats st;
  st.input_bytes = total;
  Progress progress(opt.progress, total);
  const auto t0 = Clock::now();

  auto tokenize = [&tok, eod = opt.append_eod ? tok.eod_id() : -1](Chunk c) {
    Tokens out(c.docs.size());
    for (size_t i = 0; i < c.docs.size(); ++i) {
      out[i] = tok.encode(c.docs[i]);
      if (eod >= 0 && !out[i].empty()) out[i].push_back(eod);
    }
    return out;
  };
  // Chunks are tokenized concurrently but written strictly in submission order.
  std::deque<std::future<Tokens>> inflight;
  auto drain_one = [&] {
    Tokens t = inflight.front().get();
    inflight.pop_front();
    for (auto& d : t) {
      if (d.empty()) {
        ++st.skipped_empty;
        continue;
      }
      writer.add_document(d);
      ++st.documents;
      st.tokens += static_cast<int64_t>(d.size());
    }
  };

  constexpr size_t kChunkBytes = 1 << 20, kChunkDocs = 4096;
  uint64_t done_bytes = 0, reader_bytes = 0;
  // A chunk spans files, so many small files (one document each) still batch well.
  Chunk chunk;
  size_t chunk_bytes = 0;
  auto submit = [&] {
    if (chunk.docs.empty()) return;
    if (static_cast<int>(inflight.size()) >= workers) drain_one();
    inflight.push_back(std::async(std::launch::async, tokenize, std::move(chunk)));
    chunk = Chunk{};
    chunk_bytes = 0;
    progress.update(st.documents, st.tokens, done_bytes + reader_bytes);
  };
  try {
    for (const auto& path : opt.inputs) {
      DocumentReader reader(path, opt.json_key);
      std::string doc;
      while (reader.next(doc)) {
        chunk_bytes += doc.size();
        chunk.docs.push_back(std::move(doc));
        doc = std::string();
        reader_bytes = reader.bytes_read();
        if (chunk_bytes >= kChunkBytes || chunk.docs.size() >= kChunkDocs) submit();
      }
      done_bytes += reader.bytes_read();
      reader_bytes = 0;
    }
    submit();
    while (!inflight.empty()) drain_one();
  } catch (...) {
    for (auto& f : inflight) f.wait();  // no thread may outlive the tokenizer it uses
    throw;
  }
  writer.finalize();
  progress.update(st.documents, st.tokens, total, true);
  progress.finish();
  st.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return st;
}

}  // namespace decotron::data
