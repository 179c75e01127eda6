#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "kernels/ops.h"
#include "tiny_config.h"
#include "trainer/lr_schedule.h"
#include "trainer/sparsity_controller.h"
#include "trainer/trainer.h"

using namespace decotron;

namespace {

using test::tiny_config;

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// Drops the wall-clock fields from a metrics line.
std::string without_timing(std::string line) {
  for (const char* key : {"\"tokens_per_s\":", "\"tflops\":", "\"peak_memory_bytes\":"}) {
    auto p = line.find(key);
    if (p == std::string::npos) continue;
    auto e = line.find_first_of(",}", p);
    line.erase(p, e - p + (line[e] == ',' ? 1 : 0));
  }
  return line;
}

}  // namespace

TEST(LrSchedule, WarmupStableDecay) {
  TrainConfig t;
  t.iters = 100, t.warmup_iters = 10, t.decay_iters = 20, t.lr = 1.0, t.min_lr = 0.0, t.lr_schedule = "wsd";
  EXPECT_DOUBLE_EQ(learning_rate(t, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(t, 9), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(t, 50), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(t, 79), 1.0);
  EXPECT_LT(learning_rate(t, 80), 1.0);
  EXPECT_NEAR(learning_rate(t, 89), 2 * std::pow(0.5, 0.5) - 1, 1e-12);
  EXPECT_DOUBLE_EQ(learning_rate(t, 99), 0.0);
  for (int i = 80; i < 99; ++i) EXPECT_GT(learning_rate(t, i), learning_rate(t, i + 1));
  t.lr_schedule = "cosine";
  EXPECT_NEAR(learning_rate(t, 10), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate(t, 55), 0.5, 1e-12);
  EXPECT_NEAR(learning_rate(t, 100), 0.0, 1e-12);
}

TEST(SparsityController, FollowsTheSpec) {
  SparsityController c(0.2, 1e-8, 1.002);
  EXPECT_EQ(c.lambda(), 1e-8);
  c.step(0.5);
  EXPECT_DOUBLE_EQ(c.lambda(), 1e-8 * 1.002);
  c.step(0.5);
  c.step(0.1);
  EXPECT_DOUBLE_EQ(c.lambda(), 1e-8 * 1.002);
  c.step(0.1);
  c.step(0.1);
  EXPECT_DOUBLE_EQ(c.lambda(), 1e-8);  // never below lambda0
}

TEST(Trainer, GradientAccumulationEqualsOneBigBatch) {
  Config c = tiny_config("deco");
  Transformer a(c.model, DType::f64, Device::cpu), b(c.model, DType::f64, Device::cpu);
  a.params().initialize(1);
  b.params().initialize(1);
  auto data = make_synthetic_data(64, 16, 3, 0);
  std::vector<int32_t> s = data->next_train(4);
  auto split = [&](int64_t first, int64_t n, Tensor& tok, Tensor& tgt) {
    tok = Tensor::empty({n * 16}, DType::i32), tgt = Tensor::empty({n * 16}, DType::i32);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < 16; ++j) {
        tok.data<int32_t>()[i * 16 + j] = s[(first + i) * 17 + j];
        tgt.data<int32_t>()[i * 16 + j] = s[(first + i) * 17 + j + 1];
      }
  };
  RegularizerSpec reg{RegularizerSpec::Kind::entropy, 0.05, 0.2};
  Tensor tok, tgt;
  a.params().zero_grad();
  for (int m = 0; m < 2; ++m) {
    split(2 * m, 2, tok, tgt);
    a.forward(tok, tgt, {2, 16}, reg, 0.5, true);
    a.backward(0.5);
  }
  b.params().zero_grad();
  split(0, 4, tok, tgt);
  b.forward(tok, tgt, {4, 16}, reg, 1.0, true);
  b.backward(1.0);
  for (Parameter* p : a.params().all()) {
    Parameter& q = b.params().find(p->name);
    for (int64_t i = 0; i < p->grad.numel(); ++i)
      ASSERT_NEAR(p->grad.item(i), q.grad.item(i), 1e-12 + 1e-9 * std::abs(q.grad.item(i))) << p->name;
  }
}

TEST(Trainer, LearnsAndIsDeterministic) {
  namespace fs = std::filesystem;
  Config c = tiny_config("deco");
  std::string d1 = fs::temp_directory_path() / "decotron_trainer_a", d2 = fs::temp_directory_path() / "decotron_trainer_b";
  fs::remove_all(d1), fs::remove_all(d2);
  for (const std::string& dir : {d1, d2}) {
    Trainer t(c, make_synthetic_data(64, 16, 5, 0), dir);
    t.train();
  }
  auto l1 = read_lines(d1 + "/metrics.jsonl"), l2 = read_lines(d2 + "/metrics.jsonl");
  ASSERT_EQ(l1.size(), 6u);
  ASSERT_EQ(l1.size(), l2.size());
  for (size_t i = 0; i < l1.size(); ++i) EXPECT_EQ(without_timing(l1[i]), without_timing(l2[i]));
  double first = nlohmann::json::parse(l1.front())["lm_loss"], last = nlohmann::json::parse(l1.back())["lm_loss"];
  EXPECT_LT(last, first - 1.0) << "loss did not fall: " << first << " -> " << last;
  EXPECT_LT(last, std::log(64.0) - 1.0);
}

TEST(Trainer, SkipsNonFiniteStepsThenStops) {
  Config c = tiny_config("dense");
  c.train.max_skipped_steps = 3;
  Trainer t(c, make_synthetic_data(64, 16, 5, 0), "");
  Parameter& w = t.model().params().find("layers.0.attn.wq");
  w.value.data<float>()[0] = NAN;
  Tensor before = t.model().params().find("lm_head.weight").value.clone();
  StepResult r = t.train_step();
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(t.state().iteration, 1);
  EXPECT_EQ(t.optimizer().step(), 0);
  const Tensor& after = t.model().params().find("lm_head.weight").value;
  for (int64_t i = 0; i < after.numel(); ++i) ASSERT_EQ(after.item(i), before.item(i));
  t.train_step();
  EXPECT_THROW(t.train_step(), Error);
}

TEST(Trainer, ControllerHoldsTheRatioNearTarget) {
  Config c = tiny_config("deco");
  c.train.iters = 150;
  c.train.reg_multiplier = 1.1;
  c.train.reg_lambda0 = 1e-2;
  Trainer t(c, make_synthetic_data(64, 16, 5, 0), "");
  double first_ratio = 0, lam_max = 0;
  std::vector<double> tail;
  for (int i = 0; i < c.train.iters; ++i) {
    StepResult r = t.train_step();
    if (i == 0) first_ratio = r.act_ratio;
    lam_max = std::max(lam_max, t.controller().lambda());
    if (i >= 120) tail.push_back(r.act_ratio);
  }
  double mean = 0;
  for (double v : tail) mean += v / tail.size();
  EXPECT_GT(first_ratio, 0.35);
  EXPECT_NEAR(mean, 0.2, 0.05);
  EXPECT_GT(lam_max, 1e-2);
}
