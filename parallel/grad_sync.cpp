#include "parallel/grad_sync.h"

#include <algorithm>

#include "core/error.h"

namespace decotron {

GradientSync::GradientSync(const std::vector<Parameter*>& params, const ParallelContext& ctx, Options opt)
    : overlap_param_gather_(opt.overlap_param_gather) {
  // Group the trainable parameters by (communicator, dtype), in backward order: the reverse of
  // creation. The buffers come out in the same order on every rank (which group a parameter
  // belongs to does not depend on the rank), and so do their collectives.
  struct Members {
    std::shared_ptr<Communicator> group;
    DType dtype;
    std::vector<Parameter*> params;
    std::vector<size_t> index;  // creation indices
  };
  std::vector<Members> groups;
  for (size_t i = params.size(); i-- > 0;) {
    Parameter* p = params[i];
    if (!p->trainable) continue;
    std::shared_ptr<Communicator> group = is_expert_partition(p->partition) ? ctx.edp : ctx.dp;
    // A group of one still scales when the data-parallel size is not one (expert parameters at
    // expert-parallel size = data-parallel size).
    if (group->size() == 1 && ctx.layout.dp_size == 1) continue;
    const DType dt = p->grad.dtype();
    DT_ASSERT(dt == DType::f32 || dt == DType::f64, "gradient of ", p->name, " is ", dtype_name(dt),
              "; data-parallel averaging handles fp32 and fp64 gradients");
    Members* m = nullptr;
    for (Members& g : groups)
      if (g.group == group && g.dtype == dt) m = &g;
    if (!m) m = &groups.emplace_back(Members{group, dt, {}, {}});
    m->params.push_back(p);
    m->index.push_back(i);
  }
  for (Members& g : groups) {
    // Every rank's loss is the mean over its own samples, so the mean gradient is the sum over
    // the data-parallel ranks / dp. Expert parameters have already summed the tokens of their
    // whole expert-parallel group (the pairs came to them): they are summed over the
    // expert-data-parallel group only and divided by the same dp, so that their gradient does
    // not depend on the expert-parallel size.
    const double scale = 1.0 / ctx.layout.dp_size;
    const int64_t bucket_numel = std::max<int64_t>(1, opt.bucket_bytes / dtype_size(g.dtype));
    auto buf = std::make_unique<GradBuffer>(g.group, g.params, bucket_numel, opt.distributed_optimizer, scale);
    std::vector<size_t> ready;
    for (const BufferLayout::Bucket& b : buf->layout().buckets) ready.push_back(g.index[b.last - 1]);
    ready_at_.push_back(std::move(ready));
    buffers_.push_back(std::move(buf));
  }
}

bool GradientSync::distributed() const {
  for (const auto& b : buffers_)
    if (b->distributed()) return true;
  return false;
}

size_t GradientSync::num_buckets() const {
  size_t n = 0;
  for (const auto& b : buffers_) n += b->num_buckets();
  return n;
}

void GradientSync::grads_final(size_t first) {
  for (size_t k = 0; k < buffers_.size(); ++k) {
    GradBuffer& buf = *buffers_[k];
    // Buckets hold parameters in backward order, so they become ready in bucket order.
    for (size_t b = 0; b < buf.num_buckets() && ready_at_[k][b] >= first; ++b)
      if (!buf.in_flight(b)) buf.start_grad_sync(b);
    buf.poke();
  }
}

void GradientSync::finish_grad_sync() {
  for (const auto& buf : buffers_)
    for (size_t b = 0; b < buf->num_buckets(); ++b)
      if (!buf->in_flight(b)) buf->start_grad_sync(b);
  for (const auto& buf : buffers_)
    for (size_t b = 0; b < buf->num_buckets(); ++b) buf->finish_grad_sync(b);
}

void GradientSync::sync_params() {
  for (const auto& buf : buffers_)
    if (buf->distributed()) buf->start_param_sync();
  if (!overlap_param_gather_) finish_param_sync();
}

void GradientSync::params_needed(size_t end) {
  for (size_t k = 0; k < buffers_.size(); ++k) {
    GradBuffer& buf = *buffers_[k];
    if (!buf.distributed()) continue;
    // Bucket b holds parameters of creation index ready_at_[k][b] and above (backward order).
    for (size_t b = 0; b < buf.num_buckets(); ++b)
      if (ready_at_[k][b] < end) buf.finish_param_sync(b);
    buf.poke();
  }
}

void GradientSync::finish_param_sync() {
  for (const auto& buf : buffers_)
    for (size_t b = 0; b < buf->num_buckets(); ++b) buf->finish_param_sync(b);
}

}  // namespace decotron
