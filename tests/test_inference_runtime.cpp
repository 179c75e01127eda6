// The CPU runtime against the trainer: export a Transformer, load it, and compare logits of
// prefill and of token-by-token decode through the KV cache with Transformer::logits; the
// sparse active-expert FFN against the trainer's dense-masked DECO FFN.
//
// Bounds (relative error = max |runtime - trainer| / max |trainer| over all logits):
//   fp32 export                                   < 1e-5
//   bf16 / fp16 export vs the trainer model whose
//     matrices are rounded to bf16 / fp16 the same way            < 1e-5 (same weights: only
//     the order of fp32 operations differs)
//   bf16 export vs the unrounded fp32 model        < 3e-2 (bf16 keeps 8 mantissa bits)
//   int8 export vs the trainer model holding the dequantized weights  < 1e-5
//   int8 export vs the unquantized fp32 model      < 1e-1 (per-channel int8: error up to 1/254 of
//     a row's max per weight; measured 0.068 on these 32-wide random rows with std 0.2)
#include "inference/runtime.h"

#include "inference/file_dtype.h"
#include "inference_test_util.h"
#include "model/layers.h"

using namespace decotron;
using namespace decotron::inference;
using namespace decotron::inference::testing;

namespace {

// Prefill of all tokens, token-by-token decode, and prefill-then-decode all match `ref` rows.
void expect_runtime_matches(Model& rt, const std::vector<int32_t>& tok, const Tensor& ref, double bound,
                            const std::string& what) {
  const int64_t n = static_cast<int64_t>(tok.size()), V = ref.dim(1);
  rt.reset();
  Tensor pre = rt.forward(tok, true);
  EXPECT_LT(rel_error(pre, ref), bound) << what << ": prefill";
  rt.reset();
  for (int64_t i = 0; i < n; ++i) {
    Tensor l = rt.forward(std::span<const int32_t>(&tok[i], 1), false);
    EXPECT_LT(rel_error(l.data<float>(), ref.data<float>() + i * V, V), bound) << what << ": decode position " << i;
  }
  rt.reset();
  const int64_t k = n / 2;
  rt.forward(std::span<const int32_t>(tok.data(), k), false);
  Tensor rest = rt.forward(std::span<const int32_t>(tok.data() + k, n - k), true);  // several rows over the cache
  EXPECT_LT(rel_error(rest.data<float>(), ref.data<float>() + k * V, (n - k) * V), bound) << what << ": prefill + chunk";
  EXPECT_EQ(rt.position(), n);
}

// Sets the trainer model's matrices to what the runtime loaded (the export's dtype, widened).
void load_runtime_weights(Transformer& m, const Model& rt) {
  const ModelConfig& c = m.config();
  for (Parameter* p : m.params().all()) {
    const std::string& n = p->name;
    float* dst = p->value.data<float>();
    const std::string base = n.substr(0, n.rfind('.'));
    if (p->partition == Partition::expert_rows) {
      const Tensor& w = rt.weight(base + (n.ends_with(".w_up") ? ".experts.up" : ".experts.gate"));
      std::copy_n(w.data<float>(), w.numel(), dst);
    } else if (p->partition == Partition::expert_cols) {
      const Tensor& w = rt.weight(base + ".experts.down");  // [E, d, h] -> W_down [h, E*d]
      const int64_t ed = c.experts * c.expert_width, h = c.hidden;
      for (int64_t col = 0; col < ed; ++col)
        for (int64_t i = 0; i < h; ++i) dst[i * ed + col] = w.data<float>()[col * h + i];
    } else {
      const Tensor& w = rt.weight(n);
      std::copy_n(w.data<float>(), w.numel(), dst);
    }
  }
}

// Rounds every matrix the export stores in `t` (not the router, not vectors) through that dtype.
void round_matrices(Transformer& m, FileDType t) {
  for (Parameter* p : m.params().all()) {
    if (p->value.ndim() < 2 || p->name.ends_with(".w_router")) continue;
    float* v = p->value.data<float>();
    for (int64_t i = 0; i < p->value.numel(); ++i)
      v[i] = t == FileDType::bf16 ? bf16_to_float(float_to_bf16(v[i])) : half_to_float(float_to_half(v[i]));
  }
}

}  // namespace

TEST(InferenceRuntime, DenseFp32MatchesTrainer) {
  Config c = tiny_infer_config("dense");
  auto m = random_model(c);
  Model rt(export_to(*m, c, "dense_fp32", FileDType::f32));
  auto tok = some_tokens(c.model.seq_len, 360);
  expect_runtime_matches(rt, tok, trainer_logits(*m, tok), 1e-5, "dense fp32");
  EXPECT_EQ(rt.counters().active_pairs, 0);
}

TEST(InferenceRuntime, DecoFp32MatchesTrainerForEveryAblation) {
  for (const Variant& v : deco_variants()) {
    Config c = variant_config(v);
    auto m = random_model(c);
    Model rt(export_to(*m, c, std::string("deco_") + v.name, FileDType::f32));
    auto tok = some_tokens(c.model.seq_len, 360, 11);
    rt.reset_counters();
    expect_runtime_matches(rt, tok, trainer_logits(*m, tok), 1e-5, v.name);
    // The routers really are sparse here: some but not all experts fire.
    const double ratio = rt.counters().activation_ratio();
    EXPECT_GT(ratio, 0.05) << v.name;
    EXPECT_LT(ratio, 0.95) << v.name;
  }
}

TEST(InferenceRuntime, HalfPrecisionExportsMatchRoundedTrainer) {
  for (const char* arch : {"dense", "deco"}) {
    for (FileDType t : {FileDType::bf16, FileDType::f16}) {
      Config c = tiny_infer_config(arch);
      auto m = random_model(c);
      auto tok = some_tokens(c.model.seq_len, 360, 5);
      Tensor exact = trainer_logits(*m, tok);
      Model rt(export_to(*m, c, cat(arch, "_", file_dtype_name(t)), t));
      round_matrices(*m, t);
      const std::string what = cat(arch, " ", file_dtype_name(t));
      expect_runtime_matches(rt, tok, trainer_logits(*m, tok), 1e-5, what + " vs rounded trainer");
      rt.reset();
      EXPECT_LT(rel_error(rt.forward(tok, true), exact), 3e-2) << what << " vs fp32 trainer";
    }
  }
}

TEST(InferenceRuntime, Int8ExportMatchesDequantizedTrainer) {
  for (const char* arch : {"dense", "deco"}) {
    Config c = tiny_infer_config(arch);
    auto m = random_model(c);
    auto tok = some_tokens(c.model.seq_len, 360, 9);
    Tensor exact = trainer_logits(*m, tok);
    Model rt(export_to(*m, c, cat(arch, "_int8"), FileDType::bf16, /*int8=*/true));
    rt.reset();
    EXPECT_LT(rel_error(rt.forward(tok, true), exact), 1e-1) << arch << " int8 vs fp32 trainer";
    // Each weight is within half a quantization step of the original.
    const Tensor& wq = rt.weight("layers.0.attn.wq");
    const Tensor& orig = m->params().find("layers.0.attn.wq").value;
    for (int64_t r = 0; r < wq.dim(0); ++r) {
      float mx = 0;
      for (int64_t j = 0; j < wq.dim(1); ++j) mx = std::max(mx, std::fabs(orig.data<float>()[r * wq.dim(1) + j]));
      for (int64_t j = 0; j < wq.dim(1); ++j)
        ASSERT_LE(std::fabs(wq.data<float>()[r * wq.dim(1) + j] - orig.data<float>()[r * wq.dim(1) + j]),
                  mx / 127 * 0.5001);
    }
    load_runtime_weights(*m, rt);
    expect_runtime_matches(rt, tok, trainer_logits(*m, tok), 1e-5, cat(arch, " int8 vs dequantized trainer"));
  }
}

// The sparse FFN (active experts' blocks only, mean via x . w_bar) equals the trainer's dense
// computation (all experts, then masked by s = ReLU(r) g), for every ablation.
TEST(InferenceRuntime, SparseDecoFfnEqualsDenseMasked) {
  for (const Variant& v : deco_variants()) {
    Config c = variant_config(v);
    auto m = random_model(c, 21);
    Model rt(export_to(*m, c, std::string("ffn_") + v.name, FileDType::f32));
    ParameterSet ps(DType::f32, Device::cpu);
    DecoFFNLayer dense(ps, "layers.1.ffn", c.model);
    for (Parameter* p : ps.all()) p->value.copy_from(m->params().find(p->name).value);
    const int64_t T = 12, h = c.model.hidden;
    Tensor x = Tensor::empty({T, h}, DType::f32);
    for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = static_cast<float>(std::sin(0.7 * i + 0.3) * 1.5);
    RoutingStats stats;
    double reg = 0;
    Tensor want = dense.forward(x, {}, stats, reg);
    rt.reset_counters();
    Tensor got = rt.deco_ffn(1, x);
    EXPECT_LT(rel_error(got, want), 1e-5) << v.name;
    EXPECT_EQ(rt.counters().active_pairs, stats.active_pairs) << v.name;
    EXPECT_GT(stats.active_pairs, 0) << v.name;
    EXPECT_LT(stats.active_pairs, T * c.model.experts) << v.name;
  }
}

// mean(W_up x) = x . w_bar: the identity the sparse NormSiLU rests on, checked on one token.
TEST(InferenceRuntime, MeanIdentityHolds) {
  Config c = tiny_infer_config("deco");
  auto m = random_model(c, 5);
  const Tensor& w = m->params().find("layers.2.ffn.w_up").value;
  const int64_t rows = w.dim(0), h = w.dim(1);
  std::vector<double> x(h), wbar(h, 0.0);
  for (int64_t j = 0; j < h; ++j) x[j] = std::cos(1.3 * j);
  double mean_u = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double u = 0;
    for (int64_t j = 0; j < h; ++j) {
      u += w.data<float>()[r * h + j] * x[j];
      wbar[j] += w.data<float>()[r * h + j] / rows;
    }
    mean_u += u / rows;
  }
  double dot = 0;
  for (int64_t j = 0; j < h; ++j) dot += x[j] * wbar[j];
  EXPECT_NEAR(mean_u, dot, 1e-12);
}

// A single decode step reads the dense weights once and, per DECO layer, only the active
// experts' blocks.
TEST(InferenceRuntime, DecodeCountsOnlyActiveExpertBytes) {
  Config c = tiny_infer_config("deco");
  auto m = random_model(c);
  Model rt(export_to(*m, c, "bytes", FileDType::f32));
  const int32_t t0 = 17, t1 = 42;
  rt.forward(std::span<const int32_t>(&t0, 1), false);
  rt.reset_counters();
  rt.forward(std::span<const int32_t>(&t1, 1), false);
  const ModelConfig& mc = c.model;
  const int64_t deco_layers = mc.layers - mc.dense_layers;
  const double all_experts = 4.0 * deco_layers * mc.experts * 2 * mc.expert_width * mc.hidden;
  const double expert_bytes = 4.0 * rt.counters().active_pairs * 2 * mc.expert_width * mc.hidden;
  // Bytes read = everything loaded - the inactive experts' blocks - the unused embedding rows.
  const double loaded = static_cast<double>(rt.weight_bytes_loaded());
  const double embedding_unread = 4.0 * (mc.vocab_size - 1) * mc.hidden;
  EXPECT_NEAR(rt.counters().weight_bytes_f32, loaded - (all_experts - expert_bytes) - embedding_unread + 4.0 * deco_layers * mc.hidden,
              1.0);
  EXPECT_EQ(rt.counters().routed_pairs, deco_layers * mc.experts);
}

TEST(InferenceRuntime, ContextOverflowIsAnError) {
  Config c = tiny_infer_config("dense");
  auto m = random_model(c);
  Model rt(export_to(*m, c, "overflow", FileDType::f32));
  auto tok = some_tokens(c.model.seq_len, 360);
  rt.forward(tok, false);
  const int32_t one = 1;
  data::testing::expect_error([&] { rt.forward(std::span<const int32_t>(&one, 1), false); }, {"context is 16 tokens"});
}

// int8 scales: per row for experts.up ([E, d]), per (expert, output channel) for experts.down
// ([E, h]); with d == h both shapes agree and the reader must still tell them apart.
TEST(InferenceRuntime, Int8ExpertScalesWhenWidthEqualsHidden) {
  Config c = tiny_infer_config("deco");
  apply_override(c, "model.hidden=16");
  apply_override(c, "model.heads=2");
  apply_override(c, "model.expert_width=16");
  validate_config(c);
  auto m = random_model(c);
  Model rt(export_to(*m, c, "int8_d_eq_h", FileDType::f32, /*int8=*/true));
  const int64_t E = c.model.experts, d = 16, h = 16;
  const float* up = rt.weight("layers.1.ffn.experts.up").data<float>();
  const float* down = rt.weight("layers.1.ffn.experts.down").data<float>();
  const float* w_up = m->params().find("layers.1.ffn.w_up").value.data<float>();
  const float* w_down = m->params().find("layers.1.ffn.w_down").value.data<float>();
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t j = 0; j < d; ++j) {  // experts.up: one scale per row (e, j)
      float mx = 0;
      for (int64_t i = 0; i < h; ++i) mx = std::max(mx, std::fabs(w_up[(e * d + j) * h + i]));
      for (int64_t i = 0; i < h; ++i)
        ASSERT_LE(std::fabs(up[(e * d + j) * h + i] - w_up[(e * d + j) * h + i]), mx / 127 * 0.5001) << e << " " << j;
    }
    for (int64_t i = 0; i < h; ++i) {  // experts.down: one scale per (e, i) over j
      float mx = 0;
      for (int64_t j = 0; j < d; ++j) mx = std::max(mx, std::fabs(w_down[i * E * d + e * d + j]));
      for (int64_t j = 0; j < d; ++j)
        ASSERT_LE(std::fabs(down[(e * d + j) * h + i] - w_down[i * E * d + e * d + j]), mx / 127 * 0.5001) << e << " " << i;
    }
  }
}
