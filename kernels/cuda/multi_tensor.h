// The CUDA half of kernels/multi_tensor.h: the tables of a fixed tensor list, uploaded once,
// and the launches over them. CUDA builds only.
#pragma once
#ifdef DECOTRON_WITH_CUDA
#include <vector>

#include "core/tensor.h"
#include "kernels/multi_tensor.h"

namespace decotron::cuda {

// Every tensor is cut into chunks of kMultiTensorChunk elements (the last one shorter); a block
// takes a chunk at a time. The chunking depends on the sizes alone, so do the sums.
constexpr int64_t kMultiTensorChunk = 16384;

class MultiTensorAdamWLaunch {
 public:
  explicit MultiTensorAdamWLaunch(const std::vector<ops::AdamWTensor>& tensors);
  void run(const ops::AdamWStep& s, double grad_scale) const;

 private:
  Tensor table_, chunks_;  // device: per tensor its pointers, size and decay; per chunk (tensor, first element)
  int64_t chunk_count_ = 0;
};

class MultiTensorSquaresLaunch {
 public:
  explicit MultiTensorSquaresLaunch(const std::vector<Tensor>& tensors);
  std::vector<double> run() const;

 private:
  Tensor table_, chunks_, first_chunk_;  // device; first_chunk_: per tensor, its chunks' range
  int64_t chunk_count_ = 0, tensor_count_ = 0;
};

}  // namespace decotron::cuda
#endif
