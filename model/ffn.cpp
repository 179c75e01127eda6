// The dense SwiGLU FFN and the DECO FFN (deco-model.md, "The DECO FFN", steps 1-8).
#include <algorithm>
#include <cmath>
#include <vector>

#include "model/layers.h"
#include "parallel/tensor_parallel.h"

namespace decotron {

SwiGLULayer::SwiGLULayer(ParameterSet& ps, const std::string& name, int64_t hidden, int64_t width, double init_std)
    : w_gate_(ps.add(name + ".w_gate", {width, hidden}, Partition::column, Init::normal, init_std, true)),
      w_up_(ps.add(name + ".w_up", {width, hidden}, Partition::column, Init::normal, init_std, true)),
      w_down_(ps.add(name + ".w_down", {hidden, width}, Partition::row, Init::normal, init_std, true)) {}

Tensor SwiGLULayer::forward(const Tensor& x) {
  x_ = x;
  const int64_t T = x.numel() / x.dim(-1), F = w_up_.value.dim(0);
  gate_ = Tensor::empty({T, F}, x.dtype(), x.device());
  up_ = Tensor::empty({T, F}, x.dtype(), x.device());
  h_ = Tensor::empty({T, F}, x.dtype(), x.device());
  ops::linear_forward(gate_, x, w_gate_.w());
  ops::linear_forward(up_, x, w_up_.w());
  ops::swiglu_forward(h_, gate_, up_);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  ops::linear_forward(y, h_, w_down_.w());  // under tp: partial sums over the width slices
  return y;
}

Tensor SwiGLULayer::backward(const Tensor& dy, Tensor* accumulate_into) {
  Tensor dh = Tensor::empty(h_.shape(), dy.dtype(), dy.device());
  ops::linear_backward(&dh, &w_down_.grad, dy, h_, w_down_.w());
  Tensor dgate = Tensor::empty(h_.shape(), dy.dtype(), dy.device());
  Tensor dup = Tensor::empty(h_.shape(), dy.dtype(), dy.device());
  ops::swiglu_backward(dgate, dup, dh, gate_, up_);
  Tensor dx = accumulate_into ? *accumulate_into : Tensor::empty(x_.shape(), dy.dtype(), dy.device());
  ops::linear_backward(&dx, &w_gate_.grad, dgate, x_, w_gate_.w(), accumulate_into != nullptr);
  ops::linear_backward(&dx, &w_up_.grad, dup, x_, w_up_.w(), true);  // under tp: partial sums
  return dx;
}

namespace {
// Modes with NormSiLU's mean step (mu = x . w_bar), whose terms the pair path applies per token.
bool has_mean_step(ops::NormSiluMode m) { return m == ops::NormSiluMode::full || m == ops::NormSiluMode::no_rms; }
}  // namespace

ops::NormSiluMode normsilu_mode(const std::string& s) {
  if (s == "full") return ops::NormSiluMode::full;
  if (s == "no_mean") return ops::NormSiluMode::no_mean;
  if (s == "no_rms") return ops::NormSiluMode::no_rms;
  return ops::NormSiluMode::silu;
}

DecoFFNLayer::DecoFFNLayer(ParameterSet& ps, const std::string& name, const ModelConfig& cfg, Communicator* tp,
                           Communicator* ep)
    : tp_(tp && tp->size() > 1 ? tp : nullptr),
      ep_(ep && ep->size() > 1 ? ep : nullptr),
      experts_(cfg.experts),
      width_(cfg.expert_width),
      mode_(normsilu_mode(cfg.normsilu)),
      eps_(cfg.norm_eps),
      gated_(cfg.gated_experts),
      sparse_(cfg.expert_compute == "sparse"),
      w_router_(ps.add(name + ".w_router", {cfg.experts, cfg.hidden}, Partition::replicated, Init::normal,
                       cfg.init_std, true)),
      w_up_(ps.add(name + ".w_up", {cfg.experts * cfg.expert_width, cfg.hidden}, Partition::expert_rows,
                   Init::normal, cfg.init_std, true, cfg.expert_width)),
      gamma_(ps.add(name + ".gamma", {cfg.expert_width}, Partition::replicated, Init::ones, 1.0, false)),
      w_down_(ps.add(name + ".w_down", {cfg.hidden, cfg.experts * cfg.expert_width}, Partition::expert_cols,
                     Init::normal, cfg.init_std, true, cfg.expert_width)) {
  if (cfg.expert_scaling == "expert") {
    g_ = &ps.add(name + ".g", {cfg.experts}, Partition::expert_entries, Init::constant, cfg.router_scale_init, false, 1);
  } else if (cfg.expert_scaling == "scalar") {
    g_ = &ps.add(name + ".g", {1}, Partition::replicated, Init::constant, cfg.router_scale_init, false);
  } else if (cfg.expert_scaling == "fixed") {
    g_ = &ps.add(name + ".g", {cfg.experts}, Partition::expert_entries, Init::constant, cfg.router_scale_init, false, 1);
    g_->trainable = false;
  } else {
    Tensor one = Tensor::empty({1}, DType::f64);
    one.data<double>()[0] = 1.0;
    unit_scale_ = cast_cpu(one, ps.dtype()).to(ps.device());
  }
  w_router_.full_precision = true;
  if (g_) g_->full_precision = true;
  if (gated_)
    w_gate_ = &ps.add(name + ".w_gate", {cfg.experts * cfg.expert_width, cfg.hidden}, Partition::expert_rows,
                      Init::normal, cfg.init_std, true, cfg.expert_width);
  if (cfg.shared_expert_width > 0)
    shared_ = std::make_unique<SwiGLULayer>(ps, name + ".shared", cfg.hidden, cfg.shared_expert_width, cfg.init_std);
  // Tensor parallelism gives each rank a slice of whole experts; expert parallelism splits the
  // slice over the expert-parallel ranks. Both run the pair path (the dense-masked math when
  // expert_compute is dense: every pair of the slice is sent).
  if (sparse_ || tp_ || ep_) {
    // The TP x EP grid splits the experts with balanced_block, as ParameterSet splits W_up and
    // W_down: grid rank tp_rank * EP + ep_rank holds one contiguous block.
    const int tp_size = tp_ ? tp_->size() : 1, tp_rank = tp_ ? tp_->rank() : 0, ep_size = ep_ ? ep_->size() : 1;
    std::vector<int64_t> bounds;
    for (int k = 0; k <= ep_size; ++k) {
      const int g = tp_rank * ep_size + k;
      bounds.push_back(g < tp_size * ep_size ? balanced_block(experts_, g, tp_size * ep_size).start : experts_);
    }
    dispatcher_ = std::make_unique<ExpertDispatcher>(ep_, std::move(bounds));
  }
}

void DecoFFNLayer::release() {
  x_ = r_ = s_ = u_ = gate_pre_ = gate_act_ = z_ = nstats_ = y_ = w_bar_ = Tensor();
  received_ = ExpertDispatcher::Received{};
  grouped_ = ops::GroupedExperts{};
  if (dispatcher_) dispatcher_->release();
  if (shared_) shared_->release();
}

void DecoFFNLayer::drop_input() {
  x_ = Tensor();
  if (shared_) shared_->drop_input();
}

void DecoFFNLayer::restore_input(const Tensor& x) {
  x_ = x;
  if (shared_) shared_->restore_input(x);
}

const Tensor& DecoFFNLayer::scaling() const { return g_ ? g_->w() : unit_scale_; }
const Tensor& DecoFFNLayer::pre_weight() const { return gated_ ? w_gate_->w() : w_up_.w(); }

// The router computes in its weight's dtype (the master's, fp32): under bf16 compute its input
// is widened first (T x h, cheap next to the expert GEMMs).
Tensor DecoFFNLayer::router_input(const Tensor& x) const {
  if (x.dtype() == w_router_.w().dtype()) return x;
  Tensor wide = Tensor::empty(x.shape(), w_router_.w().dtype(), x.device());
  ops::convert(wide, x);
  return wide;
}

// A sum over every rank that holds experts of this layer: the expert-parallel group, then the
// tensor-parallel one (each holds a different block of experts).
void DecoFFNLayer::sum_over_expert_ranks(Tensor& t) {
  if (ep_) tp_all_reduce(*ep_, t);
  if (tp_) tp_all_reduce(*tp_, t);
}

Tensor DecoFFNLayer::forward(const Tensor& x, const RegularizerSpec& reg, RoutingStats& stats, double& reg_loss) {
  x_ = x;
  reg_ = reg;
  const int64_t T = x.numel() / x.dim(-1), n = experts_ * width_;
  auto make = [&](int64_t cols) { return Tensor::empty({T, cols}, x.dtype(), x.device()); };
  // 1-3. Router in fp32 (the master dtype), ReLU routing, expert-wise scaling. Replicated under
  // tensor parallelism: every rank computes the whole r and s of its tokens.
  const DType rdt = w_router_.w().dtype();
  r_ = Tensor::empty({T, experts_}, rdt, x.device());
  ops::linear_forward(r_, router_input(x), w_router_.w());
  if (calibrate_ratio_ > 0) fix_logit_shift(r_);
  if (logit_shift_.defined()) ops::add_rows_(r_, logit_shift_, -1.0);
  s_ = Tensor::empty({T, experts_}, rdt, x.device());
  ops::router_scale_forward(s_, r_, scaling());
  Tensor out;
  if (dispatcher_) {
    out = experts_forward_pairs(x);
  } else {
    // 4-5. The dense-masked reference: every expert for every token, u = W_up x, NormSiLU (or
    // the gated ablation), ...
    out = make(x.dim(-1));
    u_ = make(n);
    ops::linear_forward(u_, x, w_up_.w());
    nstats_ = Tensor::empty({T, 1 + experts_}, stats_dtype(x.dtype()), x.device());
    z_ = make(n);
    if (gated_) {
      gate_pre_ = make(n);
      gate_act_ = make(n);
      ops::linear_forward(gate_pre_, x, w_gate_->w());
      ops::normsilu_forward(gate_act_, nstats_, gate_pre_, gamma_.w(), experts_, mode_, eps_);
      ops::mul_forward(z_, gate_act_, u_);
    } else {
      ops::normsilu_forward(z_, nstats_, u_, gamma_.w(), experts_, mode_, eps_);
    }
    // 6. ... then each expert's block scaled by s_e (zero for inactive experts) and projected down.
    y_ = make(n);
    ops::expert_scale_forward(y_, z_, s_, experts_);
    ops::linear_forward(out, y_, w_down_.w());
  }
  // 7. The shared expert, always on.
  if (shared_) ops::add_(out, shared_->forward(x));
  // Under tensor parallelism out is the routed and the shared experts' partial sum: the block
  // reduces it.
  routing_stats(stats, reg, reg_loss);
  // The dense-masked path computes every pair.
  stats.pairs_computed = dispatcher_ ? dispatcher_->pairs_received() : r_.dim(0) * experts_;
  return out;
}

// 4-6 on (token, expert) pairs (model/expert_dispatch.h, kernels/ops.h "grouped experts"):
// only active pairs are gathered, sent to their expert's rank and computed.
Tensor DecoFFNLayer::experts_forward_pairs(const Tensor& x) {
  const int64_t h = x.dim(-1);
  // NormSiLU's mean over all E*d entries is x . w_bar, w_bar the mean row of the whole pre
  // matrix: each rank sums its experts' rows, the ranks holding experts add theirs. Summed from
  // the master weights, rounded once to the compute dtype.
  const Tensor& pre_master = gated_ ? w_gate_->value : w_up_.value;
  Tensor w_bar = Tensor::zeros({h}, pre_master.dtype(), x.device());
  if (has_mean_step(mode_)) {
    ops::sum_rows(w_bar, pre_master);
    sum_over_expert_ranks(w_bar);
    ops::scale_(w_bar, 1.0 / static_cast<double>(experts_ * width_));
  }
  if (w_bar.dtype() == x.dtype()) {
    w_bar_ = w_bar;
  } else {
    w_bar_ = Tensor::empty({h}, x.dtype(), x.device());
    ops::convert(w_bar_, w_bar);
  }
  received_ = dispatcher_->dispatch(x, r_, s_, /*all_pairs=*/!sparse_);
  // mu = x . w_bar once per token (or row received), in the router's dtype (fp32).
  const bool mean = has_mean_step(mode_);
  const Tensor mu = mean ? dispatcher_->pair_dot(x, w_bar_, s_.dtype()) : Tensor();
  Tensor outp = Tensor::empty({received_.index.numel(), h}, x.dtype(), x.device());
  ops::grouped_experts_forward(outp, grouped_, received_.rows, received_.index, received_.offsets, received_.s,
                               mean ? &mu : nullptr, pre_weight(), gated_ ? &w_up_.w() : nullptr, gamma_.w(),
                               w_down_.w(), mode_, eps_);
  // The pairs' rows are x_ (or the dispatcher's received rows): not held here, so that
  // drop_input (sequence parallelism) frees the gathered x.
  received_.rows = Tensor();
  return dispatcher_->combine(outp);
}

void DecoFFNLayer::experts_backward_pairs(const Tensor& dy, Tensor& dx, Tensor& ds) {
  const Tensor& x_rows = dispatcher_->input_rows(x_);
  const int64_t h = dy.dim(-1), P = received_.index.numel();
  // Pair p's output gradient is row index[p] of these (dy itself on one rank).
  const Tensor dout_rows = dispatcher_->dispatch_grad(dy);
  Tensor dxp = Tensor::empty({P, h}, dy.dtype(), dy.device());
  // The scores' and the mean's per-pair gradients in the router's dtype; dgamma in the
  // gradients' (the masters').
  Tensor dsp = Tensor::empty({P}, s_.dtype(), dy.device());
  Tensor gmean = Tensor::empty({P}, s_.dtype(), dy.device());
  Tensor dgamma = Tensor::zeros(gamma_.grad.shape(), gamma_.grad.dtype(), dy.device());
  Parameter& pre = gated_ ? *w_gate_ : w_up_;
  ops::grouped_experts_backward(dxp, dsp, gmean, pre.grad, gated_ ? &w_up_.grad : nullptr, dgamma, w_down_.grad,
                                dout_rows, grouped_, x_rows, received_.index, received_.offsets, received_.s, pre.w(),
                                gated_ ? &w_up_.w() : nullptr, gamma_.w(), w_down_.w(), mode_, eps_);
  // gamma is shared by all experts: tensor-parallel ranks saw the same tokens, different experts.
  if (tp_) tp_all_reduce(*tp_, dgamma);
  ops::add_(gamma_.grad, dgamma);
  const bool mean = has_mean_step(mode_);
  Tensor g;  // per token, the sum of its pairs' g_p over this rank's experts
  dispatcher_->combine_grad(dx, ds, g, dxp, dsp, mean ? gmean : Tensor());
  if (!mean) return;
  // The mean's terms, linear in g_p and the same for every pair of a token, so applied per token
  // (T x h, where per pair they cost P x h): dx_t -= G_t w_bar, and every row of W_pre, on every
  // rank, receives -gx / (E d) with gx = sum_t G_t x_t summed over every rank holding experts.
  ops::add_outer_(dx, g, w_bar_, -1.0);
  Tensor gx = Tensor::zeros({h}, w_up_.grad.dtype(), dy.device());
  ops::weighted_col_sum_(gx, g, x_);
  sum_over_expert_ranks(gx);
  ops::add_rows_(pre.grad, gx, -1.0 / static_cast<double>(experts_ * width_));
}

// b_e such that round(ratio * T) of this batch's logits r[:, e] - b_e are > 0 (ties may activate
// a few more or fewer). On the host, once: a benchmark's setup.
void DecoFFNLayer::fix_logit_shift(const Tensor& r) {
  const int64_t T = r.dim(0), E = r.dim(1);
  const int64_t k = std::clamp<int64_t>(std::llround(calibrate_ratio_ * static_cast<double>(T)), 0, T);
  Tensor host = cast_cpu(r.to(Device::cpu), DType::f64);
  Tensor shift = Tensor::empty({E}, DType::f64);
  std::vector<double> col(T);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t = 0; t < T; ++t) col[t] = host.data<double>()[t * E + e];
    std::sort(col.begin(), col.end());
    // Midway between the k largest and the rest, so that no logit of the batch sits on ReLU's
    // kink (a unit beyond the extremes when k is 0 or T).
    double b = 0;
    if (T > 0) b = k == T ? col[0] - 1.0 : k == 0 ? col[T - 1] + 1.0 : 0.5 * (col[T - k - 1] + col[T - k]);
    shift.data<double>()[e] = b;
  }
  logit_shift_ = cast_cpu(shift, r.dtype()).to(r.device());
  calibrate_ratio_ = 0;
}

void RoutingStats::resolve(const double* v, int64_t E, const RegularizerSpec& reg) {
  active_per_expert.assign(E, 0);
  active_pairs = 0;
  for (int64_t e = 0; e < E; ++e) active_pairs += active_per_expert[e] = std::llround(v[e]);
  tokens_without_expert = tokens - std::llround(v[2 * E]);
  entropy_sum = l1_value = reg_loss = 0;
  const double T = static_cast<double>(tokens);
  if (reg.kind == RegularizerSpec::Kind::entropy) {
    entropy_sum = v[2 * E + 1];
    reg_loss = tokens ? reg.coef * entropy_sum / T : 0.0;
  } else if (reg.kind == RegularizerSpec::Kind::l1) {
    double total = 0;  // sum_e mass_e n_e, in expert order (l1_reg_forward's)
    for (int64_t e = 0; e < E; ++e) total += v[E + e] * v[e];
    l1_value = tokens ? total / (reg.target * T * T) : 0.0;
    reg_loss = reg.coef * l1_value;
  }
}

void DecoFFNLayer::routing_stats(RoutingStats& stats, const RegularizerSpec& reg, double& reg_loss) {
  stats.tokens = r_.dim(0);
  if (stats.summary.defined()) {  // read back later, with the other layers' (stats.resolve)
    ops::routing_summary(stats.summary, r_);
    reg_loss = 0;
    return;
  }
  Tensor summary = Tensor::empty({2 * experts_ + 2}, DType::f64, r_.device());
  ops::routing_summary(summary, r_);
  const Tensor host = summary.to(Device::cpu);
  stats.resolve(host.data<double>(), experts_, reg);
  reg_loss = stats.reg_loss;
}

// Steps 1-3 backward, shared by every expert path: the regularizer's gradient enters at
// a = ReLU(r) next to the scaling's; dx += the router's input gradient.
void DecoFFNLayer::router_backward(Tensor& dx, const Tensor& ds, double loss_scale, bool add_input_grad) {
  const int64_t T = x_.numel() / x_.dim(-1);
  Tensor da = Tensor::zeros(r_.shape(), r_.dtype(), r_.device());
  if (reg_.kind == RegularizerSpec::Kind::entropy) ops::entropy_backward(da, r_, loss_scale * reg_.coef / T);
  if (reg_.kind == RegularizerSpec::Kind::l1) ops::l1_reg_backward(da, r_, reg_.target, loss_scale * reg_.coef);
  Tensor dr = Tensor::empty(r_.shape(), r_.dtype(), r_.device());
  ops::router_scale_backward(dr, (g_ && g_->trainable) ? &g_->grad : nullptr, ds, r_, scaling(), &da);
  if (x_.dtype() == r_.dtype()) {
    ops::linear_backward(add_input_grad ? &dx : nullptr, &w_router_.grad, dr, x_, w_router_.w(), true);
    return;
  }
  // Mixed precision: the router's input gradient in fp32, rounded once into dx's dtype.
  Tensor dx_wide = add_input_grad ? Tensor::empty(x_.shape(), r_.dtype(), x_.device()) : Tensor();
  ops::linear_backward(add_input_grad ? &dx_wide : nullptr, &w_router_.grad, dr, router_input(x_), w_router_.w());
  if (add_input_grad) {
    Tensor d = Tensor::empty(dx.shape(), dx.dtype(), dx.device());
    ops::convert(d, dx_wide);
    ops::add_(dx, d);
  }
}

Tensor DecoFFNLayer::backward(const Tensor& dy, double loss_scale) {
  auto like = [&](const Tensor& t) { return Tensor::empty(t.shape(), dy.dtype(), dy.device()); };
  Tensor dx = like(x_), ds = Tensor::empty(s_.shape(), s_.dtype(), dy.device());
  if (dispatcher_) {
    experts_backward_pairs(dy, dx, ds);
  } else {
    Tensor dY = like(y_);
    ops::linear_backward(&dY, &w_down_.grad, dy, y_, w_down_.w());
    Tensor dz = like(z_);
    ops::expert_scale_backward(dz, ds, dY, z_, s_, experts_);
    Tensor du = like(u_);
    if (gated_) {
      Tensor dact = like(gate_act_), dpre = like(gate_pre_);
      ops::mul_backward(dact, du, dz, gate_act_, u_);
      ops::normsilu_backward(dpre, gamma_.grad, dact, gate_pre_, gamma_.w(), nstats_, experts_, mode_, eps_);
      ops::linear_backward(&dx, &w_gate_->grad, dpre, x_, w_gate_->w(), false);
      ops::linear_backward(&dx, &w_up_.grad, du, x_, w_up_.w(), true);
    } else {
      ops::normsilu_backward(du, gamma_.grad, dz, u_, gamma_.w(), nstats_, experts_, mode_, eps_);
      ops::linear_backward(&dx, &w_up_.grad, du, x_, w_up_.w(), false);
    }
  }
  if (shared_) shared_->backward(dy, &dx);
  // Under tensor parallelism dx is a partial sum (this rank's experts and shared-expert columns):
  // the block reduces it. ds holds only this rank's experts' entries: summed here, so that every
  // rank computes the replicated router's gradient from the whole ds; the router's input
  // gradient is then whole on every rank, so only rank 0 adds it to the partial dx.
  if (tp_) tp_all_reduce(*tp_, ds);
  router_backward(dx, ds, loss_scale, /*add_input_grad=*/!tp_ || tp_->rank() == 0);
  return dx;
}

}  // namespace decotron
