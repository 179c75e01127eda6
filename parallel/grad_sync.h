// Data-parallel gradient averaging. After a step's micro-batches every rank holds the gradient
// of its own samples; all_reduce_mean() replaces it by the mean over the data-parallel ranks
// (expert parameters: the sum over the expert-data-parallel group / dp), so that every rank takes the same
// optimizer step. Gradients are packed into buckets of about `bucket_bytes` (Megatron's 25 MB
// default) on the communicator's device, each bucket all-reduced in one call, scaled by 1/N and
// unpacked. A group of size one does nothing (the gradients are already the mean).
#pragma once
#include <memory>
#include <vector>

#include "model/parameter.h"
#include "parallel/process_groups.h"

namespace decotron {

class GradientSync {
 public:
  static constexpr size_t kDefaultBucketBytes = 25u << 20;

  GradientSync(const std::vector<Parameter*>& params, const ParallelContext& ctx,
               size_t bucket_bytes = kDefaultBucketBytes);
  void all_reduce_mean();
  size_t num_buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::shared_ptr<Communicator> group;
    DType dtype;
    double scale;  // applied after the sum: 1 / data-parallel size
    std::vector<Parameter*> params;
    int64_t numel = 0;
    Tensor buffer;  // on group->device(), allocated on first use
  };
  std::vector<Bucket> buckets_;
};

// Whether a parameter's gradient is summed over the expert-data-parallel group (its values
// differ between expert-parallel ranks) rather than the data-parallel group.
bool is_expert_parameter(const Parameter& p);

}  // namespace decotron
