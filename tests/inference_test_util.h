// Helpers of the inference tests: tiny model configs (dense, DECO and its ablations), a model
// with random weights, exports of it, and logits comparisons.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/config.h"
#include "data_test_util.h"
#include "inference/export.h"
#include "model/transformer.h"

const std::string& tiny_model();  // test_data_tokenizer.cpp: a SentencePiece model of 360 pieces

namespace decotron::inference::testing {

// vocab 384 >= the tiny tokenizer's 360 ids; head_dim 8; context 16.
inline Config tiny_infer_config(const std::string& arch) {
  Config c;
  ModelConfig& m = c.model;
  m.arch = arch;
  m.vocab_size = 384;
  m.seq_len = 16;
  m.hidden = 32;
  m.layers = 3;
  m.heads = 4;
  m.kv_heads = 2;
  m.ffn_hidden = 48;
  m.experts = 8;
  m.expert_width = 8;
  m.shared_expert_width = 16;
  m.dense_layers = 1;
  m.parameter_parity = false;
  m.init_std = 0.2;  // large enough that logits differ clearly between tokens
  validate_config(c);
  return c;
}

// A DECO config with one ablation switched ("" = the paper's defaults).
struct Variant {
  const char* name;
  const char* key;
  const char* value;
};
inline std::vector<Variant> deco_variants() {
  return {{"default", "", ""},
          {"scaling_scalar", "model.expert_scaling", "scalar"},
          {"scaling_fixed", "model.expert_scaling", "fixed"},
          {"scaling_none", "model.expert_scaling", "none"},
          {"normsilu_no_mean", "model.normsilu", "no_mean"},
          {"normsilu_no_rms", "model.normsilu", "no_rms"},
          {"normsilu_silu", "model.normsilu", "silu"},
          {"gated", "model.gated_experts", "true"},
          {"no_shared", "model.shared_expert_width", "0"}};
}
inline Config variant_config(const Variant& v) {
  Config c = tiny_infer_config("deco");
  if (*v.key) apply_override(c, std::string(v.key) + "=" + v.value);
  validate_config(c);
  return c;
}

inline std::unique_ptr<Transformer> random_model(const Config& c, uint64_t seed = 7) {
  auto m = std::make_unique<Transformer>(c.model, DType::f32, Device::cpu);
  m->params().initialize(seed);
  // g and gamma away from their constant inits, so a wrong index would show.
  for (Parameter* p : m->params().all()) {
    const bool g = p->name.size() > 6 && p->name.compare(p->name.size() - 6, 6, ".ffn.g") == 0;
    const bool gamma = p->name.find(".gamma") != std::string::npos;
    if (!g && !gamma) continue;
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.data<float>()[i] *= 1.0f + 0.1f * static_cast<float>(i % 5);
  }
  return m;
}

inline std::string export_to(Transformer& m, const Config& c, const std::string& name, FileDType dtype,
                             bool int8 = false) {
  const std::string dir = data::testing::scratch_dir("infer_" + name) + "/export";
  ExportOptions o;
  o.dtype = dtype;
  o.int8 = int8;
  export_model(m, c, tiny_model(), dir, o);
  return dir;
}

inline std::vector<int32_t> some_tokens(int64_t n, int64_t vocab, uint32_t seed = 3) {
  std::vector<int32_t> t;
  for (int64_t i = 0; i < n; ++i) {
    seed = seed * 1103515245u + 12345u;
    t.push_back(static_cast<int32_t>((seed >> 16) % vocab));
  }
  return t;
}

inline Tensor trainer_logits(Transformer& m, const std::vector<int32_t>& tokens) {
  Tensor t = Tensor::empty({static_cast<int64_t>(tokens.size())}, DType::i32);
  std::copy(tokens.begin(), tokens.end(), t.data<int32_t>());
  return m.logits(t, {1, static_cast<int64_t>(tokens.size())});
}

// max |a - b| / max |b| over all entries (b the reference).
inline double rel_error(const float* a, const float* b, int64_t n) {
  double diff = 0, ref = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    ref = std::max(ref, std::fabs(static_cast<double>(b[i])));
  }
  return diff / std::max(ref, 1e-30);
}
inline double rel_error(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  return rel_error(a.data<float>(), b.data<float>(), std::min(a.numel(), b.numel()));
}

}  // namespace decotron::inference::testing
