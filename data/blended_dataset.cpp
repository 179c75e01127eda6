#include "data/blended_dataset.h"

#include <cmath>

#include "core/error.h"
#include "data/numpy_random.h"

namespace decotron::data {

std::vector<double> normalize_weights(std::span<const double> w) {
  for (double v : w)
    if (!std::isfinite(v) || v < 0) fail("blend weight ", v, " is invalid; weights must be finite and >= 0");
  const double sum = numpy_sum(w);
  if (!(sum > 0)) fail("all blend weights are 0; give at least one dataset a positive weight");
  std::vector<double> out(w.begin(), w.end());
  for (double& v : out) v /= sum;
  return out;
}

BlendIndices build_blending_indices(std::span<const double> weights, int64_t size) {
  const size_t K = weights.size();
  if (K == 0 || K > 32766) fail("a blend needs 1 to 32766 datasets, got ", K);
  BlendIndices out;
  out.dataset_index.resize(static_cast<size_t>(size));
  out.dataset_sample_index.resize(static_cast<size_t>(size));
  std::vector<int64_t> count(K, 0);
  for (int64_t s = 0; s < size; ++s) {
    const double sd = std::max(static_cast<double>(s), 1.0);
    int64_t best = -1;
    double best_err = 0;
    for (size_t k = 0; k < K; ++k) {
      if (weights[k] == 0.0) continue;  // Megatron could pick it on a tie; we never do
      const double err = weights[k] * sd - static_cast<double>(count[k]);
      if (best < 0 || err > best_err) {
        best = static_cast<int64_t>(k);
        best_err = err;
      }
    }
    DT_ASSERT(best >= 0, "no dataset with a positive weight");
    out.dataset_index[s] = static_cast<int16_t>(best);
    out.dataset_sample_index[s] = count[best]++;
  }
  return out;
}

BlendIndices build_exhaustive_blending_indices(std::span<const int64_t> sizes) {
  const size_t K = sizes.size();
  if (K == 0 || K > 32766) fail("a blend needs 1 to 32766 datasets, got ", K);
  int64_t total = 0;
  for (int64_t L : sizes) total += L;
  std::vector<double> w(K);
  for (size_t k = 0; k < K; ++k) w[k] = static_cast<double>(sizes[k]) / static_cast<double>(total);
  std::vector<int64_t> count(K, 0);
  BlendIndices out;
  out.dataset_index.reserve(static_cast<size_t>(total));
  out.dataset_sample_index.reserve(static_cast<size_t>(total));
  for (int64_t s = 0; s < total; ++s) {
    const double sd = std::max(static_cast<double>(s), 1.0);
    int64_t best = -1;
    double best_err = 0;
    for (size_t k = 0; k < K; ++k) {
      if (count[k] >= sizes[k]) continue;  // spent
      const double err = w[k] * sd - static_cast<double>(count[k]);
      if (best < 0 || err > best_err) {
        best = static_cast<int64_t>(k);
        best_err = err;
      }
    }
    out.dataset_index.push_back(static_cast<int16_t>(best));
    out.dataset_sample_index.push_back(count[best]++);
  }
  return out;
}

BlendedDataset::BlendedDataset(std::shared_ptr<const GptDataset> only) : size_(only->size()) {
  parts_.push_back(std::move(only));
}

BlendedDataset::BlendedDataset(std::vector<std::shared_ptr<const GptDataset>> parts, BlendIndices idx)
    : parts_(std::move(parts)), idx_(std::move(idx)), size_(static_cast<int64_t>(idx_.dataset_index.size())) {
  DT_ASSERT(!parts_.empty() && idx_.dataset_index.size() == idx_.dataset_sample_index.size());
  std::vector<int64_t> need(parts_.size(), 0);
  for (int64_t s = 0; s < size_; ++s) {
    const int k = idx_.dataset_index[s];
    DT_ASSERT(k >= 0 && k < static_cast<int>(parts_.size()));
    need[k] = std::max(need[k], idx_.dataset_sample_index[s] + 1);
  }
  for (size_t k = 0; k < parts_.size(); ++k)
    if (need[k] > parts_[k]->size())
      fail("blend component ", k, " (", parts_[k]->data().prefix(), ", split ", split_name(parts_[k]->split()),
           ") has ", parts_[k]->size(), " samples but the blend needs ", need[k],
           ". Request more samples for it (raise its weight) or check the split.");
}

std::pair<int, int64_t> BlendedDataset::locate(int64_t i) const {
  DT_ASSERT(i >= 0 && i < size_, "sample ", i, " of ", size_);
  if (idx_.dataset_index.empty()) return {0, i};
  return {idx_.dataset_index[i], idx_.dataset_sample_index[i]};
}

void BlendedDataset::get(int64_t i, int32_t* out) const {
  auto [k, j] = locate(i);
  parts_[k]->get(j, out);
}

std::shared_ptr<BlendedDataset> build_split_dataset(const BlendSpec& spec, Split split, std::optional<int64_t> N) {
  const size_t K = spec.prefixes.size();
  if (K == 0) fail("no data prefixes given; set data.prefixes (or --data-prefix)");
  if (!spec.weights.empty() && spec.weights.size() != K)
    fail(spec.weights.size(), " blend weights for ", K, " data prefixes; give one weight per prefix or none");
  auto open = [&](size_t k) { return std::make_shared<const IndexedDataset>(spec.prefixes[k], spec.vocab_size); };

  if (spec.weights.empty() && K == 1)
    return std::make_shared<BlendedDataset>(std::make_shared<const GptDataset>(open(0), split, N, spec.gpt));

  std::vector<std::shared_ptr<const GptDataset>> parts(K);
  if (!spec.weights.empty()) {
    if (!N) fail("a weighted blend needs the number of samples of split '", split_name(split), "'");
    const std::vector<double> w = normalize_weights(spec.weights);
    int64_t size = 0;
    for (size_t k = 0; k < K; ++k) {
      const int64_t t = static_cast<int64_t>(std::ceil(static_cast<double>(*N) * w[k]));
      const int64_t b = static_cast<int64_t>(std::ceil(static_cast<double>(t) * (1 + 0.5 / 100)));
      size += t;
      // Zero-weight components are not built at all (their split may even be empty).
      if (w[k] > 0) parts[k] = std::make_shared<const GptDataset>(open(k), split, b, spec.gpt);
    }
    // BlendedDataset normalises a second time, which can move a weight by an ulp.
    const std::vector<double> w2 = normalize_weights(w);
    std::shared_ptr<const GptDataset> any;
    for (auto& p : parts)
      if (p) any = p;
    for (auto& p : parts)
      if (!p) p = any;  // placeholder for a zero-weight component; never chosen
    return std::make_shared<BlendedDataset>(parts, build_blending_indices(w2, size));
  }
  std::vector<int64_t> L(K);
  for (size_t k = 0; k < K; ++k) {
    parts[k] = std::make_shared<const GptDataset>(open(k), split, std::nullopt, spec.gpt);
    L[k] = parts[k]->size();
  }
  if (!N) return std::make_shared<BlendedDataset>(parts, build_exhaustive_blending_indices(L));
  std::vector<double> lw(K);
  int64_t total = 0;
  for (size_t k = 0; k < K; ++k) {
    lw[k] = static_cast<double>(L[k]);
    total += L[k];
  }
  return std::make_shared<BlendedDataset>(parts, build_blending_indices(normalize_weights(lw), std::min(*N, total)));
}

}  // namespace decotron::data
