#include <gtest/gtest.h>

#include "core/rng.h"
#include "core/tensor.h"

using namespace decotron;

TEST(Tensor, ViewsShareStorageAndRowsOffset) {
  Tensor t = Tensor::zeros({4, 3}, DType::f32);
  for (int i = 0; i < 12; ++i) t.data<float>()[i] = static_cast<float>(i);
  Tensor r = t.rows(2, 2);
  EXPECT_EQ(r.shape(), (Shape{2, 3}));
  EXPECT_EQ(r.item(0), 6.0);
  Tensor v = t.view({12});
  v.data<float>()[11] = -1;
  EXPECT_EQ(t.item(11), -1.0);
  EXPECT_THROW(t.view({5}), std::logic_error);
}

TEST(Tensor, Bf16RoundsToNearestEven) {
  EXPECT_EQ(static_cast<float>(bf16(1.0f)), 1.0f);
  // 1 + 2^-8 lies exactly between two bf16 values: ties go to the even mantissa (1.0).
  EXPECT_EQ(static_cast<float>(bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(static_cast<float>(bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  Tensor x = Tensor::empty({3}, DType::f32);
  x.data<float>()[0] = 0.1f; x.data<float>()[1] = -2.5f; x.data<float>()[2] = 1e-3f;
  Tensor y = cast_cpu(cast_cpu(x, DType::bf16), DType::f32);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(y.item(i), x.item(i), std::abs(x.item(i)) * 1.0 / 256);
}

TEST(Rng, PhiloxKnownAnswer) {
  // Known-answer test from the Random123 distribution (kat_vectors: philox4x32 10 rounds, all zero).
  rng::U32x4 z = rng::philox4x32(rng::U32x4{{0, 0, 0, 0}}, 0, 0);
  EXPECT_EQ(z.v[0], 0x6627e8d5u);
  EXPECT_EQ(z.v[1], 0xe169c58du);
  EXPECT_EQ(z.v[2], 0xbc57ac4cu);
  EXPECT_EQ(z.v[3], 0x9b00dbd8u);
}

TEST(Rng, NormalHasUnitMoments) {
  double s = 0, s2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    double v = rng::normal(42, 7, i);
    s += v;
    s2 += v * v;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
  EXPECT_NE(rng::normal(42, 7, 0), rng::normal(42, 8, 0));
  EXPECT_EQ(rng::normal(42, 7, 3), rng::normal(42, 7, 3));
}
