// Causal grouped-query attention through cuDNN's fused SDPA (cudnn_attention.h), after llm.c's
// cudnn_att.cpp: one cuDNN graph per (direction, shape), built on first use and cached (building
// is slow: tens of milliseconds), executed with the tensors' pointers on the context's stream.
// Layouts need no copies: q [B, S, H, D] is cuDNN's [B, H, S, D] with strides (S H D, D, H D, 1);
// lse [B, H, S] fp32 is its softmax "Stats" [B, H, S, 1] (natural-log log-sum-exp of the scaled
// scores, as ours). Compiled to nothing without DECOTRON_WITH_CUDNN.
#include "kernels/cuda/cudnn_attention.h"

#ifndef DECOTRON_WITH_CUDNN
namespace decotron::cuda {
bool cudnn_attention_built() { return false; }
bool cudnn_attention_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, const ops::AttnShape&) {
  return false;
}
bool cudnn_attention_backward(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const ops::AttnShape&) {
  return false;
}
}  // namespace decotron::cuda
#else
#include <cudnn_frontend.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>

#include "kernels/cuda/common.cuh"

namespace decotron::cuda {

namespace {

namespace fe = cudnn_frontend;

enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kScale, kDO, kDQ, kDK, kDV };

// The one cuDNN handle of the process, on the context's stream (set again on every call: the
// context may have been made after the handle).
cudnnHandle_t handle() {
  static cudnnHandle_t h = [] {
    cudnnHandle_t x = nullptr;
    const cudnnStatus_t st = cudnnCreate(&x);
    if (st != CUDNN_STATUS_SUCCESS) fail("cudnnCreate failed: ", cudnnGetErrorString(st));
    return x;
  }();
  const cudnnStatus_t st = cudnnSetStream(h, context().stream);
  if (st != CUDNN_STATUS_SUCCESS) fail("cudnnSetStream failed: ", cudnnGetErrorString(st));
  return h;
}

using Key = std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t>;  // backward?, B, S, H, G, D
struct Entry {
  std::shared_ptr<fe::graph::Graph> graph;  // null: cuDNN has no plan for this shape
  int64_t workspace = 0;
};

// [B, S, heads, D] as cuDNN's [B, heads, S, D].
std::shared_ptr<fe::graph::Tensor_attributes> bshd(fe::graph::Graph& g, const char* name, Uid uid, int64_t B, int64_t S,
                                                   int64_t heads, int64_t D) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({B, heads, S, D})
                      .set_stride({S * heads * D, D, heads * D, 1}));
}

void mark_bshd(const std::shared_ptr<fe::graph::Tensor_attributes>& t, Uid uid, int64_t B, int64_t S, int64_t heads,
               int64_t D) {
  t->set_output(true).set_uid(uid).set_dim({B, heads, S, D}).set_stride({S * heads * D, D, heads * D, 1});
}

std::shared_ptr<fe::graph::Tensor_attributes> stats_tensor(fe::graph::Graph& g, int64_t B, int64_t H, int64_t S) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name("stats")
                      .set_uid(kStats)
                      .set_dim({B, H, S, 1})
                      .set_stride({H * S, S, 1, 1})
                      .set_data_type(fe::DataType_t::FLOAT));
}

std::shared_ptr<fe::graph::Tensor_attributes> scale_tensor(fe::graph::Graph& g) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name("attn_scale")
                      .set_uid(kScale)
                      .set_dim({1, 1, 1, 1})
                      .set_stride({1, 1, 1, 1})
                      .set_is_pass_by_value(true)
                      .set_data_type(fe::DataType_t::FLOAT));
}

// Builds (once per key) the forward or backward graph; a failure is remembered and reported once.
const Entry& graph_for(bool backward, const ops::AttnShape& s) {
  static std::map<Key, Entry> cache;
  const Key key{backward, s.batch, s.seq, s.heads, s.kv_heads, s.head_dim};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const int64_t B = s.batch, S = s.seq, H = s.heads, G = s.kv_heads, D = s.head_dim;
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto q = bshd(*g, "q", kQ, B, S, H, D), k = bshd(*g, "k", kK, B, S, G, D), v = bshd(*g, "v", kV, B, S, G, D);
  auto scale = scale_tensor(*g);
  if (!backward) {
    auto opt =
        fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(true).set_causal_mask(true).set_attn_scale(
            scale);
    auto [o, stats] = g->sdpa(q, k, v, opt);
    mark_bshd(o, kO, B, S, H, D);
    stats->set_output(true)
        .set_uid(kStats)
        .set_data_type(fe::DataType_t::FLOAT)
        .set_dim({B, H, S, 1})
        .set_stride({H * S, S, 1, 1});
  } else {
    auto o = bshd(*g, "o", kO, B, S, H, D), dout = bshd(*g, "dout", kDO, B, S, H, D);
    auto stats = stats_tensor(*g, B, H, S);
    auto opt = fe::graph::SDPA_backward_attributes()
                   .set_name("sdpa_backward")
                   .set_causal_mask(true)
                   .set_attn_scale(scale)
                   .set_deterministic_algorithm(true);
    auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, opt);
    mark_bshd(dq, kDQ, B, S, H, D);
    mark_bshd(dk, kDK, B, S, G, D);
    mark_bshd(dv, kDV, B, S, G, D);
  }
  Entry e;
  std::string why;
  cudnnHandle_t h = handle();
  if (fe::error_t r = g->validate(); !r.is_good())
    why = "validate: " + r.get_message();
  else if (r = g->build_operation_graph(h); !r.is_good())
    why = "build_operation_graph: " + r.get_message();
  else if (r = g->create_execution_plans({fe::HeurMode_t::A}); !r.is_good())
    why = "create_execution_plans: " + r.get_message();
  else if (r = g->check_support(h); !r.is_good())
    why = "check_support: " + r.get_message();
  else if (r = g->build_plans(h); !r.is_good())
    why = "build_plans: " + r.get_message();
  else if (r = g->get_workspace_size(e.workspace); !r.is_good())
    why = "get_workspace_size: " + r.get_message();
  if (why.empty()) {
    e.graph = g;
  } else {
    std::fprintf(stderr,
                 "note: cuDNN attention %s has no plan for B %lld S %lld H %lld G %lld D %lld (%s); using "
                 "the flash kernels\n",
                 backward ? "backward" : "forward", static_cast<long long>(B), static_cast<long long>(S),
                 static_cast<long long>(H), static_cast<long long>(G), static_cast<long long>(D), why.c_str());
  }
  return cache.emplace(key, std::move(e)).first->second;
}

bool usable(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->dtype() != DType::bf16 || t->device() != Device::cuda || reinterpret_cast<uintptr_t>(t->raw()) % 16 != 0)
      return false;
  return cudnnGetVersion() >= 90000;
}

void run(const Entry& e, std::unordered_map<int64_t, void*>& pack) {
  Tensor ws = scratch(std::max<int64_t>(1, (e.workspace + 3) / 4), DType::i32);
  fe::error_t r = e.graph->execute(handle(), pack, ws.raw());
  if (!r.is_good()) fail("cuDNN attention: execute failed: ", r.get_message());
}

}  // namespace

bool cudnn_attention_built() { return true; }

bool cudnn_attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const ops::AttnShape& s) {
  if (!usable({&out, &q, &k, &v}) || lse.dtype() != DType::f32) return false;
  const Entry& e = graph_for(false, s);
  if (!e.graph) return false;
  float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  std::unordered_map<int64_t, void*> pack = {{kQ, q.raw()},   {kK, k.raw()},       {kV, v.raw()},
                                             {kO, out.raw()}, {kStats, lse.raw()}, {kScale, &scale}};
  run(e, pack);
  return true;
}

bool cudnn_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& out, const Tensor& lse, const ops::AttnShape& s) {
  if (!usable({&dq, &dk, &dv, &dout, &q, &k, &v, &out}) || lse.dtype() != DType::f32) return false;
  const Entry& e = graph_for(true, s);
  if (!e.graph) return false;
  float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  std::unordered_map<int64_t, void*> pack = {{kQ, q.raw()},     {kK, k.raw()},       {kV, v.raw()},    {kO, out.raw()},
                                             {kDO, dout.raw()}, {kStats, lse.raw()}, {kScale, &scale}, {kDQ, dq.raw()},
                                             {kDK, dk.raw()},   {kDV, dv.raw()}};
  run(e, pack);
  return true;
}

}  // namespace decotron::cuda
#endif  // DECOTRON_WITH_CUDNN
