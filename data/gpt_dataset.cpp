#include "data/gpt_dataset.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>

#include "core/error.h"
#include "data/npy.h"
#include "data/numpy_random.h"

namespace decotron::data {

const char* split_name(Split s) {
  switch (s) {
    case Split::train: return "train";
    case Split::valid: return "valid";
    case Split::test: return "test";
  }
  return "?";
}

Split parse_split_name(const std::string& name) {
  if (name == "train") return Split::train;
  if (name == "valid" || name == "validation") return Split::valid;
  if (name == "test") return Split::test;
  fail("unknown split '", name, "'; use train, valid or test");
}

SplitBookends parse_split_string(const std::string& split) {
  // Megatron: re.findall(r"[.0-9]+", split), so any separator works.
  std::vector<double> w;
  std::regex num("[.0-9]+");
  for (auto it = std::sregex_iterator(split.begin(), split.end(), num); it != std::sregex_iterator(); ++it) {
    const std::string s = it->str();
    char* endp = nullptr;
    double v = std::strtod(s.c_str(), &endp);
    if (endp != s.c_str() + s.size()) fail("split string '", split, "': '", s, "' is not a number");
    w.push_back(v);
  }
  if (w.empty()) fail("split string '", split, "' contains no numbers; write it like \"969,30,1\"");
  if (w.size() > 3) fail("split string '", split, "' has ", w.size(), " parts; at most 3 (train,valid,test)");
  w.resize(3, 0.0);
  const double sum = numpy_sum(w);
  if (!(sum > 0) || !std::isfinite(sum)) fail("split string '", split, "' must have a positive, finite sum");
  for (double& v : w) v /= sum;
  SplitBookends b;
  double beg = 0.0;
  for (int k = 0; k < 3; ++k) {
    double end = beg + w[k];
    if (end > beg) b[k] = std::make_pair(beg, end);  // zero width: absent, as in Megatron
    beg = end;
  }
  return b;
}

std::optional<std::pair<int64_t, int64_t>> split_sequence_range(const SplitBookends& b, Split s, int64_t num_sequences) {
  const auto& r = b[static_cast<int>(s)];
  if (!r) return std::nullopt;
  // Python's round() is half-to-even; nearbyint in the default rounding mode is the same.
  const double m = static_cast<double>(num_sequences);
  return std::make_pair(static_cast<int64_t>(std::nearbyint(r->first * m)),
                        static_cast<int64_t>(std::nearbyint(r->second * m)));
}

namespace {

struct Plan {
  int64_t T, E, A = 0;
  bool separate = false;
};

Plan plan_epochs(std::span<const int32_t> lengths, int64_t begin, int64_t end, std::optional<int64_t> N, int64_t S,
                 int64_t x, const std::string& what) {
  Plan p{};
  p.T = 0;
  for (int64_t i = begin; i < end; ++i) p.T += lengths[i];
  p.E = 1;
  if (N) {
    if (*N < 0) fail(what, ": negative number of samples requested (", *N, ")");
    const int64_t need = *N * S + x;
    if (p.T == 0)
      fail(what, " holds no tokens (sequences [", begin, ", ", end, ") of the file), but ", *N,
           " samples were requested from it. Give this split a larger share in the split string (data.split, --data-split), "
           "use a bigger dataset, or request no samples from it (e.g. eval_iters 0 for valid/test).");
    // Smallest E >= 1 with E*T >= N*S + x (Megatron adds T repeatedly).
    p.E = std::max<int64_t>(1, (need + p.T - 1) / p.T);
  }
  if (p.E > 1) {
    p.A = ((p.E - 1) * p.T - x) / S;
    const int64_t F = *N - p.A;
    const int64_t B = (p.T - x) / S;
    DT_ASSERT(F >= 0 && F <= B + 1, what, ": F=", F, " B=", B);
    p.separate = F < static_cast<int64_t>(0.80 * static_cast<double>(B));
  }
  return p;
}

}  // namespace

GptIndices build_gpt_indices(std::span<const int32_t> lengths, int64_t begin, int64_t end,
                             std::optional<int64_t> num_samples, int64_t S, bool add_extra_token,
                             bool drop_last_partial, uint32_t seed, const std::string& what) {
  DT_ASSERT(0 <= begin && begin <= end && end <= static_cast<int64_t>(lengths.size()));
  if (S <= 0) fail(what, ": sequence length must be positive, got ", S);
  const int64_t x = add_extra_token ? 1 : 0;
  const Plan p = plan_epochs(lengths, begin, end, num_samples, S, x, what);
  GptIndices out;
  out.tokens_per_epoch = p.T;
  out.epochs = p.E;
  out.separate_last_epoch = p.separate;
  NumpyRandomState rng(seed);

  // 1. Document index: E copies of [begin, end), shuffled (first E-1 epochs and the last
  //    separately when the last epoch is separate). Draws from the RNG first.
  const int64_t per = end - begin;
  out.document_index.resize(static_cast<size_t>(p.E * per));
  for (int64_t e = 0; e < p.E; ++e)
    for (int64_t i = 0; i < per; ++i) out.document_index[e * per + i] = static_cast<int32_t>(begin + i);
  std::span<int32_t> di(out.document_index);
  if (!p.separate) {
    rng.shuffle(di);
  } else {
    rng.shuffle(di.subspan(0, (p.E - 1) * per));
    rng.shuffle(di.subspan((p.E - 1) * per));
  }

  // 2. Sample index (Megatron's C++ build_sample_idx); consecutive samples overlap by x tokens.
  const int64_t total = p.E * p.T - x;
  int64_t n;
  if (drop_last_partial) {
    n = total / S;
  } else {  // the helper's float32 ceil, a quirk reproduced on purpose
    n = static_cast<int64_t>(std::ceil(static_cast<float>(total) / static_cast<float>(S)));
  }
  if (n < 0) n = 0;
  out.sample_index.assign(2 * (n + 1), 0);
  const int64_t ndoc = static_cast<int64_t>(out.document_index.size());
  int64_t d = 0, o = 0;
  for (int64_t k = 1; k <= n; ++k) {
    int64_t need = S + x;
    while (need > 0) {
      const int64_t len = lengths[out.document_index[d]] - o;
      need -= len;
      if (need <= 0) {
        o += need + len - x;
      } else if (d == ndoc - 1) {
        DT_ASSERT(!drop_last_partial, what, ": sample index ran past the document index");
        o = lengths[out.document_index[d]] - x;
        break;
      } else {
        ++d;
        o = 0;
      }
    }
    out.sample_index[2 * k] = d;
    out.sample_index[2 * k + 1] = o;
  }

  // 3. Shuffle index: [0, n) shuffled, or [0, A) and [A, n) separately. Draws second.
  out.shuffle_index.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out.shuffle_index[i] = i;
  std::span<int64_t> sh(out.shuffle_index);
  if (!p.separate) {
    rng.shuffle(sh);
  } else {
    rng.shuffle(sh.subspan(0, static_cast<size_t>(p.A)));
    rng.shuffle(sh.subspan(static_cast<size_t>(p.A)));
  }
  return out;
}

// ------------------------------------------------------------------------------------------

namespace {

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

template <class T>
std::vector<T> npy_as(const NpyArray& a, const char* descr, const std::string& path) {
  if (a.descr != descr) fail(path, ": expected dtype ", descr, ", found ", a.descr, "; delete the cache file");
  std::vector<T> v(a.bytes.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), a.bytes.data(), a.bytes.size());
  return v;
}

// Loads cached indices; returns false (after a warning) if they are unusable.
bool load_cache(const std::string& base, GptIndices& idx, int64_t num_sequences, int64_t seq_count_per_epoch) {
  try {
    auto di = read_npy(base + "-document_index.npy");
    auto si = read_npy(base + "-sample_index.npy");
    auto sh = read_npy(base + "-shuffle_index.npy");
    idx.document_index = npy_as<int32_t>(di, "<i4", base + "-document_index.npy");
    idx.sample_index = npy_as<int64_t>(si, "<i8", base + "-sample_index.npy");
    idx.shuffle_index = npy_as<int64_t>(sh, "<i8", base + "-shuffle_index.npy");
    const int64_t n = idx.num_samples();
    bool ok = static_cast<int64_t>(idx.sample_index.size()) == 2 * (n + 1) &&
              static_cast<int64_t>(idx.document_index.size()) == idx.epochs * seq_count_per_epoch;
    for (int32_t v : idx.document_index) ok = ok && v >= 0 && v < num_sequences;
    for (int64_t v : idx.shuffle_index) ok = ok && v >= 0 && v < n;
    for (size_t r = 0; ok && r < idx.sample_index.size(); r += 2)
      ok = idx.sample_index[r] >= 0 && idx.sample_index[r] < static_cast<int64_t>(idx.document_index.size());
    if (!ok) fail(base, "-*.npy: cached indices are inconsistent with the dataset");
    return true;
  } catch (const Error& e) {
    std::fprintf(stderr, "decotron: warning: ignoring index cache (%s); rebuilding\n", e.what());
    return false;
  }
}

}  // namespace

GptDataset::GptDataset(std::shared_ptr<const IndexedDataset> data, Split split, std::optional<int64_t> num_samples,
                       const GptDatasetConfig& cfg)
    : data_(std::move(data)), split_(split), cfg_(cfg) {
  const std::string what = cat("split '", split_name(split), "' of dataset ", data_->prefix(), " (split string \"", cfg.split, "\")");
  if (cfg.seed > 0xffffffffull) fail("seed ", cfg.seed, " is out of range; numpy's RandomState takes seeds in [0, 2^32-1]");
  auto range = split_sequence_range(parse_split_string(cfg.split), split, data_->num_sequences());
  if (!range)
    fail(what, " is absent: the split string gives it zero width. Give it a nonzero share (data.split, --data-split) "
         "if samples are needed from it.");
  range_ = *range;
  const auto& lengths = data_->sequence_lengths();

  // Cache key: everything that determines the indices, plus the file's identity.
  nlohmann::ordered_json desc;
  desc["class"] = "GPTDataset";
  desc["format"] = 1;
  desc["dataset_path"] = data_->prefix();
  desc["num_sequences"] = data_->num_sequences();
  desc["num_tokens"] = data_->num_tokens();
  desc["num_samples"] = num_samples ? nlohmann::ordered_json(*num_samples) : nlohmann::ordered_json(nullptr);
  desc["index_split"] = split_name(split);
  desc["split"] = cfg.split;
  desc["sequence_range"] = {range_.first, range_.second};
  desc["random_seed"] = cfg.seed;
  desc["sequence_length"] = cfg.seq_len;
  desc["add_extra_token_to_sequence"] = cfg.add_extra_token;
  desc["drop_last_partial_sequence"] = cfg.drop_last_partial;
  const std::string text = desc.dump(4);

  std::string base;
  if (cfg.use_cache) {
    const std::string dir = cfg.cache_dir.empty() ? data_->prefix() + "/cache/GPTDataset_indices" : cfg.cache_dir;
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(fnv1a64(text)));
    base = cat(dir, "/", hex, "-GPTDataset-", split_name(split));
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      std::fprintf(stderr, "decotron: warning: cannot create index cache directory %s (%s); indices are rebuilt at every start. Set data.cache_dir to a writable directory.\n",
                   dir.c_str(), ec.message().c_str());
      base.clear();
    }
  }
  // The epoch plan is cheap; the arrays are what the cache saves.
  const int64_t x = cfg.add_extra_token ? 1 : 0;
  const Plan p = plan_epochs(lengths, range_.first, range_.second, num_samples, cfg.seq_len, x, what);
  idx_.tokens_per_epoch = p.T;
  idx_.epochs = p.E;
  idx_.separate_last_epoch = p.separate;
  if (!base.empty() && slurp(base + "-description.txt") == text &&
      load_cache(base, idx_, data_->num_sequences(), range_.second - range_.first)) {
    cache_path_ = base + "-description.txt";
    return;
  }
  idx_ = build_gpt_indices(lengths, range_.first, range_.second, num_samples, cfg.seq_len, cfg.add_extra_token,
                           cfg.drop_last_partial, static_cast<uint32_t>(cfg.seed), what);
  if (base.empty()) return;
  try {
    const int64_t n = idx_.num_samples();
    write_npy(base + "-document_index.npy", "<i4", {static_cast<int64_t>(idx_.document_index.size())},
              idx_.document_index.data(), idx_.document_index.size() * 4);
    write_npy(base + "-sample_index.npy", "<i8", {n + 1, 2}, idx_.sample_index.data(), idx_.sample_index.size() * 8);
    write_npy(base + "-shuffle_index.npy", "<i8", {n}, idx_.shuffle_index.data(), idx_.shuffle_index.size() * 8);
    // The description goes last: its presence marks a complete cache entry.
    write_file_atomic(base + "-description.txt", text);
    cache_path_ = base + "-description.txt";
  } catch (const Error& e) {
    std::fprintf(stderr, "decotron: warning: could not write the index cache: %s\n", e.what());
  }
}

std::vector<GptDataset::Piece> GptDataset::pieces(int64_t i) const {
  DT_ASSERT(i >= 0 && i < size(), "sample ", i, " of ", size());
  const int64_t x = cfg_.add_extra_token ? 1 : 0;
  const int64_t j = idx_.shuffle_index[i];
  const int64_t d0 = idx_.sample_index[2 * j], o0 = idx_.sample_index[2 * j + 1];
  const int64_t d1 = idx_.sample_index[2 * j + 2], o1 = idx_.sample_index[2 * j + 3];
  const auto& di = idx_.document_index;
  const auto& len = data_->sequence_lengths();
  std::vector<Piece> out;
  if (d0 == d1) {
    out.push_back({di[d0], o0, o1 - o0 + x});
  } else {
    out.push_back({di[d0], o0, len[di[d0]] - o0});
    for (int64_t d = d0 + 1; d < d1; ++d) out.push_back({di[d], 0, len[di[d]]});
    out.push_back({di[d1], 0, o1 + x});
  }
  return out;
}

void GptDataset::get(int64_t i, int32_t* out) const {
  int64_t w = 0;
  const int64_t want = sample_tokens();
  for (const Piece& p : pieces(i)) {
    const int64_t c = std::min(p.count, want - w);  // only short of `want` without dropping
    if (c <= 0) continue;
    data_->read(p.sequence, p.offset, c, out + w);
    w += c;
  }
  for (; w < want; ++w) out[w] = cfg_.pad_id;
}

}  // namespace decotron::data
