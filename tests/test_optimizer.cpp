// AdamW (trainer/optimizer.h) and the multi-tensor ops under it (kernels/multi_tensor.h) on the
// CPU: the update against the paper's formula written out in double, the multi-tensor list
// against the single-tensor op (views, empty tensors, decay on and off), and the optimizer's
// gradient norm and step against per-parameter arithmetic. The CUDA launches are checked
// against these in tests/test_cuda_ops.cpp (CudaOps.MultiTensorAdamWAndSquares).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/multi_tensor.h"
#include "kernels/ops.h"
#include "model/parameter.h"
#include "tests/grad_check.h"
#include "trainer/optimizer.h"

namespace decotron {
namespace {

Tensor random_tensor(int64_t n, uint64_t stream, double scale = 1.0) { return testing::randn64({n}, stream, scale); }

// Loshchilov & Hutter's AdamW, one element, written out.
struct Element {
  double p, m = 0, v = 0;
  void step(double g, int64_t t, double lr, double b1, double b2, double eps, double wd) {
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    const double mhat = m / (1 - std::pow(b1, t)), vhat = v / (1 - std::pow(b2, t));
    p -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * p);
  }
};

TEST(AdamW, UpdateFollowsTheFormula) {
  const int64_t n = 50;
  Tensor p = random_tensor(n, 1), m = Tensor::zeros({n}, DType::f64), v = Tensor::zeros({n}, DType::f64);
  std::vector<Element> ref;
  for (int64_t i = 0; i < n; ++i) ref.push_back(Element{p.data<double>()[i]});
  for (int64_t t = 1; t <= 4; ++t) {
    Tensor g = random_tensor(n, 10 + t, 0.1);
    ops::adamw_update(p, m, v, g, ops::AdamWStep{1e-2, 0.9, 0.95, 1e-8, 0.1, t}, 0.5);
    for (int64_t i = 0; i < n; ++i) ref[i].step(0.5 * g.data<double>()[i], t, 1e-2, 0.9, 0.95, 1e-8, 0.1);
  }
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(p.data<double>()[i], ref[i].p, 1e-14) << i;
    EXPECT_NEAR(m.data<double>()[i], ref[i].m, 1e-15) << i;
    EXPECT_NEAR(v.data<double>()[i], ref[i].v, 1e-15) << i;
  }
}

TEST(MultiTensor, ListEqualsTheSingleTensorOps) {
  const std::vector<int64_t> sizes = {7, 0, 33, 1};
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  Tensor buf = random_tensor(total, 2), ref = buf.clone();
  std::vector<ops::AdamWTensor> list;
  std::vector<Tensor> grads;
  std::vector<std::vector<Tensor>> want;  // p, m, v, g per tensor: the single-tensor op's
  int64_t at = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t n = sizes[i];
    Tensor g = random_tensor(n, 20 + i, 0.1);
    list.push_back(ops::AdamWTensor{buf.rows(at, n), Tensor::zeros({n}, DType::f64), Tensor::zeros({n}, DType::f64),
                                    g, i != 2});
    want.push_back({ref.rows(at, n), Tensor::zeros({n}, DType::f64), Tensor::zeros({n}, DType::f64), g});
    grads.push_back(g);
    at += n;
  }
  ops::MultiTensorAdamW adamw(list);
  ops::MultiTensorSquares squares(grads);
  const std::vector<double> sq = squares.compute();
  ASSERT_EQ(sq.size(), sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    double s = 0;
    for (int64_t k = 0; k < sizes[i]; ++k) s += grads[i].data<double>()[k] * grads[i].data<double>()[k];
    EXPECT_DOUBLE_EQ(sq[i], s) << i;
  }
  for (int64_t t = 1; t <= 2; ++t) {
    const ops::AdamWStep s{1e-2, 0.9, 0.95, 1e-8, 0.1, t};
    adamw.update(s, 0.25);
    for (size_t i = 0; i < sizes.size(); ++i) {
      ops::AdamWStep si = s;
      if (i == 2) si.weight_decay = 0;
      ops::adamw_update(want[i][0], want[i][1], want[i][2], want[i][3], si, 0.25);
    }
  }
  for (int64_t k = 0; k < total; ++k) EXPECT_EQ(buf.data<double>()[k], ref.data<double>()[k]) << k;
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t k = 0; k < sizes[i]; ++k) {
      EXPECT_EQ(list[i].m.data<double>()[k], want[i][1].data<double>()[k]);
      EXPECT_EQ(list[i].v.data<double>()[k], want[i][2].data<double>()[k]);
    }
}

// The optimizer over a ParameterSet: grad_norm() is the square root of every trainable
// gradient's squares, update() moves each parameter as adamw_update with its decay flag, and
// a non-trainable parameter stays put.
TEST(AdamW, OptimizerNormAndStepPerParameter) {
  ParameterSet ps(DType::f64, Device::cpu);
  Parameter& w = ps.add("w", {4, 3}, Partition::replicated, Init::normal, 0.5, true);
  Parameter& b = ps.add("b", {3}, Partition::replicated, Init::ones, 1.0, false);
  Parameter& fixed = ps.add("fixed", {2}, Partition::replicated, Init::constant, 2.0, false);
  fixed.trainable = false;
  ps.initialize(7);
  TrainConfig cfg;
  AdamW opt(ps, cfg);
  Tensor w0 = w.value.clone(), b0 = b.value.clone(), f0 = fixed.value.clone();
  w.grad.copy_from(random_tensor(12, 3, 0.1).view({4, 3}));
  b.grad.copy_from(random_tensor(3, 4, 0.1));
  fixed.grad.copy_from(random_tensor(2, 5, 10.0));
  const double norm = std::sqrt(ops::sum_squares(w.grad) + ops::sum_squares(b.grad));
  EXPECT_NEAR(opt.grad_norm(), norm, 1e-15);
  opt.update(1e-2, 0.5);
  Tensor wm = Tensor::zeros({4, 3}, DType::f64), wv = wm.clone(), bm = Tensor::zeros({3}, DType::f64), bv = bm.clone();
  ops::adamw_update(w0, wm, wv, w.grad, {1e-2, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay, 1}, 0.5);
  ops::adamw_update(b0, bm, bv, b.grad, {1e-2, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, 0.0, 1}, 0.5);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(w.value.data<double>()[i], w0.data<double>()[i]) << i;
  for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(b.value.data<double>()[i], b0.data<double>()[i]) << i;
  for (int64_t i = 0; i < 2; ++i) EXPECT_EQ(fixed.value.data<double>()[i], f0.data<double>()[i]) << i;
  EXPECT_EQ(opt.step(), 1);
}

}  // namespace
}  // namespace decotron
