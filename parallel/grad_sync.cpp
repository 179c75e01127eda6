#include "parallel/grad_sync.h"

#include "core/error.h"
#include "kernels/ops.h"

namespace decotron {

bool is_expert_parameter(const Parameter& p) {
  return p.partition == Partition::expert_rows || p.partition == Partition::expert_cols;
}

GradientSync::GradientSync(const std::vector<Parameter*>& params, const ParallelContext& ctx, size_t bucket_bytes) {
  // Buckets keep parameter order (the order backward finishes them in reverse, which a future
  // overlap with the backward pass would use) and never mix groups or dtypes.
  // Every rank's loss is the mean over its own samples, so the mean gradient is the sum over the
  // data-parallel ranks / dp. Expert parameters have already summed the tokens of the whole
  // expert-parallel group (the pairs came to them): they are summed over the expert-data-parallel
  // group only, and divided by the same dp, so that their gradient does not depend on the
  // expert-parallel size.
  const double scale = 1.0 / ctx.layout.dp_size;
  for (Parameter* p : params) {
    if (!p->trainable) continue;
    std::shared_ptr<Communicator> group = is_expert_parameter(*p) ? ctx.edp : ctx.dp;
    if (group->size() == 1 && ctx.layout.dp_size == 1) continue;
    DType dt = p->grad.dtype();
    DT_ASSERT(dt == DType::f32 || dt == DType::f64, "gradient of ", p->name, " is ", dtype_name(dt),
              "; data-parallel averaging handles fp32 and fp64 gradients");
    const size_t bytes = p->grad.nbytes();
    Bucket* b = nullptr;
    for (auto it = buckets_.rbegin(); it != buckets_.rend(); ++it)
      if (it->group == group && it->dtype == dt) {
        b = &*it;
        break;
      }
    if (!b || (b->numel > 0 && (b->numel * dtype_size(dt) + bytes) > bucket_bytes)) {
      buckets_.push_back(Bucket{group, dt, scale, {}, 0, {}});
      b = &buckets_.back();
    }
    b->params.push_back(p);
    b->numel += p->grad.numel();
  }
}

void GradientSync::all_reduce_mean() {
  for (Bucket& b : buckets_) {
    if (!b.buffer.defined()) b.buffer = Tensor::empty({b.numel}, b.dtype, b.group->device());
    int64_t off = 0;
    for (Parameter* p : b.params) {
      const int64_t n = p->grad.numel();
      b.buffer.rows(off, n).copy_from(p->grad.view({n}));
      off += n;
    }
    if (b.group->size() > 1)
      b.group->all_reduce(b.buffer.raw(), b.numel, b.dtype == DType::f32 ? CommType::f32 : CommType::f64);
    ops::scale_(b.buffer, b.scale);
    off = 0;
    for (Parameter* p : b.params) {
      const int64_t n = p->grad.numel();
      Tensor g = p->grad.view({n});
      g.copy_from(b.buffer.rows(off, n));
      off += n;
    }
  }
}

}  // namespace decotron
