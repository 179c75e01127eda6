// Writes the deployable export (docs/export-format.md): the tensors are streamed one at a time
// into model.safetensors in a temporary directory that is renamed into place at the end.
#include "inference/export.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer.h"
#include "inference/export_config.h"
#include "model/transformer.h"

namespace decotron::inference {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

FileDType parse_export_dtype(const std::string& name) {
  if (name == "bf16") return FileDType::bf16;
  if (name == "fp16") return FileDType::f16;
  if (name == "fp32") return FileDType::f32;
  fail("--dtype ", name, ": the export dtype must be bf16, fp16 or fp32 (add --int8 for int8 weights)");
}

void quantize_rows_int8(const float* w, int64_t rows, int64_t cols, int8_t* q, float* scales) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w + r * cols;
    float m = 0;
    for (int64_t j = 0; j < cols; ++j) m = std::max(m, std::fabs(wr[j]));
    const float s = m > 0 ? m / 127.0f : 1.0f;
    scales[r] = s;
    for (int64_t j = 0; j < cols; ++j)
      q[r * cols + j] = static_cast<int8_t>(std::clamp(std::nearbyint(wr[j] / s), -127.0f, 127.0f));
  }
}

namespace {

// The parameter's value as a host fp32 tensor.
Tensor host_f32(const Tensor& v) {
  Tensor t = v.device() == Device::cpu ? v : v.to(Device::cpu);
  return t.dtype() == DType::f32 ? t : cast_cpu(t, DType::f32);
}

// One tensor of the file: its header entry and a function producing its bytes when written.
struct OutTensor {
  std::string name;
  FileDType dtype;
  Shape shape;
  std::function<std::vector<char>()> bytes;
  size_t nbytes() const { return shape_numel(shape) * file_dtype_size(dtype); }
};

std::vector<char> encode(const std::vector<float>& v, FileDType t) {
  std::vector<char> out(v.size() * file_dtype_size(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == FileDType::f32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      uint16_t b = t == FileDType::bf16 ? float_to_bf16(v[i]) : float_to_half(v[i]);
      std::memcpy(out.data() + 2 * i, &b, 2);
    }
  }
  return out;
}

template <class T> std::vector<char> raw_bytes(const std::vector<T>& v) {
  std::vector<char> out(v.size() * sizeof(T));
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// W_down [h, E*d] -> expert-major [E, d, h]: block e holds expert e's d columns, transposed.
std::vector<float> expert_major_down(const Parameter& p, int64_t E, int64_t d) {
  Tensor w = host_f32(p.value);
  const int64_t h = w.dim(0);
  const float* src = w.data<float>();
  std::vector<float> out(E * d * h);
  for (int64_t i = 0; i < h; ++i)
    for (int64_t c = 0; c < E * d; ++c) out[c * h + i] = src[i * E * d + c];
  return out;
}

std::vector<float> values(const Parameter& p) {
  Tensor w = host_f32(p.value);
  return std::vector<float>(w.data<float>(), w.data<float>() + w.numel());
}

// Adds the tensor `name` (fp32 values from `get`, logical shape `shape`) stored as a matrix:
// in opt.dtype, or int8 plus "<name>.scale". For experts.down the int8 scales are per
// (expert, output channel): [E, h] over the j index of the [E, d, h] block.
void add_matrix(std::vector<OutTensor>& out, const std::string& name, const Shape& shape,
                std::function<std::vector<float>()> get, const ExportOptions& opt, bool down_layout) {
  if (!opt.int8) {
    out.push_back({name, opt.dtype, shape, [get, t = opt.dtype] { return encode(get(), t); }});
    return;
  }
  const int64_t cols = shape.back(), rows = shape_numel(shape) / cols;
  Shape scale_shape = down_layout ? Shape{shape[0], shape[2]} : Shape(shape.begin(), shape.end() - 1);
  auto quantize = [get, rows, cols, down_layout, shape](std::vector<int8_t>& q, std::vector<float>& s) {
    std::vector<float> w = get();
    q.resize(w.size());
    if (!down_layout) {
      s.resize(rows);
      quantize_rows_int8(w.data(), rows, cols, q.data(), s.data());
      return;
    }
    const int64_t E = shape[0], d = shape[1], h = shape[2];
    s.assign(E * h, 0.0f);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t j = 0; j < d; ++j)
        for (int64_t i = 0; i < h; ++i) s[e * h + i] = std::max(s[e * h + i], std::fabs(w[(e * d + j) * h + i]));
    for (float& v : s) v = v > 0 ? v / 127.0f : 1.0f;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t j = 0; j < d; ++j)
        for (int64_t i = 0; i < h; ++i) {
          const int64_t k = (e * d + j) * h + i;
          q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(w[k] / s[e * h + i]), -127.0f, 127.0f));
        }
  };
  // The scales come out of the same quantization as the int8 values (written right before them).
  auto scales = std::make_shared<std::vector<float>>();
  out.push_back({name, FileDType::i8, shape, [quantize, scales] {
                   std::vector<int8_t> q;
                   quantize(q, *scales);
                   return raw_bytes(q);
                 }});
  out.push_back({name + ".scale", FileDType::f32, scale_shape, [scales] {
                   std::vector<char> b = raw_bytes(*scales);
                   scales->clear();
                   scales->shrink_to_fit();
                   return b;
                 }});
}

// The file's tensors in model order, named as docs/export-format.md lists them.
std::vector<OutTensor> plan_tensors(const ParameterSet& params, const ModelConfig& m, const ExportOptions& opt) {
  std::vector<OutTensor> out;
  const int64_t E = m.experts, d = m.expert_width, h = m.hidden;
  for (Parameter* pp : params.all()) {
    const Parameter& p = *pp;
    const Shape& shape = p.value.shape();
    const std::string& n = p.name;
    auto ends_with = [&](const char* s) {
      const std::string t(s);
      return n.size() >= t.size() && n.compare(n.size() - t.size(), t.size(), t) == 0;
    };
    if (p.partition == Partition::expert_rows) {  // W_up / W_gate of a DECO FFN: rows already expert-major
      const std::string base = n.substr(0, n.rfind('.'));
      const std::string name = base + (ends_with(".w_up") ? ".experts.up" : ".experts.gate");
      add_matrix(out, name, {E, d, h}, [pp] { return values(*pp); }, opt, false);
    } else if (p.partition == Partition::expert_cols) {  // W_down of a DECO FFN: transposed per expert
      const std::string base = n.substr(0, n.rfind('.'));
      add_matrix(out, base + ".experts.down", {E, d, h}, [pp, E, d] { return expert_major_down(*pp, E, d); }, opt,
                 true);
    } else if (shape.size() == 1 || ends_with(".w_router")) {  // vectors and the router: always fp32
      out.push_back({n, FileDType::f32, shape, [pp] { return encode(values(*pp), FileDType::f32); }});
    } else {
      add_matrix(out, n, shape, [pp] { return values(*pp); }, opt, false);
    }
  }
  return out;
}

void write_all(std::ofstream& f, const std::vector<char>& b, const std::string& path) {
  f.write(b.data(), static_cast<std::streamsize>(b.size()));
  if (!f) fail(path, ": write failed (disk full?)");
}

// Streams the tensors into a safetensors file. Every tensor starts 8-byte aligned: where the
// previous one ends unaligned, an explicit "__padding__.K" U8 entry fills the gap, so the data
// buffer has no holes (the safetensors rule) and standard readers accept the file.
void write_safetensors(const std::string& path, std::vector<OutTensor>& tensors) {
  json header;
  header["__metadata__"] = {{"format", kExportFormatName}, {"format_version", std::to_string(kExportFormatVersion)}};
  std::vector<std::pair<size_t, size_t>> padding;  // (index of the tensor it precedes, bytes)
  size_t off = 0;
  int pads = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (off % 8) {
      const size_t k = 8 - off % 8;
      header[cat("__padding__.", pads++)] = {{"dtype", "U8"}, {"shape", {k}}, {"data_offsets", {off, off + k}}};
      padding.push_back({i, k});
      off += k;
    }
    const OutTensor& t = tensors[i];
    header[t.name] = {{"dtype", file_dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + t.nbytes()}}};
    off += t.nbytes();
  }
  std::string hs = header.dump();
  while ((8 + hs.size()) % 8) hs.push_back(' ');  // the data section starts 8-byte aligned
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail(path, ": cannot create the file");
  const uint64_t n = hs.size();
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));  // little-endian
  f.write(reinterpret_cast<const char*>(len), 8);
  f.write(hs.data(), static_cast<std::streamsize>(hs.size()));
  size_t next_pad = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (next_pad < padding.size() && padding[next_pad].first == i)
      write_all(f, std::vector<char>(padding[next_pad++].second, 0), path);
    std::vector<char> b = tensors[i].bytes();
    DT_ASSERT(b.size() == tensors[i].nbytes(), tensors[i].name, ": ", b.size(), " bytes, expected ", tensors[i].nbytes());
    write_all(f, b, path);
  }
  f.close();
  if (!f) fail(path, ": write failed");
}

}  // namespace

void export_model(const ParameterSet& params, const Config& cfg, const std::string& tokenizer_model,
                  const std::string& out_dir, const ExportOptions& opt) {
  if (opt.dtype == FileDType::i8) fail("export: dtype int8 is chosen with the int8 option (--int8), not --dtype");
  const fs::path out = fs::path(out_dir).lexically_normal();
  if (out.empty() || out.filename().empty()) fail("export: invalid output directory '", out_dir, "'");
  if (fs::exists(out) && (!fs::is_directory(out) || !fs::is_empty(out)) && !opt.force)
    fail(out_dir, ": exists and is not empty; choose another --out or pass --force to replace it");
  data::Tokenizer tok(tokenizer_model);
  if (tok.vocab_size() > cfg.model.vocab_size)
    fail(tokenizer_model, ": the tokenizer has ", tok.vocab_size(), " ids but model.vocab_size is ", cfg.model.vocab_size,
         "; export the tokenizer the model was trained with");

  const fs::path tmp = out.parent_path() / cat(".", out.filename().string(), ".tmp-", ::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    std::vector<OutTensor> tensors = plan_tensors(params, cfg.model, opt);
    write_safetensors((tmp / "model.safetensors").string(), tensors);
    ExportInfo info;
    info.model = cfg.model;
    info.dtype = opt.dtype;
    info.int8 = opt.int8;
    info.tokenizer_vocab = tok.vocab_size();
    info.eod_id = tok.eod_id();
    info.bos_id = tok.bos_id();
    info.pad_id = tok.pad_id();
    {
      std::ofstream c(tmp / "config.json");
      c << export_info_to_json(info) << "\n";
      if (!c) fail((tmp / "config.json").string(), ": write failed");
    }
    fs::copy_file(tokenizer_model, tmp / "tokenizer.model");
    if (fs::exists(out)) fs::remove_all(out);
    fs::rename(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

void export_model(Transformer& model, const Config& cfg, const std::string& tokenizer_model,
                  const std::string& out_dir, const ExportOptions& opt) {
  export_model(model.params(), cfg, tokenizer_model, out_dir, opt);
}

}  // namespace decotron::inference
