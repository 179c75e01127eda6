// Maps model.safetensors and checks it; converts tensors to fp32 on request.
#include "inference/model_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "inference/export.h"

namespace decotron::inference {

using json = nlohmann::json;

namespace {
constexpr uint64_t kMaxHeader = 100ull << 20;  // the safetensors limit (100 MB)
bool is_experts_down(const std::string& name) { return name.ends_with(".experts.down"); }
}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, ": cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, ": cannot stat");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail(path, ": truncated: ", size_, " bytes, shorter than the 8-byte header length");
  }
  map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail(path, ": mmap failed (", std::strerror(errno), ")");
  }
  try {
    const auto* base = static_cast<const unsigned char*>(map_);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | base[i];
    if (n == 0 || n > kMaxHeader)
      fail(path, ": bad header length ", n, " (must be 1..", kMaxHeader, "); not a safetensors file?");
    if (n > size_ - 8)
      fail(path, ": truncated: the header length says ", n, " bytes but only ", size_ - 8, " follow");
    json h;
    try {
      h = json::parse(base + 8, base + 8 + n);
    } catch (const json::exception& e) {
      fail(path, ": header is not valid JSON (", e.what(), ")");
    }
    if (!h.is_object()) fail(path, ": header is not a JSON object");
    const size_t data_start = 8 + n, data_size = size_ - data_start;
    for (const auto& [name, v] : h.items()) {
      if (name == "__metadata__") {
        if (!v.is_object()) fail(path, ": __metadata__ is not an object");
        for (const auto& [k, s] : v.items()) {
          if (!s.is_string()) fail(path, ": __metadata__.", k, " is not a string");
          metadata_[k] = s.get<std::string>();
        }
        continue;
      }
      if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
        fail(path, ": tensor '", name, "' needs dtype, shape and data_offsets");
      if (!v["dtype"].is_string()) fail(path, ": tensor '", name, "': dtype is not a string");
      const std::string dt = v["dtype"].get<std::string>();
      TensorEntry e;
      e.name = name;
      const bool padding = name.rfind("__padding__.", 0) == 0;
      if (!(padding && dt == "U8") && !parse_file_dtype(dt, e.dtype))
        fail(path, ": tensor '", name, "' has unknown dtype '", dt, "' (decotron reads F32, F16, BF16, I8)");
      const size_t esize = padding ? 1 : file_dtype_size(e.dtype);
      if (!v["shape"].is_array()) fail(path, ": tensor '", name, "': shape is not a list");
      for (const auto& d : v["shape"]) {
        if (!d.is_number_unsigned()) fail(path, ": tensor '", name, "': shape ", v["shape"].dump(), " is not a list of sizes");
        e.shape.push_back(d.get<int64_t>());
      }
      const json& off = v["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        fail(path, ": tensor '", name, "': data_offsets must be [begin, end]");
      const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
      if (b > en) fail(path, ": tensor '", name, "': data_offsets [", b, ", ", en, "] are reversed");
      if (en > data_size)
        fail(path, ": tensor '", name, "': data_offsets [", b, ", ", en, "] reach outside the file's data section of ",
             data_size, " bytes (truncated file?)");
      const uint64_t want = static_cast<uint64_t>(shape_numel(e.shape)) * esize;
      if (en - b != want)
        fail(path, ": tensor '", name, "': data_offsets cover ", en - b, " bytes but ", dt, " ", shape_str(e.shape),
             " needs ", want);
      e.data = base + data_start + b;
      e.nbytes = en - b;
      if (!padding) tensors_[name] = std::move(e);
    }
  } catch (...) {
    ::munmap(map_, size_);
    map_ = nullptr;
    throw;
  }
  auto it = metadata_.find("format");
  if (it == metadata_.end() || it->second != kExportFormatName)
    fail(path, ": __metadata__.format is not '", kExportFormatName, "'; this is not a decotron export");
  auto ver = metadata_.find("format_version");
  if (ver == metadata_.end() || ver->second != std::to_string(kExportFormatVersion))
    fail(path, ": __metadata__.format_version is '", ver == metadata_.end() ? "" : ver->second,
         "'; this decotron reads version ", kExportFormatVersion);
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

const TensorEntry& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(path_, ": tensor '", name, "' is missing");
  return it->second;
}

Tensor SafetensorsFile::read_f32(const std::string& name) const {
  const TensorEntry& e = get(name);
  Tensor out = Tensor::empty(e.shape, DType::f32);
  float* o = out.data<float>();
  const int64_t n = out.numel();
  switch (e.dtype) {
    case FileDType::f32: std::memcpy(o, e.data, n * 4); break;
    case FileDType::bf16:
    case FileDType::f16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, e.data + 2 * i, 2);
        o[i] = e.dtype == FileDType::bf16 ? bf16_to_float(b) : half_to_float(b);
      }
      break;
    case FileDType::i8: {
      const TensorEntry& s = get(name + ".scale");
      DT_ASSERT(s.dtype == FileDType::f32, "checked by check_against_config");
      const auto* q = reinterpret_cast<const int8_t*>(e.data);
      std::vector<float> scale(shape_numel(s.shape));
      std::memcpy(scale.data(), s.data, scale.size() * 4);
      const int64_t cols = e.shape.back();
      // experts.down has one scale per (expert, output channel i): [E, h] over w[e, j, i]. Told
      // by name, not by the scale's shape: [E, d] (experts.up) and [E, h] agree when d == h.
      const bool down = is_experts_down(name);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = i / cols;
        const float sc = down ? scale[(row / e.shape[1]) * cols + i % cols] : scale[row];
        o[i] = q[i] * sc;
      }
      break;
    }
  }
  return out;
}

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& m) {
  using K = ExpectedTensor::Kind;
  std::vector<ExpectedTensor> out;
  const int64_t h = m.hidden, hd = m.hidden / m.heads, kv = (m.kv_heads ? m.kv_heads : m.heads) * hd;
  const int64_t E = m.experts, d = m.expert_width;
  out.push_back({"embedding.weight", {m.vocab_size, h}, K::matrix});
  for (int64_t i = 0; i < m.layers; ++i) {
    const std::string p = cat("layers.", i, ".");
    out.push_back({p + "attn_norm.weight", {h}, K::fp32});
    out.push_back({p + "attn.wq", {h, h}, K::matrix});
    out.push_back({p + "attn.wk", {kv, h}, K::matrix});
    out.push_back({p + "attn.wv", {kv, h}, K::matrix});
    out.push_back({p + "attn.wo", {h, h}, K::matrix});
    out.push_back({p + "ffn_norm.weight", {h}, K::fp32});
    const bool deco = m.arch == "deco" && i >= m.dense_layers;
    if (!deco) {
      out.push_back({p + "ffn.w_gate", {m.ffn_hidden, h}, K::matrix});
      out.push_back({p + "ffn.w_up", {m.ffn_hidden, h}, K::matrix});
      out.push_back({p + "ffn.w_down", {h, m.ffn_hidden}, K::matrix});
      continue;
    }
    out.push_back({p + "ffn.w_router", {E, h}, K::fp32});
    if (m.expert_scaling == "expert" || m.expert_scaling == "fixed") out.push_back({p + "ffn.g", {E}, K::fp32});
    if (m.expert_scaling == "scalar") out.push_back({p + "ffn.g", {1}, K::fp32});
    out.push_back({p + "ffn.experts.up", {E, d, h}, K::matrix});
    out.push_back({p + "ffn.gamma", {d}, K::fp32});
    out.push_back({p + "ffn.experts.down", {E, d, h}, K::matrix});
    if (m.gated_experts) out.push_back({p + "ffn.experts.gate", {E, d, h}, K::matrix});
    if (m.shared_expert_width > 0) {
      const int64_t s = m.shared_expert_width;
      out.push_back({p + "ffn.shared.w_gate", {s, h}, K::matrix});
      out.push_back({p + "ffn.shared.w_up", {s, h}, K::matrix});
      out.push_back({p + "ffn.shared.w_down", {h, s}, K::matrix});
    }
  }
  out.push_back({"final_norm.weight", {h}, K::fp32});
  out.push_back({"lm_head.weight", {m.vocab_size, h}, K::matrix});
  return out;
}

void check_against_config(const SafetensorsFile& f, const ExportInfo& info, const std::string& config_path) {
  const std::string both = cat(f.path(), " (with ", config_path, ")");
  std::map<std::string, bool> expected;
  for (const ExpectedTensor& t : expected_tensors(info.model)) {
    if (!f.has(t.name)) fail(both, ": tensor '", t.name, "' is missing");
    const TensorEntry& e = f.get(t.name);
    if (e.shape != t.shape)
      fail(both, ": tensor '", t.name, "' has shape ", shape_str(e.shape), " but config.json implies ", shape_str(t.shape));
    expected[t.name] = true;
    if (t.kind == ExpectedTensor::Kind::fp32) {
      if (e.dtype != FileDType::f32) fail(both, ": tensor '", t.name, "' is ", file_dtype_name(e.dtype), ", expected F32");
      continue;
    }
    const FileDType want = info.int8 ? FileDType::i8 : info.dtype;
    if (e.dtype != want)
      fail(both, ": tensor '", t.name, "' is ", file_dtype_name(e.dtype), " but config.json says ",
           info.int8 ? "int8" : export_dtype_name(info.dtype));
    if (info.int8) {
      const std::string sn = t.name + ".scale";
      if (!f.has(sn)) fail(both, ": int8 tensor '", t.name, "' has no '", sn, "'");
      const TensorEntry& s = f.get(sn);
      const bool down = is_experts_down(t.name);
      const Shape want_s = down ? Shape{t.shape[0], t.shape[2]} : Shape(t.shape.begin(), t.shape.end() - 1);
      if (s.dtype != FileDType::f32 || s.shape != want_s)
        fail(both, ": '", sn, "' must be F32 ", shape_str(want_s), ", is ", file_dtype_name(s.dtype), " ",
             shape_str(s.shape));
      expected[sn] = true;
    }
  }
  for (const auto& [name, e] : f.tensors())
    if (!expected.count(name)) fail(both, ": unexpected tensor '", name, "' (not part of this model's config)");
}

}  // namespace decotron::inference
