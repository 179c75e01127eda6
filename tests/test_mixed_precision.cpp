// Mixed precision (train.dtype: bf16): fp32 master weights, gradients and optimizer state, bf16
// weight copies and activations, the router in fp32. On the CPU bf16 is emulated by the op
// dispatch (kernels/cpu/bf16_emulation.h), so these tests check the trainer's and the model's
// side of the path on any machine: which tensors are bf16, that gradients land in the fp32
// masters, that the copies follow the masters, and that bf16 training tracks fp32 training.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "checkpoint/checkpoint.h"
#include "core/rng.h"
#include "kernels/ops.h"
#include "tiny_config.h"
#include "trainer/trainer.h"

using namespace decotron;

namespace {

Config tiny_config(const std::string& arch, const std::string& dtype) {
  Config c = test::tiny_config(arch);
  c.train.iters = 30;
  c.train.dtype = dtype;
  c.log.interval = 5;
  validate_config(c);
  return c;
}

Tensor randn(const Shape& s, uint64_t stream, double scale = 1.0) {
  Tensor t = Tensor::empty(s, DType::f32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(scale * rng::normal(7, stream, i));
  return t;
}

Tensor widened(const Tensor& t) { return cast_cpu(t, DType::f32); }

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// || a - b || / || b ||
double relative_l2(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double d = a.item(i) - b.item(i);
    num += d * d, den += b.item(i) * b.item(i);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// One micro-batch of synthetic tokens as the trainer splits them.
void batch(Tensor& tok, Tensor& tgt) {
  auto data = make_synthetic_data(64, 16, 3, 0);
  std::vector<int32_t> s = data->next_train(4);
  tok = Tensor::empty({4 * 16}, DType::i32), tgt = Tensor::empty({4 * 16}, DType::i32);
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 16; ++j) {
      tok.data<int32_t>()[i * 16 + j] = s[i * 17 + j];
      tgt.data<int32_t>()[i * 16 + j] = s[i * 17 + j + 1];
    }
}

}  // namespace

// The emulation rounds each bf16 output once, after an fp32 kernel on the widened inputs; fp32
// outputs (a master's gradient) are accumulated in fp32 with no rounding.
TEST(Bf16Emulation, OutputsAreTheFp32KernelsRoundedOnce) {
  Tensor x = cast_cpu(randn({6, 5}, 1), DType::bf16), w = cast_cpu(randn({3, 5}, 2), DType::bf16);
  Tensor y = Tensor::empty({6, 3}, DType::bf16);
  ops::linear_forward(y, x, w);
  Tensor y32 = Tensor::empty({6, 3}, DType::f32);
  ops::linear_forward(y32, widened(x), widened(w));
  EXPECT_TRUE(bitwise_equal(y, cast_cpu(y32, DType::bf16)));

  // dW into an fp32 gradient (+=) from bf16 activations: the fp32 kernel's result, unrounded.
  Tensor dy = cast_cpu(randn({6, 3}, 3), DType::bf16);
  Tensor dw = randn({3, 5}, 4), dw_ref = dw.clone();
  Tensor dx = Tensor::empty({6, 5}, DType::bf16), dx32 = Tensor::empty({6, 5}, DType::f32);
  ops::linear_backward(&dx, &dw, dy, x, w);
  ops::linear_backward(&dx32, &dw_ref, widened(dy), widened(x), widened(w));
  EXPECT_EQ(dw.dtype(), DType::f32);
  EXPECT_TRUE(bitwise_equal(dw, dw_ref));
  EXPECT_TRUE(bitwise_equal(dx, cast_cpu(dx32, DType::bf16)));

  // In place (rope's y may alias x): the input is read before the output is written back.
  Tensor q = cast_cpu(randn({1, 4, 2, 8}, 5), DType::bf16), q_ref = widened(q);
  ops::rope_forward(q, q, 1, 4, 2, 8, 10000.0);
  ops::rope_forward(q_ref, q_ref, 1, 4, 2, 8, 10000.0);
  EXPECT_TRUE(bitwise_equal(q, cast_cpu(q_ref, DType::bf16)));
}

TEST(Bf16Emulation, ConvertRoundsToNearestEven) {
  Tensor x = Tensor::empty({4}, DType::f32);
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
  const float v[4] = {1.0f, 1.0f + std::ldexp(1.0f, -8), 1.0f + 3 * std::ldexp(1.0f, -8), -2.5f};
  std::copy(v, v + 4, x.data<float>());
  Tensor b = Tensor::empty({4}, DType::bf16), back = Tensor::empty({4}, DType::f32);
  ops::convert(b, x);
  ops::convert(back, b);
  EXPECT_EQ(back.data<float>()[0], 1.0f);
  EXPECT_EQ(back.data<float>()[1], 1.0f);
  EXPECT_EQ(back.data<float>()[2], 1.0f + std::ldexp(1.0f, -6));
  EXPECT_EQ(back.data<float>()[3], -2.5f);
}

// Which tensors are bf16: every weight's compute copy but the router's and its scaling's; the
// masters and gradients stay fp32; the copies are the masters rounded, and follow them.
TEST(MixedPrecision, ComputeCopiesFollowTheMasters) {
  Config c = tiny_config("deco", "bf16");
  Trainer t(c, make_synthetic_data(64, 16, 5, 0), "");
  ParameterSet& ps = t.model().params();
  EXPECT_EQ(ps.compute_dtype(), DType::bf16);
  auto check_synced = [&] {
    for (Parameter* p : ps.all()) {
      EXPECT_EQ(p->value.dtype(), DType::f32) << p->name;
      EXPECT_EQ(p->grad.dtype(), DType::f32) << p->name;
      const bool router = p->name.find("w_router") != std::string::npos || p->name.ends_with(".g");
      EXPECT_EQ(p->full_precision, router) << p->name;
      if (router) {
        EXPECT_FALSE(p->compute.defined()) << p->name;
        EXPECT_EQ(&p->w(), &p->value) << p->name;
      } else {
        ASSERT_TRUE(p->compute.defined()) << p->name;
        EXPECT_TRUE(bitwise_equal(p->compute, cast_cpu(p->value, DType::bf16))) << p->name << " copy is stale";
      }
    }
  };
  t.train_step();  // the first forward made the copies; the step then changed the masters
  t.train_step();
  ps.sync_compute();  // what the next forward does first
  check_synced();
  // A master changed behind the trainer's back, and marked: the next forward sees it.
  Parameter& w = ps.find("layers.1.ffn.w_down");
  ops::scale_(w.value, 0.5);
  ps.mark_master_changed();
  ps.sync_compute();
  check_synced();
}

// One forward and backward from the same fp32 weights: the bf16 path's loss and gradients are
// the fp32 ones up to bf16 rounding, for every DECO expert path and the dense twin.
TEST(MixedPrecision, GradientsCloseToFp32) {
  struct Case {
    const char* name;
    const char* arch;
    const char* expert_compute;
    bool gated;
  };
  for (Case k : {Case{"sparse", "deco", "sparse", false}, Case{"dense-masked", "deco", "dense", false},
                 Case{"gated", "deco", "sparse", true}, Case{"dense", "dense", "sparse", false}}) {
    Config c = tiny_config(k.arch, "fp32");
    c.model.expert_compute = k.expert_compute;
    c.model.gated_experts = k.gated;
    Transformer a(c.model, DType::f32, Device::cpu), b(c.model, DType::f32, Device::cpu);
    a.params().initialize(11);
    b.params().initialize(11);
    b.params().set_compute_dtype(DType::bf16);
    Tensor tok, tgt;
    batch(tok, tgt);
    // No regularizer: its gradient jumps at r = 0 (a pair that turns on brings -log(1e-5)/sum a),
    // so a router logit within bf16's rounding of 0 moves the regularized router gradient by
    // tens of percent in fp32 too. The regularized path is checked by the training test below.
    RegularizerSpec reg;
    a.params().zero_grad(), b.params().zero_grad();
    ForwardResult ra = a.forward(tok, tgt, {4, 16}, reg, 1.0, true);
    a.backward(1.0);
    ForwardResult rb = b.forward(tok, tgt, {4, 16}, reg, 1.0, true);
    b.backward(1.0);
    EXPECT_NEAR(rb.lm_loss_sum / 64, ra.lm_loss_sum / 64, 1e-2 * ra.lm_loss_sum / 64) << k.name;
    double worst = 0;
    std::string worst_name;
    for (Parameter* p : a.params().all()) {
      if (!p->trainable) continue;
      const Parameter& q = b.params().find(p->name);
      ASSERT_EQ(q.grad.dtype(), DType::f32) << p->name;
      const double e = relative_l2(q.grad, p->grad);
      // The router's gradient also moves with the pairs whose logit is within rounding of 0
      // (active in one run, not in the other).
      if (p->full_precision) {
        EXPECT_LT(e, 0.1) << k.name << " " << p->name;
      } else if (e > worst) {
        worst = e, worst_name = p->name;
      }
    }
    // bf16 keeps 8 bits: a few roundings of 2^-9 each along the chain of ops (measured: at most
    // 2.1e-2, the norm before the DECO FFN, whose gradient carries the router's).
    EXPECT_LT(worst, 3e-2) << k.name << ": worst gradient " << worst_name;
  }
}

// Training: the bf16 loss curve tracks fp32's, is deterministic, and checkpoints hold fp32
// masters that resume exactly.
TEST(MixedPrecision, TrainingTracksFp32AndResumesExactly) {
  Config c32 = tiny_config("deco", "fp32"), c16 = tiny_config("deco", "bf16");
  Trainer a(c32, make_synthetic_data(64, 16, 5, 0), ""), b(c16, make_synthetic_data(64, 16, 5, 0), ""),
      b2(c16, make_synthetic_data(64, 16, 5, 0), "");
  double worst = 0;
  for (int i = 0; i < 20; ++i) {
    StepResult ra = a.train_step(), rb = b.train_step(), rb2 = b2.train_step();
    EXPECT_EQ(rb.lm_loss, rb2.lm_loss) << "bf16 training is not deterministic at step " << i + 1;
    worst = std::max(worst, std::abs(rb.lm_loss - ra.lm_loss) / ra.lm_loss);
  }
  EXPECT_LT(worst, 1e-2) << "bf16 loss left the fp32 curve";
  EXPECT_LT(b.train_step().lm_loss, std::log(64.0) - 0.5) << "bf16 training did not learn";
  b2.train_step();

  const std::string path = (std::filesystem::temp_directory_path() / "decotron_mixed_precision.h5").string();
  save_checkpoint(b, path);
  Trainer r(c16, make_synthetic_data(64, 16, 5, 0), "");
  load_checkpoint(r, path);
  std::filesystem::remove(path);
  for (Parameter* p : r.model().params().all())
    EXPECT_EQ(p->value.dtype(), DType::f32) << p->name << ": the checkpoint holds the fp32 masters";
  r.set_data(make_synthetic_data(64, 16, 5, r.state().consumed_samples));
  for (int i = 0; i < 3; ++i) {
    StepResult want = b.train_step(), got = r.train_step();
    EXPECT_EQ(got.lm_loss, want.lm_loss) << "resumed bf16 step " << i + 1;
  }
}
