// Every op's backward against float64 central differences of sum(W * forward(x)), W random.
#include "kernels/ops.h"
#include "model/layers.h"
#include "tests/grad_check.h"

using namespace decotron;
using namespace decotron::testing;

namespace {
Tensor empty_like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype()); }
}  // namespace

TEST(OpGradient, Linear) {
  Tensor x = randn64({6, 5}, 1), w = randn64({4, 5}, 2), W = randn64({6, 4}, 3);
  auto loss = [&] { Tensor y = Tensor::empty({6, 4}, DType::f64); ops::linear_forward(y, x, w); return dot64(y, W); };
  Tensor dx = empty_like(x), dw = Tensor::zeros(w.shape(), DType::f64);
  ops::linear_backward(&dx, &dw, W, x, w);
  expect_gradient("dx", x, dx, loss);
  expect_gradient("dw", w, dw, loss);
}

TEST(OpGradient, RMSNorm) {
  Tensor x = randn64({5, 8}, 1), w = randn64({8}, 2), W = randn64({5, 8}, 3);
  auto loss = [&] {
    Tensor y = empty_like(x), r = Tensor::empty({5}, DType::f64);
    ops::rmsnorm_forward(y, r, x, w, 1e-5);
    return dot64(y, W);
  };
  Tensor y = empty_like(x), r = Tensor::empty({5}, DType::f64);
  ops::rmsnorm_forward(y, r, x, w, 1e-5);
  Tensor dx = empty_like(x), dw = Tensor::zeros(w.shape(), DType::f64);
  ops::rmsnorm_backward(dx, dw, W, x, w, r);
  expect_gradient("dx", x, dx, loss);
  expect_gradient("dw", w, dw, loss);
}

TEST(OpGradient, Rope) {
  Tensor x = randn64({2, 5, 3, 8}, 1), W = randn64({2, 5, 3, 8}, 3);
  auto loss = [&] { Tensor y = empty_like(x); ops::rope_forward(y, x, 2, 5, 3, 8, 10000); return dot64(y, W); };
  Tensor dx = empty_like(x);
  ops::rope_backward(dx, W, 2, 5, 3, 8, 10000);
  expect_gradient("dx", x, dx, loss);
}

TEST(OpGradient, RopeMatchesRotateHalfDefinition) {
  // Position s, pair i: angle s * base^(-2i/D); (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
  Tensor x = randn64({1, 3, 1, 4}, 1), y = empty_like(x);
  ops::rope_forward(y, x, 1, 3, 1, 4, 100.0);
  const double* a = x.data<double>();
  for (int s = 0; s < 3; ++s)
    for (int i = 0; i < 2; ++i) {
      double th = s * std::pow(100.0, -2.0 * i / 4), x1 = a[s * 4 + i], x2 = a[s * 4 + i + 2];
      EXPECT_NEAR(y.item(s * 4 + i), x1 * std::cos(th) - x2 * std::sin(th), 1e-12);
      EXPECT_NEAR(y.item(s * 4 + i + 2), x2 * std::cos(th) + x1 * std::sin(th), 1e-12);
    }
}

TEST(OpGradient, CausalGroupedQueryAttention) {
  ops::AttnShape s{2, 6, 4, 2, 4};
  Tensor q = randn64({2, 6, 4, 4}, 1), k = randn64({2, 6, 2, 4}, 2), v = randn64({2, 6, 2, 4}, 3);
  Tensor W = randn64({2, 6, 4, 4}, 4);
  auto run = [&](Tensor& out, Tensor& lse) { ops::attention_forward(out, lse, q, k, v, s); };
  auto loss = [&] {
    Tensor o = empty_like(q), l = Tensor::empty({2, 4, 6}, DType::f64);
    run(o, l);
    return dot64(o, W);
  };
  Tensor o = empty_like(q), l = Tensor::empty({2, 4, 6}, DType::f64);
  run(o, l);
  Tensor dq = empty_like(q), dk = empty_like(k), dv = empty_like(v);
  ops::attention_backward(dq, dk, dv, W, q, k, v, o, l, s);
  expect_gradient("dq", q, dq, loss);
  expect_gradient("dk", k, dk, loss);
  expect_gradient("dv", v, dv, loss);
}

TEST(OpGradient, AttentionIsCausal) {
  // Changing a later key/value must not change earlier outputs.
  ops::AttnShape s{1, 5, 2, 1, 4};
  Tensor q = randn64({1, 5, 2, 4}, 1), k = randn64({1, 5, 1, 4}, 2), v = randn64({1, 5, 1, 4}, 3);
  Tensor o1 = empty_like(q), o2 = empty_like(q), l = Tensor::empty({1, 2, 5}, DType::f64);
  ops::attention_forward(o1, l, q, k, v, s);
  k.data<double>()[4 * 4] += 1.0;
  v.data<double>()[4 * 4 + 1] -= 2.0;
  ops::attention_forward(o2, l, q, k, v, s);
  for (int64_t i = 0; i < 4 * 2 * 4; ++i) EXPECT_EQ(o1.item(i), o2.item(i));
  EXPECT_NE(o1.item(4 * 8), o2.item(4 * 8));
}

TEST(OpGradient, SwiGLUAndMul) {
  Tensor g = randn64({4, 6}, 1), u = randn64({4, 6}, 2), W = randn64({4, 6}, 3);
  auto loss = [&] { Tensor h = empty_like(g); ops::swiglu_forward(h, g, u); return dot64(h, W); };
  Tensor dg = empty_like(g), du = empty_like(u);
  ops::swiglu_backward(dg, du, W, g, u);
  expect_gradient("dgate", g, dg, loss);
  expect_gradient("dup", u, du, loss);
  auto mloss = [&] { Tensor h = empty_like(g); ops::mul_forward(h, g, u); return dot64(h, W); };
  ops::mul_backward(dg, du, W, g, u);
  expect_gradient("mul da", g, dg, mloss);
  expect_gradient("mul db", u, du, mloss);
}

class NormSiluGradient : public ::testing::TestWithParam<ops::NormSiluMode> {};

TEST_P(NormSiluGradient, MatchesFiniteDifferences) {
  const int64_t T = 3, E = 4, d = 5;
  Tensor u = randn64({T, E * d}, 1, 1.0), gamma = randn64({d}, 2, 0.5), W = randn64({T, E * d}, 3);
  for (int64_t j = 0; j < d; ++j) gamma.data<double>()[j] += 1.0;
  auto loss = [&] {
    Tensor z = empty_like(u), st = Tensor::empty({T, 1 + E}, DType::f64);
    ops::normsilu_forward(z, st, u, gamma, E, GetParam(), 1e-5);
    return dot64(z, W);
  };
  Tensor z = empty_like(u), st = Tensor::empty({T, 1 + E}, DType::f64);
  ops::normsilu_forward(z, st, u, gamma, E, GetParam(), 1e-5);
  Tensor du = empty_like(u), dgamma = Tensor::zeros({d}, DType::f64);
  ops::normsilu_backward(du, dgamma, W, u, gamma, st, E, GetParam(), 1e-5);
  expect_gradient("du", u, du, loss);
  if (GetParam() == ops::NormSiluMode::full || GetParam() == ops::NormSiluMode::no_mean)
    expect_gradient("dgamma", gamma, dgamma, loss);
}

INSTANTIATE_TEST_SUITE_P(AllModes, NormSiluGradient,
                         ::testing::Values(ops::NormSiluMode::full, ops::NormSiluMode::no_mean,
                                           ops::NormSiluMode::no_rms, ops::NormSiluMode::silu));

TEST(OpGradient, NormSiluMatchesSpecDefinition) {
  // deco-model.md step 5, computed directly for one token.
  const int64_t E = 3, d = 4;
  Tensor u = randn64({1, E * d}, 5), gamma = randn64({d}, 6), z = empty_like(u), st = Tensor::empty({1, 1 + E}, DType::f64);
  ops::normsilu_forward(z, st, u, gamma, E, ops::NormSiluMode::full, 1e-5);
  double mu = 0;
  for (int j = 0; j < E * d; ++j) mu += u.item(j) / (E * d);
  for (int e = 0; e < E; ++e) {
    double ms = 0;
    for (int j = 0; j < d; ++j) ms += std::pow(u.item(e * d + j) - mu, 2) / d;
    for (int j = 0; j < d; ++j) {
      double n = gamma.item(j) * (u.item(e * d + j) - mu) / std::sqrt(ms + 1e-5);
      EXPECT_NEAR(z.item(e * d + j), n / (1 + std::exp(-n)), 1e-12);
    }
  }
}

TEST(OpGradient, RouterScaleEntropyAndL1) {
  const int64_t T = 5, E = 6;
  Tensor r = randn64({T, E}, 1), W = randn64({T, E}, 3);
  for (auto gshape : {Shape{E}, Shape{1}}) {
    Tensor g = randn64(gshape, 2);
    auto loss = [&] {
      Tensor s = empty_like(r);
      ops::router_scale_forward(s, r, g);
      return dot64(s, W) + 0.7 * ops::entropy_forward(r) + 0.3 * ops::l1_reg_forward(r, 0.2);
    };
    Tensor da = Tensor::zeros(r.shape(), DType::f64);
    ops::entropy_backward(da, r, 0.7);
    ops::l1_reg_backward(da, r, 0.2, 0.3);
    Tensor dr = empty_like(r), dg = Tensor::zeros(gshape, DType::f64);
    ops::router_scale_backward(dr, &dg, W, r, g, &da);
    expect_gradient("dr", r, dr, loss);
    expect_gradient("dg", g, dg, loss);
  }
}

TEST(OpGradient, EntropyMatchesSpecDefinition) {
  Tensor r = randn64({1, 4}, 9);
  double sum = 0, h = 0;
  for (int e = 0; e < 4; ++e) sum += std::max(0.0, r.item(e));
  for (int e = 0; e < 4; ++e) {
    double p = std::max(0.0, r.item(e)) / (sum + 1e-5);
    h -= p * std::log(p + 1e-5);
  }
  EXPECT_NEAR(ops::entropy_forward(r), h, 1e-14);
}

TEST(OpGradient, ExpertScale) {
  const int64_t T = 3, E = 4, d = 2;
  Tensor z = randn64({T, E * d}, 1), s = randn64({T, E}, 2), W = randn64({T, E * d}, 3);
  auto loss = [&] { Tensor y = empty_like(z); ops::expert_scale_forward(y, z, s, E); return dot64(y, W); };
  Tensor dz = empty_like(z), ds = empty_like(s);
  ops::expert_scale_backward(dz, ds, W, z, s, E);
  expect_gradient("dz", z, dz, loss);
  expect_gradient("ds", s, ds, loss);
}

TEST(OpGradient, CrossEntropyAndEmbedding) {
  const int64_t T = 4, V = 7, h = 3;
  Tensor logits = randn64({T, V}, 1), tok = Tensor::empty({T}, DType::i32);
  for (int i = 0; i < T; ++i) tok.data<int32_t>()[i] = (i * 3 + 1) % V;
  auto loss = [&] { Tensor l = logits.clone(); return ops::cross_entropy(l, tok, 0.0); };
  Tensor g = logits.clone();
  double value = ops::cross_entropy(g, tok, 1.0);
  EXPECT_NEAR(value, loss(), 1e-12);
  expect_gradient("dlogits", logits, g, loss);

  Tensor table = randn64({V, h}, 2), W = randn64({T, h}, 3);
  auto eloss = [&] { Tensor y = Tensor::empty({T, h}, DType::f64); ops::embedding_forward(y, tok, table); return dot64(y, W); };
  Tensor dt = Tensor::zeros(table.shape(), DType::f64);
  ops::embedding_backward(dt, tok, W);
  expect_gradient("dtable", table, dt, eloss);
}

TEST(OpGradient, AttentionMatchesLoopReference) {
  // The textbook definition, one query row at a time, in double.
  ops::AttnShape s{2, 7, 4, 2, 6};
  const int64_t B = 2, S = 7, H = 4, G = 2, D = 6;
  Tensor q = randn64({B, S, H, D}, 11), k = randn64({B, S, G, D}, 12), v = randn64({B, S, G, D}, 13);
  Tensor o = empty_like(q), l = Tensor::empty({B, H, S}, DType::f64);
  ops::attention_forward(o, l, q, k, v, s);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t g = h / (H / G);
        std::vector<double> w(i + 1);
        double m = -1e300, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q.item(((b * S + i) * H + h) * D + d) * k.item(((b * S + j) * G + g) * D + d);
          w[j] = dot / std::sqrt(double(D));
          m = std::max(m, w[j]);
        }
        for (auto& x : w) sum += (x = std::exp(x - m));
        EXPECT_NEAR(l.item((b * H + h) * S + i), m + std::log(sum), 1e-12);
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = 0; j <= i; ++j) acc += w[j] / sum * v.item(((b * S + j) * G + g) * D + d);
          EXPECT_NEAR(o.item(((b * S + i) * H + h) * D + d), acc, 1e-12);
        }
      }
}

// routing_summary (what the layers write for one read-back per forward) holds exactly what the
// host-returning ops return, and RoutingStats::resolve turns it into their values.
TEST(DecoOps, RoutingSummaryEqualsTheHostReturningOps) {
  const int64_t T = 9, E = 7;
  Tensor r = randn64({T, E}, 5);
  for (int64_t i = 0; i < E; ++i) r.data<double>()[3 * E + i] = -1.0;  // a token without an expert
  Tensor s = Tensor::empty({2 * E + 2}, DType::f64);
  ops::routing_summary(s, r);
  std::vector<int64_t> counts(E);
  ops::count_active_per_expert(r, counts.data());
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(s.data<double>()[e], static_cast<double>(counts[e])) << e;
  EXPECT_EQ(s.data<double>()[2 * E], static_cast<double>(ops::count_tokens_with_active(r)));
  EXPECT_EQ(s.data<double>()[2 * E + 1], ops::entropy_forward(r));
  for (auto kind : {RegularizerSpec::Kind::entropy, RegularizerSpec::Kind::l1, RegularizerSpec::Kind::none}) {
    const RegularizerSpec reg{kind, 0.3, 0.25};
    RoutingStats st;
    st.tokens = T;
    st.resolve(s.data<double>(), E, reg);
    EXPECT_EQ(st.active_per_expert, counts);
    EXPECT_EQ(st.active_pairs, ops::count_active(r));
    EXPECT_EQ(st.tokens_without_expert, T - ops::count_tokens_with_active(r));
    EXPECT_EQ(st.tokens_without_expert, 1);
    const double want = kind == RegularizerSpec::Kind::entropy ? 0.3 * ops::entropy_forward(r) / T
                        : kind == RegularizerSpec::Kind::l1     ? 0.3 * ops::l1_reg_forward(r, 0.25)
                                                                : 0.0;
    EXPECT_EQ(st.reg_loss, want) << static_cast<int>(kind);
  }
}
