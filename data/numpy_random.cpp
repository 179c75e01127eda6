#include "data/numpy_random.h"

namespace decotron::data {

uint64_t NumpyRandomState::interval(uint64_t max) {
  if (max == 0) return 0;
  // Smallest 2^b - 1 >= max.
  uint64_t mask = max;
  mask |= mask >> 1;
  mask |= mask >> 2;
  mask |= mask >> 4;
  mask |= mask >> 8;
  mask |= mask >> 16;
  mask |= mask >> 32;
  uint64_t v;
  if (max <= 0xffffffffull) {
    do {
      v = next32() & mask;
    } while (v > max);
  } else {
    // Only reachable for arrays of more than 4G elements; the high word is drawn first.
    do {
      uint64_t hi = next32();
      uint64_t lo = next32();
      v = ((hi << 32) | lo) & mask;
    } while (v > max);
  }
  return v;
}

// numpy's pairwise_sum (numpy/core/src/umath/loops_utils.h.src), unrolled by 8.
double numpy_sum(std::span<const double> a) {
  const size_t n = a.size();
  if (n < 8) {
    double res = 0.0;
    for (size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t h = n / 2;
  h -= h % 8;
  return numpy_sum(a.subspan(0, h)) + numpy_sum(a.subspan(h));
}

}  // namespace decotron::data
