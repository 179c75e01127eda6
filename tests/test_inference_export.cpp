// The export format (docs/export-format.md): safetensors layout, metadata, expert-major
// expert tensors, config.json, atomic write and overwrite refusal; and every corruption of
// the file giving a clear error that names the file.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "inference/export_config.h"
#include "inference/model_file.h"
#include "inference/runtime.h"
#include "inference_test_util.h"

using namespace decotron;
using namespace decotron::inference;
using namespace decotron::inference::testing;
using decotron::data::testing::expect_error;
using decotron::data::testing::read_bytes;
using decotron::data::testing::write_bytes;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

struct RawFile {
  json header;
  std::vector<unsigned char> data;  // the data section
};

RawFile read_raw(const std::string& path) {
  auto b = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[i];
  RawFile r;
  r.header = json::parse(b.begin() + 8, b.begin() + 8 + n);
  r.data.assign(b.begin() + 8 + n, b.end());
  return r;
}

void write_raw(const std::string& path, const RawFile& r) {
  std::string h = r.header.dump();
  while ((8 + h.size()) % 8) h.push_back(' ');
  std::vector<unsigned char> b(8);
  for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(static_cast<uint64_t>(h.size()) >> (8 * i));
  b.insert(b.end(), h.begin(), h.end());
  b.insert(b.end(), r.data.begin(), r.data.end());
  write_bytes(path, b);
}

// A fresh copy of a tiny DECO export in its own directory.
std::string fresh_export(const std::string& name) {
  static Config c = tiny_infer_config("deco");
  static auto m = random_model(c);
  return export_to(*m, c, name, FileDType::bf16);
}

}  // namespace

TEST(InferenceExport, SafetensorsLayoutAndExpertMajorTensors) {
  Config c = tiny_infer_config("deco");
  auto m = random_model(c);
  const std::string dir = export_to(*m, c, "layout", FileDType::f32);
  for (const char* f : {"model.safetensors", "config.json", "tokenizer.model"}) EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
  EXPECT_EQ(read_bytes(dir + "/tokenizer.model"), read_bytes(tiny_model()));
  // No temporary directory is left beside the export.
  for (const auto& e : fs::directory_iterator(fs::path(dir).parent_path()))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();

  RawFile raw = read_raw(dir + "/model.safetensors");
  EXPECT_EQ(raw.header["__metadata__"]["format"], "decotron-export");
  EXPECT_EQ(raw.header["__metadata__"]["format_version"], "1");
  // Every tensor starts 8-byte aligned in the file; the data section has no holes.
  const size_t header_bytes = read_bytes(dir + "/model.safetensors").size() - raw.data.size();
  EXPECT_EQ(header_bytes % 8, 0u);
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const auto& [name, v] : raw.header.items()) {
    if (name == "__metadata__") continue;
    spans.push_back({v["data_offsets"][0], v["data_offsets"][1]});
    if (name.rfind("__padding__", 0) != 0) EXPECT_EQ(spans.back().first % 8, 0u) << name;
  }
  std::sort(spans.begin(), spans.end());
  uint64_t at = 0;
  for (auto [b, e] : spans) {
    EXPECT_EQ(b, at);
    at = e;
  }
  EXPECT_EQ(at, raw.data.size());

  // experts.up is W_up's rows as [E, d, h]; experts.down block e is W_down's columns of expert e, transposed.
  SafetensorsFile f(dir + "/model.safetensors");
  const ModelConfig& mc = c.model;
  const int64_t E = mc.experts, d = mc.expert_width, h = mc.hidden;
  EXPECT_EQ(f.get("layers.1.ffn.experts.up").shape, (Shape{E, d, h}));
  EXPECT_EQ(f.get("layers.1.ffn.experts.down").shape, (Shape{E, d, h}));
  EXPECT_FALSE(f.has("layers.1.ffn.w_up"));
  Tensor up = f.read_f32("layers.1.ffn.experts.up"), down = f.read_f32("layers.1.ffn.experts.down");
  const Tensor& w_up = m->params().find("layers.1.ffn.w_up").value;
  const Tensor& w_down = m->params().find("layers.1.ffn.w_down").value;
  for (int64_t e : {0L, 3L, E - 1})
    for (int64_t j = 0; j < d; ++j)
      for (int64_t i = 0; i < h; ++i) {
        ASSERT_EQ(up.data<float>()[(e * d + j) * h + i], w_up.data<float>()[(e * d + j) * h + i]);
        ASSERT_EQ(down.data<float>()[(e * d + j) * h + i], w_down.data<float>()[i * E * d + e * d + j]);
      }

  ExportInfo info = read_export_info(dir + "/config.json");
  EXPECT_EQ(info.model.experts, E);
  EXPECT_EQ(info.model.arch, "deco");
  EXPECT_EQ(info.dtype, FileDType::f32);
  EXPECT_FALSE(info.int8);
  EXPECT_EQ(info.tokenizer_vocab, 360);
  EXPECT_GE(info.eod_id, 0);
}

TEST(InferenceExport, DtypesOfTheTensors) {
  Config c = tiny_infer_config("deco");
  apply_override(c, "model.gated_experts=true");
  auto m = random_model(c);
  SafetensorsFile bf(export_to(*m, c, "dtypes_bf16", FileDType::bf16) + "/model.safetensors");
  EXPECT_EQ(bf.get("layers.0.attn.wq").dtype, FileDType::bf16);
  EXPECT_EQ(bf.get("layers.1.ffn.experts.gate").dtype, FileDType::bf16);
  EXPECT_EQ(bf.get("layers.1.ffn.w_router").dtype, FileDType::f32);  // the router stays fp32
  EXPECT_EQ(bf.get("layers.1.ffn.gamma").dtype, FileDType::f32);
  EXPECT_EQ(bf.get("final_norm.weight").dtype, FileDType::f32);
  SafetensorsFile q(export_to(*m, c, "dtypes_int8", FileDType::bf16, true) + "/model.safetensors");
  EXPECT_EQ(q.get("lm_head.weight").dtype, FileDType::i8);
  EXPECT_EQ(q.get("lm_head.weight.scale").shape, (Shape{c.model.vocab_size}));
  EXPECT_EQ(q.get("layers.1.ffn.experts.up.scale").shape, (Shape{c.model.experts, c.model.expert_width}));
  EXPECT_EQ(q.get("layers.1.ffn.experts.down.scale").shape, (Shape{c.model.experts, c.model.hidden}));
  EXPECT_EQ(q.get("layers.1.ffn.w_router").dtype, FileDType::f32);
}

TEST(InferenceExport, RefusesToOverwriteUnlessForced) {
  Config c = tiny_infer_config("dense");
  auto m = random_model(c);
  const std::string dir = export_to(*m, c, "overwrite", FileDType::bf16);
  ExportOptions o;
  expect_error([&] { export_model(*m, c, tiny_model(), dir, o); }, {dir, "not empty", "--force"});
  o.force = true;
  o.dtype = FileDType::f32;
  export_model(*m, c, tiny_model(), dir, o);
  EXPECT_EQ(read_export_info(dir + "/config.json").dtype, FileDType::f32);
  // An empty existing directory is fine.
  const std::string empty = data::testing::scratch_dir("infer_empty_out");
  export_model(*m, c, tiny_model(), empty, ExportOptions{});
  EXPECT_TRUE(fs::exists(empty + "/model.safetensors"));
  // A tokenizer larger than the model's vocabulary is refused before anything is written.
  Config small = c;
  small.model.vocab_size = 100;
  Transformer sm(small.model, DType::f32, Device::cpu);
  expect_error([&] { export_model(sm, small, tiny_model(), empty + "_small", ExportOptions{}); }, {"360 ids", "vocab_size is 100"});
  EXPECT_FALSE(fs::exists(empty + "_small"));
}

TEST(InferenceExport, HalfConversionRoundsToNearestEven) {
  for (float v : {0.0f, 1.0f, -2.5f, 65504.0f, 1e-3f, 6.1035156e-05f, 5.9604645e-08f, 3.0e-06f, -7.5e-07f}) {
    const float back = half_to_float(float_to_half(v));
    EXPECT_NEAR(back, v, std::max(std::fabs(v) * 1e-3f, 3e-8f)) << v;
  }
  EXPECT_EQ(float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);              // rounds to Inf
  EXPECT_EQ(float_to_half(5.9604645e-08f), 0x0001);        // smallest subnormal
  EXPECT_EQ(float_to_half(1.0f + 1.0f / 2048), 0x3c00);    // a tie rounds to even
  EXPECT_EQ(float_to_half(1.0f + 3.0f / 2048), 0x3c02);
  EXPECT_EQ(half_to_float(0x0001), 5.9604645e-08f);
}

// ---- corrupted files: each is a decotron::Error that names the file and the problem --------

TEST(InferenceExport, BadHeaderLength) {
  const std::string dir = fresh_export("bad_len");
  const std::string p = dir + "/model.safetensors";
  auto b = read_bytes(p);
  for (int i = 0; i < 8; ++i) b[i] = 0xff;
  write_bytes(p, b);
  expect_error([&] { Model m(dir); }, {p, "bad header length"});
  b[7] = 0;
  b[6] = 0;
  b[5] = 0;
  b[4] = 0;
  b[3] = 0;
  b[2] = 0x10;  // 1 MB: longer than the file
  write_bytes(p, b);
  expect_error([&] { Model m(dir); }, {p, "truncated", "header length"});
  write_bytes(p, {1, 2, 3});
  expect_error([&] { Model m(dir); }, {p, "truncated"});
}

TEST(InferenceExport, OffsetsOutsideTheFile) {
  const std::string dir = fresh_export("bad_offsets");
  const std::string p = dir + "/model.safetensors";
  RawFile r = read_raw(p);
  const uint64_t end = r.data.size();
  r.header["lm_head.weight"]["data_offsets"] = {end - 8, end + 100};
  write_raw(p, r);
  expect_error([&] { Model m(dir); }, {p, "lm_head.weight", "outside the file"});
  r.header["lm_head.weight"]["data_offsets"] = {0, 8};  // inside, but the wrong size for its shape
  write_raw(p, r);
  expect_error([&] { Model m(dir); }, {p, "lm_head.weight", "needs"});
}

TEST(InferenceExport, UnknownDtype) {
  const std::string dir = fresh_export("bad_dtype");
  const std::string p = dir + "/model.safetensors";
  RawFile r = read_raw(p);
  r.header["layers.0.attn.wq"]["dtype"] = "F8_E4M3";
  write_raw(p, r);
  expect_error([&] { Model m(dir); }, {p, "layers.0.attn.wq", "unknown dtype 'F8_E4M3'"});
}

TEST(InferenceExport, ShapeMismatchWithConfig) {
  const std::string dir = fresh_export("bad_shape");
  json cfg = json::parse(std::ifstream(dir + "/config.json"));
  cfg["model"]["ffn_hidden"] = 40;  // layer 0 is dense: its FFN no longer matches
  std::ofstream(dir + "/config.json") << cfg.dump(2);
  expect_error([&] { Model m(dir); }, {dir + "/model.safetensors", "config.json", "layers.0.ffn.w_gate", "[48, 32]", "[40, 32]"});
}

TEST(InferenceExport, DtypeMismatchWithConfig) {
  const std::string dir = fresh_export("bad_cfg_dtype");
  json cfg = json::parse(std::ifstream(dir + "/config.json"));
  cfg["weights"]["dtype"] = "fp16";
  std::ofstream(dir + "/config.json") << cfg.dump(2);
  expect_error([&] { Model m(dir); }, {"model.safetensors", "is BF16", "fp16"});
}

TEST(InferenceExport, TruncatedFile) {
  const std::string dir = fresh_export("truncated");
  const std::string p = dir + "/model.safetensors";
  auto b = read_bytes(p);
  b.resize(b.size() - 100);
  write_bytes(p, b);
  expect_error([&] { Model m(dir); }, {p, "outside the file", "truncated"});
}

TEST(InferenceExport, MissingAndUnexpectedTensors) {
  const std::string dir = fresh_export("missing");
  const std::string p = dir + "/model.safetensors";
  RawFile r = read_raw(p);
  RawFile orig = r;
  r.header.erase("layers.2.ffn.experts.down");
  write_raw(p, r);
  expect_error([&] { Model m(dir); }, {p, "layers.2.ffn.experts.down", "missing"});
  r = orig;
  r.header["extra.weight"] = r.header["final_norm.weight"];
  write_raw(p, r);
  expect_error([&] { Model m(dir); }, {p, "unexpected tensor 'extra.weight'"});
}

TEST(InferenceExport, MissingFilesAndBadConfig) {
  const std::string dir = fresh_export("missing_files");
  fs::remove(dir + "/model.safetensors");
  expect_error([&] { Model m(dir); }, {dir + "/model.safetensors", "cannot open"});
  const std::string dir2 = fresh_export("bad_config");
  json cfg = json::parse(std::ifstream(dir2 + "/config.json"));
  cfg["format_version"] = 99;
  std::ofstream(dir2 + "/config.json") << cfg.dump(2);
  expect_error([&] { Model m(dir2); }, {dir2 + "/config.json", "format_version 99"});
  cfg["format_version"] = 1;
  cfg["model"]["hiden"] = 3;
  std::ofstream(dir2 + "/config.json") << cfg.dump(2);
  expect_error([&] { Model m(dir2); }, {dir2 + "/config.json", "unknown key model.hiden"});
  fs::remove(dir2 + "/config.json");
  expect_error([&] { Model m(dir2); }, {dir2 + "/config.json", "cannot open"});
  const std::string dir3 = fresh_export("not_export");
  RawFile r = read_raw(dir3 + "/model.safetensors");
  r.header.erase("__metadata__");
  write_raw(dir3 + "/model.safetensors", r);
  expect_error([&] { Model m(dir3); }, {dir3 + "/model.safetensors", "not a decotron export"});
}
