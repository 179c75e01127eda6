#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <sstream>
#include <type_traits>

#include "core/error.h"

namespace decotron {

namespace fs = std::filesystem;

namespace {

using Choices = std::initializer_list<const char*>;

template <class T> const char* type_name() {
  if constexpr (std::is_same_v<T, bool>) return "bool";
  else if constexpr (std::is_integral_v<T>) return "integer";
  else if constexpr (std::is_floating_point_v<T>) return "number";
  else if constexpr (std::is_same_v<T, std::string>) return "string";
  else if constexpr (std::is_same_v<T, std::vector<std::string>>) return "list of strings";
  else return "list of numbers";
}

std::string loc(const std::string& file, const YAML::Node& n) {
  return cat(file, ":", n.Mark().line + 1);
}

// Parses one scalar into T; `where` names the file:line and key for the error.
template <class T> T parse_scalar(const YAML::Node& n, const std::string& where) {
  if (!n.IsScalar()) fail(where, ": expected a ", type_name<T>(), ", got a ", n.IsSequence() ? "list" : "map");
  const std::string s = n.Scalar();
  try {
    if constexpr (std::is_same_v<T, bool>) {
      return n.as<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      // Accept 1e6-style integers too, as long as the value is integral.
      size_t used = 0;
      double d = std::stod(s, &used);
      if (used != s.size() || d != std::floor(d) || (std::is_unsigned_v<T> && d < 0)) throw std::invalid_argument(s);
      return static_cast<T>(s.find_first_of(".eE") == std::string::npos ? std::stoll(s) : static_cast<long long>(d));
    } else if constexpr (std::is_floating_point_v<T>) {
      size_t used = 0;
      double d = std::stod(s, &used);
      if (used != s.size()) throw std::invalid_argument(s);
      return d;
    } else {
      return s;
    }
  } catch (const std::exception&) {
    fail(where, ": expected a ", type_name<T>(), ", got '", s, "'");
  }
}

template <class T> void parse_value(const YAML::Node& n, T& out, const std::string& where) {
  if constexpr (std::is_same_v<T, std::vector<std::string>> || std::is_same_v<T, std::vector<double>>) {
    using E = typename T::value_type;
    T v;
    if (n.IsScalar()) {
      v.push_back(parse_scalar<E>(n, where));  // a single value is a list of one
    } else if (n.IsSequence()) {
      for (const auto& item : n) v.push_back(parse_scalar<E>(item, where));
    } else if (!n.IsNull()) {
      fail(where, ": expected a ", type_name<T>());
    }
    out = v;
  } else {
    out = parse_scalar<T>(n, where);
  }
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string suggestion(const std::string& key, const std::vector<std::string>& known) {
  std::string best;
  size_t bd = 3;
  for (const auto& k : known) {
    size_t d = edit_distance(key, k);
    if (d < bd) bd = d, best = k;
  }
  std::string all;
  for (const auto& k : known) all += (all.empty() ? "" : ", ") + k;
  return best.empty() ? cat(" (known keys: ", all, ")") : cat(" (did you mean '", best, "'?)");
}

template <class T> void check_choice(const T& value, Choices choices, const std::string& where) {
  if constexpr (std::is_same_v<T, std::string>) {
    if (choices.size() == 0) return;
    std::string all;
    for (const char* c : choices) {
      if (value == c) return;
      all += (all.empty() ? "" : ", ") + std::string(c);
    }
    fail(where, ": '", value, "' is not one of: ", all);
  }
}

// Applies the keys of one YAML section map to a config struct.
struct SectionApplier {
  const YAML::Node& map;
  const std::string& file;
  const std::string& section;
  Config& cfg;
  std::set<std::string> seen;
  std::vector<std::string> known;

  template <class T> void operator()(const char* name, T& value, const char*, Choices choices = {}) {
    known.push_back(name);
    const YAML::Node n = map[name];
    if (!n.IsDefined()) return;
    seen.insert(name);
    std::string key = section + "." + name;
    std::string where = cat(loc(file, n), ": ", key);
    parse_value(n, value, where);
    check_choice(value, choices, where);
    cfg.origin[key] = loc(file, n);
  }
};

struct SectionDispatch {
  const YAML::Node& root;
  const std::string& file;
  Config& cfg;
  std::vector<std::string> names;

  template <class S> void operator()(const char* name, S& section) {
    names.push_back(name);
    const YAML::Node n = root[name];
    if (!n.IsDefined() || n.IsNull()) return;
    if (!n.IsMap()) fail(loc(file, n), ": section '", name, "' must be a map of key: value");
    SectionApplier a{n, file, name, cfg, {}, {}};
    section.fields(a);
    for (const auto& kv : n) {
      std::string k = kv.first.as<std::string>();
      if (!a.seen.count(k))
        fail(loc(file, kv.first), ": unknown key '", name, ".", k, "'", suggestion(k, a.known));
    }
  }
};

void load_root(Config& cfg, const YAML::Node& root, const fs::path& path, const fs::path& canon,
               std::vector<fs::path>& stack);

void load_file(Config& cfg, const fs::path& path, std::vector<fs::path>& stack) {
  fs::path canon = fs::weakly_canonical(path);
  if (std::find(stack.begin(), stack.end(), canon) != stack.end())
    fail(path.string(), ": includes itself (through ", stack.back().string(), "); remove the cycle");
  if (!fs::exists(path)) {
    if (stack.empty()) fail("config file '", path.string(), "' does not exist; see configs/ for examples");
    fail(stack.back().string(), ": included file '", path.string(), "' does not exist");
  }
  YAML::Node root;
  try {
    root = YAML::LoadFile(path.string());
  } catch (const YAML::Exception& e) {
    fail(path.string(), ":", e.mark.line + 1, ": YAML syntax error: ", e.msg);
  }
  load_root(cfg, root, path, canon, stack);
}

// Applies a parsed YAML document; `path` names it in errors and anchors its includes.
void load_root(Config& cfg, const YAML::Node& root, const fs::path& path, const fs::path& canon,
               std::vector<fs::path>& stack) {
  const std::string file = path.string();
  if (root.IsNull()) return;
  if (!root.IsMap()) fail(file, ": a config is a map of sections (model:, train:, data:, ...)");
  stack.push_back(canon);
  if (const YAML::Node inc = root["include"]; inc.IsDefined()) {
    std::vector<std::string> files;
    parse_value(inc, files, cat(loc(file, inc), ": include"));
    for (const auto& f : files) load_file(cfg, path.parent_path() / f, stack);
  }
  SectionDispatch d{root, file, cfg, {}};
  cfg.sections(d);
  for (const auto& kv : root) {
    std::string k = kv.first.as<std::string>();
    if (k != "include" && std::find(d.names.begin(), d.names.end(), k) == d.names.end())
      fail(loc(file, kv.first), ": unknown section '", k, "'", suggestion(k, d.names));
  }
  stack.pop_back();
}

}  // namespace

std::string Config::where(const std::string& key) const {
  auto it = origin.find(key);
  return it == origin.end() ? cat(source, ": ", key, " (default)") : cat(it->second, ": ", key);
}

void apply_override(Config& cfg, const std::string& assignment) {
  auto eq = assignment.find('=');
  auto dot = assignment.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot > eq)
    fail("--set '", assignment, "': expected section.key=value, e.g. --set train.lr=3e-4");
  std::string section = assignment.substr(0, dot), key = assignment.substr(dot + 1, eq - dot - 1);
  std::string value = assignment.substr(eq + 1);
  YAML::Node root;
  try {
    root[section][key] = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    fail("--set '", assignment, "': the value is not valid YAML: ", e.msg);
  }
  const std::string file = "--set";
  SectionDispatch d{root, file, cfg, {}};
  try {
    cfg.sections(d);
  } catch (const Error& e) {
    // Messages from the YAML path carry a line number that means nothing here.
    std::string msg = e.what();
    auto p = msg.find(": ");
    fail("--set ", assignment, ": ", p == std::string::npos ? msg : msg.substr(p + 2));
  }
  if (std::find(d.names.begin(), d.names.end(), section) == d.names.end())
    fail("--set '", assignment, "': unknown section '", section, "'", suggestion(section, d.names));
  cfg.origin[section + "." + key] = "--set";
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  Config cfg;
  cfg.source = path;
  std::vector<fs::path> stack;
  load_file(cfg, path, stack);
  for (const auto& o : overrides) apply_override(cfg, o);
  validate_config(cfg);
  return cfg;
}

Config config_from_yaml(const std::string& text, const std::string& name) {
  Config cfg;
  cfg.source = name;
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail(name, ":", e.mark.line + 1, ": YAML syntax error: ", e.msg);
  }
  std::vector<fs::path> stack;
  load_root(cfg, root, name, name, stack);
  validate_config(cfg);
  return cfg;
}

void validate_config(const Config& c) {
  const ModelConfig& m = c.model;
  auto positive = [&](const char* key, int64_t v) {
    if (v <= 0) fail(c.where(key), " must be positive, got ", v);
  };
  positive("model.vocab_size", m.vocab_size);
  positive("model.seq_len", m.seq_len);
  positive("model.hidden", m.hidden);
  positive("model.layers", m.layers);
  positive("model.heads", m.heads);
  positive("model.ffn_hidden", m.ffn_hidden);
  if (m.hidden % m.heads != 0)
    fail(c.where("model.hidden"), " = ", m.hidden, " is not divisible by model.heads = ", m.heads,
         "; pick heads that divide the hidden size");
  if ((m.hidden / m.heads) % 2 != 0)
    fail(c.where("model.heads"), ": head_dim = hidden / heads = ", m.hidden / m.heads,
         " must be even for rotary embeddings");
  int64_t kv = m.kv_heads == 0 ? m.heads : m.kv_heads;
  if (kv < 0 || m.heads % kv != 0)
    fail(c.where("model.kv_heads"), " = ", m.kv_heads, " must divide model.heads = ", m.heads);
  if (m.arch == "deco") {
    positive("model.experts", m.experts);
    positive("model.expert_width", m.expert_width);
    if (m.shared_expert_width < 0) fail(c.where("model.shared_expert_width"), " must be >= 0");
    if (m.dense_layers < 0 || m.dense_layers > m.layers)
      fail(c.where("model.dense_layers"), " = ", m.dense_layers, " must be between 0 and model.layers = ", m.layers);
    if (m.parameter_parity) {
      int64_t expert_mats = m.gated_experts ? 3 : 2;
      int64_t deco = expert_mats * m.experts * m.expert_width + 3 * m.shared_expert_width;
      if (deco != 3 * m.ffn_hidden)
        fail(c.where("model.experts"), ": parameter parity fails: ", expert_mats, "*E*d + 3*shared = ", deco,
             " but 3*ffn_hidden = ", 3 * m.ffn_hidden, " (E=", m.experts, ", d=", m.expert_width,
             ", shared=", m.shared_expert_width, ", F=", m.ffn_hidden,
             "); adjust model.experts / model.ffn_hidden, or set model.parameter_parity: false");
    }
  }
  const TrainConfig& t = c.train;
  positive("train.iters", t.iters);
  positive("train.micro_batch", t.micro_batch);
  positive("train.global_batch", t.global_batch);
  if (t.global_batch % t.micro_batch != 0)
    fail(c.where("train.global_batch"), " = ", t.global_batch, " is not a multiple of train.micro_batch = ",
         t.micro_batch);
  if (t.warmup_iters < 0 || t.warmup_iters > t.iters)
    fail(c.where("train.warmup_iters"), " = ", t.warmup_iters, " must be between 0 and train.iters = ", t.iters);
  if (t.lr_schedule == "wsd" && (t.decay_iters < 0 || t.decay_iters + t.warmup_iters > t.iters))
    fail(c.where("train.decay_iters"), " = ", t.decay_iters, ": warmup_iters + decay_iters must not exceed iters = ",
         t.iters);
  if (!(t.lr > 0)) fail(c.where("train.lr"), " must be positive");
  if (!(t.target_ratio > 0 && t.target_ratio < 1)) fail(c.where("train.target_ratio"), " must be in (0, 1)");
  if (!(t.reg_multiplier >= 1)) fail(c.where("train.reg_multiplier"), " must be >= 1");
  if (!(t.reg_lambda0 >= 0)) fail(c.where("train.reg_lambda0"), " must be >= 0");
  if (t.clip_grad < 0) fail(c.where("train.clip_grad"), " must be >= 0");
  if (t.max_skipped_steps < 1) fail(c.where("train.max_skipped_steps"), " must be >= 1");
  if (t.loss_chunk_tokens < 0) fail(c.where("train.loss_chunk_tokens"), " = ", t.loss_chunk_tokens, " must be >= 0 (0: the whole micro-batch at once)");
  if (!c.data.weights.empty() && c.data.weights.size() != c.data.prefixes.size())
    fail(c.where("data.weights"), ": ", c.data.weights.size(), " weights for ", c.data.prefixes.size(),
         " prefixes; give one weight per prefix or none");
  for (double w : c.data.weights)
    if (!(w >= 0) || !std::isfinite(w)) fail(c.where("data.weights"), ": weights must be finite and >= 0");
  if (c.parallel.tensor < 1 || c.parallel.expert < 1 || c.parallel.data < 0)
    fail(c.where("parallel.tensor"), ": parallel sizes must be >= 1 (data: 0 for auto)");
  if (!(c.parallel.timeout_s > 0)) fail(c.where("parallel.timeout_s"), " must be positive");
  if (!(c.parallel.grad_bucket_mb > 0))
    fail(c.where("parallel.grad_bucket_mb"), " = ", c.parallel.grad_bucket_mb, " must be positive (default 25)");
  // Sequence parallelism splits the tokens over the tensor-parallel ranks: as Megatron-Core's
  // ModelParallelConfig, it is an error without tensor parallelism (not silently ignored).
  if (c.parallel.sequence && c.parallel.tensor == 1)
    fail(c.where("parallel.sequence"), ": sequence parallelism needs tensor parallelism (parallel.tensor > 1); set "
         "parallel.sequence: false or raise parallel.tensor");
  if (c.parallel.sequence && (t.micro_batch * m.seq_len) % c.parallel.tensor != 0)
    fail(c.where("parallel.sequence"), ": the micro-batch's train.micro_batch x model.seq_len = ", t.micro_batch,
         " x ", m.seq_len, " = ", t.micro_batch * m.seq_len, " tokens do not split over parallel.tensor = ",
         c.parallel.tensor, " ranks; pick a micro-batch and sequence length whose product is a multiple of it");
  if (c.log.interval < 1) fail(c.where("log.interval"), " must be >= 1");
  if (c.checkpoint.keep < 1) fail(c.where("checkpoint.keep"), " must be >= 1");
  if (c.checkpoint.interval < 0) fail(c.where("checkpoint.interval"), " must be >= 0");
  // A resumed run's metrics.jsonl equals an uninterrupted run's only if every checkpoint falls
  // on a log boundary (the partial interval's averages are not checkpointed).
  if (c.checkpoint.interval > 0 && c.checkpoint.interval % c.log.interval != 0)
    fail(c.where("checkpoint.interval"), " = ", c.checkpoint.interval, " is not a multiple of log.interval = ",
         c.log.interval, "; pick a multiple so that checkpoints fall on log boundaries (resumed metrics then "
         "match an uninterrupted run)");
}

namespace {

std::string yaml_scalar(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out + "\"";
}

template <class T> std::string value_str(const T& v) {
  std::ostringstream os;
  if constexpr (std::is_same_v<T, bool>) os << (v ? "true" : "false");
  else if constexpr (std::is_same_v<T, std::string>) os << yaml_scalar(v);
  else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    os << "[";
    for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << yaml_scalar(v[i]);
    os << "]";
  } else if constexpr (std::is_same_v<T, std::vector<double>>) {
    os.precision(17);
    os << "[";
    for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
    os << "]";
  } else {
    os.precision(17);
    os << v;
  }
  return os.str();
}

struct YamlWriter {
  std::ostringstream& os;
  template <class T> void operator()(const char* name, T& v, const char* doc, Choices = {}) {
    os << "  " << name << ": " << value_str(v) << "  # " << doc << "\n";
  }
};

struct MarkdownWriter {
  std::ostringstream& os;
  template <class T> void operator()(const char* name, T& v, const char* doc, Choices choices = {}) {
    std::string type = type_name<T>();
    if (choices.size()) {
      type.clear();
      for (const char* c : choices) type += (type.empty() ? "" : " \\| ") + std::string(c);
    }
    os << "| `" << name << "` | " << type << " | `" << value_str(v) << "` | " << doc << " |\n";
  }
};

}  // namespace

std::string config_to_yaml(const Config& cfg) {
  std::ostringstream os;
  Config copy = cfg;
  os << "# Resolved Decotron config (every key; defaults included). Source: " << cfg.source << "\n";
  auto section = [&](const char* name, auto& s) {
    os << name << ":\n";
    YamlWriter w{os};
    s.fields(w);
  };
  copy.sections(section);
  return os.str();
}

std::string config_reference_markdown() {
  std::ostringstream os;
  Config cfg;
  os << "# Config reference\n\n"
        "Generated by `decotron config --doc` from the typed config structs (core/config.h); do not edit by hand.\n"
        "A config is a YAML map of the sections below. `include: base.yaml` (or a list) loads other files first,\n"
        "relative to the including file; later values win. `--set section.key=value` overrides any key after all\n"
        "files are read. Unknown keys, wrong types and impossible shapes are errors naming the file, line and key.\n";
  auto section = [&](const char* name, auto& s) {
    os << "\n## `" << name << "`\n\n| key | type | default | meaning |\n|---|---|---|---|\n";
    MarkdownWriter w{os};
    s.fields(w);
  };
  cfg.sections(section);
  return os.str();
}

}  // namespace decotron
