// numpy RandomState reproduction, against the spec's section-9 vectors (taken from numpy).
#include <gtest/gtest.h>

#include <numeric>

#include "data/numpy_random.h"

using namespace decotron::data;

TEST(MtNumpy, RawOutputsMatchRandomState1234) {
  NumpyRandomState r(1234);
  EXPECT_EQ(r.next32(), 822569775u);
  EXPECT_EQ(r.next32(), 2137449171u);
  EXPECT_EQ(r.next32(), 2671936806u);
}

TEST(MtNumpy, ShuffleArange10MatchesNumpy) {
  struct Case {
    uint32_t seed;
    std::vector<int> want;
  };
  const std::vector<Case> cases = {
      {0, {2, 8, 4, 9, 1, 6, 7, 3, 0, 5}},
      {1, {2, 9, 6, 4, 0, 3, 1, 7, 8, 5}},
      {1234, {7, 2, 9, 1, 0, 8, 4, 5, 6, 3}},
      {4294967295u, {6, 9, 5, 1, 8, 0, 7, 4, 2, 3}},
  };
  for (const auto& c : cases) {
    std::vector<int> a(10);
    std::iota(a.begin(), a.end(), 0);
    NumpyRandomState r(c.seed);
    r.shuffle(std::span<int>(a));
    EXPECT_EQ(a, c.want) << "seed " << c.seed;
    // The element type must not change the draws.
    std::vector<int64_t> b(10);
    std::iota(b.begin(), b.end(), 0);
    NumpyRandomState r2(c.seed);
    r2.shuffle(std::span<int64_t>(b));
    EXPECT_EQ(std::vector<int>(b.begin(), b.end()), c.want) << "seed " << c.seed;
  }
}

TEST(MtNumpy, IntervalStaysInRangeAndZeroDrawsNothing) {
  NumpyRandomState a(7), b(7);
  EXPECT_EQ(a.interval(0), 0u);  // no draw: a and b stay in step
  EXPECT_EQ(a.next32(), b.next32());
  for (uint64_t m : {1ull, 2ull, 5ull, 1000ull, 0xffffffffull}) {
    for (int k = 0; k < 200; ++k) EXPECT_LE(a.interval(m), m);
  }
}

TEST(MtNumpy, SumIsSequentialBelowEightElements) {
  std::vector<double> v = {0.1, 0.2, 0.3, 1e16, -1e16, 0.7};
  double seq = 0;
  for (double x : v) seq += x;
  EXPECT_EQ(numpy_sum(v), seq);
  std::vector<double> exact(300);
  for (size_t i = 0; i < exact.size(); ++i) exact[i] = static_cast<double>(i);
  EXPECT_EQ(numpy_sum(exact), 299.0 * 300 / 2);
}
