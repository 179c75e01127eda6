#include "inference/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace decotron::inference {

int32_t argmax(const float* logits, int64_t n) {
  DT_ASSERT(n > 0, "argmax of nothing");
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

Sampler::Sampler(const SamplingOptions& opt) : opt_(opt), rng_(opt.seed) {
  if (opt.temperature < 0) fail("--temperature ", opt.temperature, ": must be >= 0 (0 is greedy)");
  if (opt.top_k < 0) fail("--top-k ", opt.top_k, ": must be >= 0 (0 keeps all tokens)");
  if (!(opt.top_p > 0 && opt.top_p <= 1)) fail("--top-p ", opt.top_p, ": must be in (0, 1]");
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  if (opt_.temperature == 0) return argmax(logits, n);
  // Candidates sorted by logit (ties by id, so the order is fully determined).
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t k = opt_.top_k > 0 ? std::min<int64_t>(opt_.top_k, n) : n;
  auto better = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), better);
  idx.resize(k);
  std::vector<double> p(k);
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += (p[i] = std::exp((logits[idx[i]] - mx) / opt_.temperature));
  for (double& v : p) v /= sum;
  int64_t keep = k;
  if (opt_.top_p < 1) {
    double c = 0;
    for (keep = 0; keep < k;) {
      c += p[keep++];
      if (c >= opt_.top_p) break;
    }
  }
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += p[i];
  // A uniform draw in [0, total) from the top 53 bits of the generator (portable, unlike
  // std::uniform_real_distribution whose algorithm is implementation-defined).
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * total;
  double c = 0;
  for (int64_t i = 0; i < keep; ++i) {
    c += p[i];
    if (u < c) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace decotron::inference
