// Whole tiny models (dense and DECO with each ablation) against float64 finite differences of
// the full objective: mean cross-entropy + the sparsity regularizer.
#include "model/transformer.h"
#include "tests/grad_check.h"

using namespace decotron;
using namespace decotron::testing;

namespace {

ModelConfig tiny(const std::string& arch) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = 11;
  c.seq_len = 5;
  c.hidden = 8;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.ffn_hidden = 12;
  c.experts = 4;
  c.expert_width = 3;
  c.shared_expert_width = 2;
  c.dense_layers = 1;
  c.parameter_parity = false;
  c.init_std = 0.4;  // large enough that every path carries a visible gradient
  c.router_scale_init = 0.5;
  return c;
}

// calibrate: bench train's routing calibration (DecoFFNLayer::calibrate_routing), fixed at the
// first forward: the gradients are then those of the shifted router.
void check_model(const ModelConfig& cfg, RegularizerSpec reg, int64_t loss_chunk_tokens = 0, double calibrate = 0) {
  Transformer model(cfg, DType::f64, Device::cpu);
  model.set_loss_chunk_tokens(loss_chunk_tokens);
  model.params().initialize(3);
  if (calibrate > 0) model.calibrate_routing(calibrate);
  BatchShape bs{2, 5};
  Tensor tok = Tensor::empty({10}, DType::i32), tgt = Tensor::empty({10}, DType::i32);
  for (int i = 0; i < 10; ++i) {
    tok.data<int32_t>()[i] = (i * 7 + 2) % 11;
    tgt.data<int32_t>()[i] = (i * 5 + 1) % 11;
  }
  const double scale = 0.5;  // as with two micro-batches of accumulation
  auto objective = [&] {
    ForwardResult r = model.forward(tok, tgt, bs, reg, scale, false);
    return scale * (r.lm_loss_sum / r.tokens + r.reg_loss);
  };
  model.params().zero_grad();
  ForwardResult r = model.forward(tok, tgt, bs, reg, scale, true);
  if (cfg.arch == "deco") {
    ASSERT_EQ(r.routing.size(), 1u);
    if (calibrate > 0)  // round(ratio x 10 tokens) per expert
      for (int64_t n : r.routing[0].active_per_expert) EXPECT_EQ(n, std::llround(calibrate * 10));
    ASSERT_GT(r.routing[0].active_pairs, 0);
    ASSERT_LT(r.routing[0].active_pairs, 40);  // some inactive pairs exercise the ReLU kink's zero side
  }
  model.backward(scale);
  for (Parameter* p : model.params().all()) {
    if (!p->trainable) continue;
    expect_gradient(p->name, p->value, p->grad, objective, 2e-6, 60);
  }
}

}  // namespace

TEST(ModelGradient, Dense) { check_model(tiny("dense"), {}); }

TEST(ModelGradient, DecoEntropyRegularized) {
  check_model(tiny("deco"), {RegularizerSpec::Kind::entropy, 0.3, 0.2});
}

// The LM head + cross-entropy in chunks of 3 of the 10 tokens (3 + 3 + 3 + 1): finite
// differences, and the same loss and gradients as the whole micro-batch at once.
TEST(ModelGradient, ChunkedLossHead) {
  ModelConfig c = tiny("deco");
  check_model(c, {RegularizerSpec::Kind::entropy, 0.3, 0.2}, 3);
  Transformer whole(c, DType::f64, Device::cpu), chunked(c, DType::f64, Device::cpu);
  chunked.set_loss_chunk_tokens(3);
  whole.params().initialize(5);
  chunked.params().initialize(5);
  BatchShape bs{2, 5};
  Tensor tok = Tensor::empty({10}, DType::i32), tgt = Tensor::empty({10}, DType::i32);
  for (int i = 0; i < 10; ++i) tok.data<int32_t>()[i] = (i * 3 + 1) % 11, tgt.data<int32_t>()[i] = (i * 7) % 11;
  RegularizerSpec reg{RegularizerSpec::Kind::entropy, 0.2, 0.2};
  ForwardResult a = whole.forward(tok, tgt, bs, reg, 1.0, true), b = chunked.forward(tok, tgt, bs, reg, 1.0, true);
  whole.backward(1.0);
  chunked.backward(1.0);
  EXPECT_NEAR(a.lm_loss_sum, b.lm_loss_sum, 1e-12 * std::abs(a.lm_loss_sum));
  for (Parameter* p : whole.params().all()) {
    const Parameter& q = chunked.params().find(p->name);
    for (int64_t i = 0; i < p->grad.numel(); ++i)
      ASSERT_NEAR(p->grad.item(i), q.grad.item(i), 1e-12 * (1 + std::abs(p->grad.item(i)))) << p->name;
  }
}

// Activation recomputation gives the same loss and the same gradients, bit for bit (the
// forward is deterministic), for the dense model and both DECO expert paths.
TEST(ModelGradient, RecomputationIsExact) {
  for (const char* variant : {"dense", "sparse", "dense-masked"}) {
    SCOPED_TRACE(variant);
    ModelConfig c = tiny(std::string(variant) == "dense" ? "dense" : "deco");
    c.layers = 3;
    if (std::string(variant) == "dense-masked") c.expert_compute = "dense";
    Transformer keep(c, DType::f64, Device::cpu), again(c, DType::f64, Device::cpu);
    again.set_recompute(true);
    keep.params().initialize(7);
    again.params().initialize(7);
    BatchShape bs{2, 5};
    Tensor tok = Tensor::empty({10}, DType::i32), tgt = Tensor::empty({10}, DType::i32);
    for (int i = 0; i < 10; ++i) tok.data<int32_t>()[i] = (i * 5 + 3) % 11, tgt.data<int32_t>()[i] = (i * 3 + 2) % 11;
    RegularizerSpec reg{RegularizerSpec::Kind::entropy, 0.2, 0.2};
    for (int micro = 0; micro < 2; ++micro) {  // accumulation over two micro-batches
      ForwardResult a = keep.forward(tok, tgt, bs, reg, 0.5, true), b = again.forward(tok, tgt, bs, reg, 0.5, true);
      keep.backward(0.5);
      again.backward(0.5);
      EXPECT_EQ(a.lm_loss_sum, b.lm_loss_sum);
      EXPECT_EQ(a.reg_loss, b.reg_loss);
    }
    for (Parameter* p : keep.params().all()) {
      const Parameter& q = again.params().find(p->name);
      for (int64_t i = 0; i < p->grad.numel(); ++i) ASSERT_EQ(p->grad.item(i), q.grad.item(i)) << p->name;
    }
  }
}

TEST(ModelGradient, DecoL1Regularized) { check_model(tiny("deco"), {RegularizerSpec::Kind::l1, 0.3, 0.2}); }

TEST(ModelGradient, DecoAblations) {
  for (const char* scaling : {"scalar", "fixed", "none"}) {
    ModelConfig c = tiny("deco");
    c.expert_scaling = scaling;
    SCOPED_TRACE(scaling);
    check_model(c, {RegularizerSpec::Kind::entropy, 0.1, 0.2});
  }
  for (const char* mode : {"no_mean", "no_rms", "silu"}) {
    ModelConfig c = tiny("deco");
    c.normsilu = mode;
    SCOPED_TRACE(mode);
    check_model(c, {});
  }
  ModelConfig gated = tiny("deco");
  gated.gated_experts = true;
  gated.shared_expert_width = 0;
  check_model(gated, {RegularizerSpec::Kind::entropy, 0.1, 0.2});
}

TEST(Model, InitIsDeterministicAndKeyedByName) {
  ModelConfig c = tiny("deco");
  Transformer a(c, DType::f32, Device::cpu), b(c, DType::f32, Device::cpu);
  a.params().initialize(5);
  b.params().initialize(5);
  for (Parameter* p : a.params().all()) {
    Parameter& q = b.params().find(p->name);
    for (int64_t i = 0; i < p->value.numel(); ++i) ASSERT_EQ(p->value.item(i), q.value.item(i)) << p->name;
  }
  // The spec's inits: g = router_scale_init, gamma = 1, norms = 1.
  EXPECT_EQ(a.params().find("layers.1.ffn.g").value.item(3), static_cast<float>(c.router_scale_init));
  EXPECT_EQ(a.params().find("layers.1.ffn.gamma").value.item(0), 1.0);
  EXPECT_EQ(a.params().find("final_norm.weight").value.item(0), 1.0);
  EXPECT_EQ(a.params().find("layers.1.ffn.w_up").partition, Partition::expert_rows);
  EXPECT_EQ(a.params().find("layers.1.ffn.w_up").expert_block, c.expert_width);
}

TEST(ModelGradient, DenseMaskedExpertPath) {
  ModelConfig c = tiny("deco");
  c.expert_compute = "dense";
  check_model(c, {RegularizerSpec::Kind::entropy, 0.3, 0.2});
  c.gated_experts = true;
  check_model(c, {});
}

// bench train's calibrated routing: the batch it measures activates round(ratio T) tokens per
// expert (0.3 -> 3 of 10; 0.7 -> 7), the shift stays for later forwards (the objective the
// finite differences evaluate), and the gradients are exact on both expert paths.
TEST(ModelGradient, CalibratedRouting) {
  ModelConfig c = tiny("deco");
  check_model(c, {RegularizerSpec::Kind::entropy, 0.3, 0.2}, 0, 0.3);
  c.expert_compute = "dense";
  check_model(c, {RegularizerSpec::Kind::entropy, 0.3, 0.2}, 0, 0.7);
}

// The sparse path (active pairs only) equals the dense-masked reference: loss, routing and
// every gradient, for every NormSiLU mode and for gated experts.
TEST(SparseExperts, EqualDenseMaskedPathExactly) {
  struct Variant {
    const char* normsilu;
    bool gated;
  };
  for (Variant v : {Variant{"full", false}, Variant{"no_mean", false}, Variant{"no_rms", false},
                    Variant{"silu", false}, Variant{"full", true}}) {
    SCOPED_TRACE(std::string(v.normsilu) + (v.gated ? " gated" : ""));
    ModelConfig c = tiny("deco");
    c.layers = 3;
    c.experts = 6;
    c.normsilu = v.normsilu;
    c.gated_experts = v.gated;
    ModelConfig cd = c;
    c.expert_compute = "sparse";
    cd.expert_compute = "dense";
    Transformer a(c, DType::f64, Device::cpu), b(cd, DType::f64, Device::cpu);
    a.params().initialize(11);
    b.params().initialize(11);
    BatchShape bs{2, 5};
    Tensor tok = Tensor::empty({10}, DType::i32), tgt = Tensor::empty({10}, DType::i32);
    for (int i = 0; i < 10; ++i) tok.data<int32_t>()[i] = (i * 3 + 1) % 11, tgt.data<int32_t>()[i] = (i * 7) % 11;
    RegularizerSpec reg{RegularizerSpec::Kind::entropy, 0.2, 0.2};
    a.params().zero_grad();
    b.params().zero_grad();
    ForwardResult fa = a.forward(tok, tgt, bs, reg, 1.0, true), fb = b.forward(tok, tgt, bs, reg, 1.0, true);
    a.backward(1.0);
    b.backward(1.0);
    EXPECT_NEAR(fa.lm_loss_sum, fb.lm_loss_sum, 1e-12 * std::abs(fb.lm_loss_sum));
    EXPECT_NEAR(fa.reg_loss, fb.reg_loss, 1e-14);
    ASSERT_EQ(fa.routing.size(), 2u);
    int64_t active = 0;
    for (size_t l = 0; l < fa.routing.size(); ++l) {
      EXPECT_EQ(fa.routing[l].active_pairs, fb.routing[l].active_pairs);
      active += fa.routing[l].active_pairs;
    }
    EXPECT_GT(active, 0);
    EXPECT_LT(active, 2 * 10 * 6);
    for (Parameter* p : a.params().all()) {
      const Parameter& q = b.params().find(p->name);
      double scale = 1e-12;
      for (int64_t i = 0; i < q.grad.numel(); ++i) scale = std::max(scale, std::abs(q.grad.item(i)));
      for (int64_t i = 0; i < p->grad.numel(); ++i)
        ASSERT_NEAR(p->grad.item(i), q.grad.item(i), 1e-11 * scale) << p->name << " entry " << i;
    }
  }
}
