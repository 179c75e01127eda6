// numpy-compatible random numbers, reproduced bit for bit so that Decotron visits samples in
// exactly the order Megatron-LM does (spec: docs megatron-data-format.md section 7).
//
// numpy's legacy RandomState(seed) with an integer seed in [0, 2^32-1] seeds MT19937 with the
// reference init_genrand recurrence (NOT init_by_array, which numpy uses only for array or
// out-of-range seeds). std::mt19937(seed) is that same recurrence, so its raw 32-bit outputs are
// numpy's. Everything above the raw draws (interval, shuffle) is written out here because
// std::shuffle / std::uniform_int_distribution are implementation-defined.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <utility>

namespace decotron::data {

class NumpyRandomState {
 public:
  explicit NumpyRandomState(uint32_t seed) : mt_(seed) {}

  // One raw 32-bit MT19937 output (numpy's random_state.randint(2**32) / tomaxint path).
  uint32_t next32() { return static_cast<uint32_t>(mt_()); }

  // Uniform integer in [0, max] by masked rejection (numpy's legacy `random_interval`).
  uint64_t interval(uint64_t max);

  // numpy RandomState.shuffle on a 1-D array: Fisher-Yates from the end. The element type does
  // not change the draws.
  template <class T>
  void shuffle(std::span<T> a) {
    if (a.size() < 2) return;
    for (size_t i = a.size() - 1; i >= 1; --i) {
      size_t j = static_cast<size_t>(interval(i));
      std::swap(a[i], a[j]);
    }
  }

 private:
  std::mt19937 mt_;
};

// numpy.sum of a float64 array: pairwise summation with 8 accumulators (section 7.4). Used for
// weight and split normalisation, where a left-to-right sum can differ by an ulp.
double numpy_sum(std::span<const double> a);

}  // namespace decotron::data
