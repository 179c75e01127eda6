// decotron bench kernels: each training op in isolation at a config's shapes (one micro-batch),
// timed over repeated calls, with its model FLOPs and bytes, against the device's ceilings
// measured in the same run (a dense GEMM for FLOP/s, a large device copy for bytes/s). The
// table says which kernels are far from their roofline; bench train says which of them matter.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <set>

#include "cli/bench_ceilings.h"
#include "cli/commands.h"
#include "core/config.h"
#include "core/rng.h"
#include "kernels/multi_tensor.h"
#include "kernels/op_profile.h"
#include "kernels/ops.h"
#ifdef DECOTRON_WITH_CUDA
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/gathered_gemm.h"
#endif

namespace decotron::cli {

namespace {

struct KernelArgs {
  std::string config;
  std::vector<std::string> overrides;
  int64_t iters = 10, warmup = 2;
  std::string only;  // comma list of name prefixes
};

struct Bench {
  std::string name, shape;
  double flops = 0, bytes = 0;  // per call (model counts: what the math needs, not what a kernel does)
  std::function<void()> run;
};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Seconds per call: `warmup` calls, then `iters` calls between two synchronizations.
double time_per_call(const std::function<void()>& f, Device dev, int64_t iters, int64_t warmup) {
  for (int64_t i = 0; i < warmup; ++i) f();
  ops::synchronize(dev);
  const double t0 = now();
  for (int64_t i = 0; i < iters; ++i) f();
  ops::synchronize(dev);
  return (now() - t0) / static_cast<double>(iters);
}

// N(shift, scale^2) in `dt` on `dev`, from Philox stream `stream` (the same values every run).
Tensor random(const Shape& s, DType dt, Device dev, uint64_t stream, double scale = 1.0, double shift = 0.0) {
  Tensor h = Tensor::empty(s, DType::f32);
  float* p = h.data<float>();
  for (int64_t i = 0; i < h.numel(); ++i) p[i] = static_cast<float>(shift + scale * rng::normal(99, stream, i));
  if (dt != DType::f32) h = cast_cpu(h, dt);
  return dev == Device::cpu ? h : h.to(dev);
}

Tensor random_ids(int64_t n, int64_t vocab, Device dev, uint64_t stream) {
  Tensor t = Tensor::empty({n}, DType::i32);
  for (int64_t i = 0; i < n; ++i)
    t.data<int32_t>()[i] = static_cast<int32_t>(rng::random4(99, stream, i).v[0] % static_cast<uint32_t>(vocab));
  return dev == Device::cpu ? t : t.to(dev);
}

std::string shape_of(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  for (int64_t d : dims) s += (s.size() > 1 ? "," : "") + std::to_string(d);
  return s + "]";
}

std::vector<Bench> make_benches(const Config& cfg, Device dev, DType dt) {
  const ModelConfig& m = cfg.model;
  const int64_t B = cfg.train.micro_batch, S = m.seq_len, T = B * S, h = m.hidden, H = m.heads;
  const int64_t G = m.kv_heads ? m.kv_heads : m.heads, D = h / H, F = m.ffn_hidden, Fs = m.shared_expert_width;
  const int64_t E = m.experts, d = m.expert_width, V = m.vocab_size;
  const int64_t C = cfg.train.loss_chunk_tokens > 0 ? std::min(cfg.train.loss_chunk_tokens, T) : T;
  const double e = static_cast<double>(dtype_size(dt));
  const DType sdt = dt == DType::bf16 ? DType::f32 : dt;  // statistics, the router, gradients of weights
  std::vector<Bench> out;
  uint64_t stream = 1;
  auto rnd = [&](const Shape& s, DType t = DType::f32, double scale = 1.0, double shift = 0.0) {
    return random(s, t == DType::f32 ? dt : t, dev, stream++, scale, shift);
  };
  auto rnd32 = [&](const Shape& s, double scale = 1.0, double shift = 0.0) {
    return random(s, sdt, dev, stream++, scale, shift);
  };

  // GEMMs at the model's shapes: the attention input projection (q, k, v in one), the dense
  // SwiGLU's up projection, and a chunk of the LM head.
  struct Gemm {
    const char* name;
    int64_t M, N, K;
  };
  for (Gemm g : {Gemm{"linear qkv", T, h + 2 * G * D, h}, Gemm{"linear dense ffn up", T, F, h},
                 Gemm{"linear lm head chunk", C, V, h}}) {
    auto x = std::make_shared<Tensor>(rnd({g.M, g.K})), w = std::make_shared<Tensor>(rnd({g.N, g.K}, DType::f32, 0.02));
    auto y = std::make_shared<Tensor>(Tensor::empty({g.M, g.N}, dt, dev));
    auto dw = std::make_shared<Tensor>(Tensor::zeros({g.N, g.K}, sdt, dev));
    auto dx = std::make_shared<Tensor>(Tensor::empty({g.M, g.K}, dt, dev));
    const double io = e * (g.M * g.K + g.N * g.K + g.M * g.N);
    out.push_back({std::string(g.name) + " fwd", shape_of({g.M, g.N, g.K}), 2.0 * g.M * g.N * g.K, io,
                   [=] { ops::linear_forward(*y, *x, *w); }});
    out.push_back({std::string(g.name) + " bwd", shape_of({g.M, g.N, g.K}), 4.0 * g.M * g.N * g.K,
                   io + e * g.M * g.K + 2.0 * dtype_size(sdt) * g.N * g.K,
                   [=] { ops::linear_backward(dx.get(), dw.get(), *y, *x, *w); }});
  }

  // Causal attention: 2 B H S^2 D multiply-adds forward (half the S x S square), 2.5x backward.
  {
    const ops::AttnShape s{B, S, H, G, D};
    auto q = std::make_shared<Tensor>(rnd({B, S, H, D})), k = std::make_shared<Tensor>(rnd({B, S, G, D})),
         v = std::make_shared<Tensor>(rnd({B, S, G, D})),
         o = std::make_shared<Tensor>(Tensor::empty({B, S, H, D}, dt, dev));
    auto lse = std::make_shared<Tensor>(Tensor::empty({B, H, S}, sdt, dev));
    auto dq = std::make_shared<Tensor>(Tensor::empty({B, S, H, D}, dt, dev)),
         dk = std::make_shared<Tensor>(Tensor::empty({B, S, G, D}, dt, dev)),
         dv = std::make_shared<Tensor>(Tensor::empty({B, S, G, D}, dt, dev));
    ops::attention_forward(*o, *lse, *q, *k, *v, s);
    const double f = 2.0 * B * H * static_cast<double>(S) * S * D;
    // On a GPU every path the build has, fastest first (the row names the path that ran).
    std::vector<std::string> paths{""};
#ifdef DECOTRON_WITH_CUDA
    if (dev == Device::cuda) paths = {"cudnn", "flash", "reference"};
#endif
    for (const std::string& path : paths) {
      auto choose = [path] {
#ifdef DECOTRON_WITH_CUDA
        using cuda::AttentionPath;
        cuda::set_attention_override(path == "cudnn"       ? AttentionPath::cudnn
                                     : path == "flash"     ? AttentionPath::flash
                                     : path == "reference" ? AttentionPath::reference
                                                           : AttentionPath::none);
#else
        (void)path;
#endif
      };
      out.push_back({"attention fwd", shape_of({B, S, H, G, D}), f, e * (2 * T * H * D + 2 * T * G * D), [=] {
                       choose();
                       ops::attention_forward(*o, *lse, *q, *k, *v, s);
                     }});
      out.push_back({"attention bwd", shape_of({B, S, H, G, D}), 2.5 * f, e * (4 * T * H * D + 4 * T * G * D), [=] {
                       choose();
                       ops::attention_backward(*dq, *dk, *dv, *o, *q, *k, *v, *o, *lse, s);
                     }});
    }
  }

  // Row-wise kernels on [T, h] and the shared expert's [T, Fs].
  {
    auto x = std::make_shared<Tensor>(rnd({T, h})), w = std::make_shared<Tensor>(rnd({h}, DType::f32, 0.1, 1.0));
    auto y = std::make_shared<Tensor>(Tensor::empty({T, h}, dt, dev)),
         rstd = std::make_shared<Tensor>(Tensor::empty({T}, sdt, dev));
    auto dx = std::make_shared<Tensor>(Tensor::empty({T, h}, dt, dev)),
         dw = std::make_shared<Tensor>(Tensor::zeros({h}, sdt, dev));
    ops::rmsnorm_forward(*y, *rstd, *x, *w, 1e-5);
    out.push_back({"rmsnorm fwd", shape_of({T, h}), 4.0 * T * h, 2 * e * T * h,
                   [=] { ops::rmsnorm_forward(*y, *rstd, *x, *w, 1e-5); }});
    out.push_back({"rmsnorm bwd", shape_of({T, h}), 8.0 * T * h, 3 * e * T * h,
                   [=] { ops::rmsnorm_backward(*dx, *dw, *y, *x, *w, *rstd); }});
    out.push_back({"rope fwd", shape_of({B, S, H, D}), 3.0 * T * H * D, 2 * e * T * H * D,
                   [=] { ops::rope_forward(*y, *x, B, S, H, D, m.rope_base); }});
    out.push_back({"add_ (residual)", shape_of({T, h}), 1.0 * T * h, 3 * e * T * h, [=] { ops::add_(*y, *x); }});
    auto tok = std::make_shared<Tensor>(random_ids(T, V, dev, stream++));
    auto table = std::make_shared<Tensor>(rnd({V, h})),
         dtable = std::make_shared<Tensor>(Tensor::zeros({V, h}, sdt, dev));
    auto dy32 = std::make_shared<Tensor>(rnd32({T, h}));
    out.push_back(
        {"embedding fwd", shape_of({T, h}), 0, 2 * e * T * h, [=] { ops::embedding_forward(*y, *tok, *table); }});
    out.push_back({"embedding bwd", shape_of({T, h}), 1.0 * T * h, 3.0 * dtype_size(sdt) * T * h,
                   [=] { ops::embedding_backward(*dtable, *tok, *dy32); }});
  }
  if (Fs > 0 || F > 0) {
    const int64_t W = Fs > 0 ? Fs : F;
    auto g = std::make_shared<Tensor>(rnd({T, W})), u = std::make_shared<Tensor>(rnd({T, W}));
    auto hh = std::make_shared<Tensor>(Tensor::empty({T, W}, dt, dev)),
         dg = std::make_shared<Tensor>(Tensor::empty({T, W}, dt, dev)),
         du = std::make_shared<Tensor>(Tensor::empty({T, W}, dt, dev));
    out.push_back(
        {"swiglu fwd", shape_of({T, W}), 6.0 * T * W, 3 * e * T * W, [=] { ops::swiglu_forward(*hh, *g, *u); }});
    out.push_back({"swiglu bwd", shape_of({T, W}), 10.0 * T * W, 5 * e * T * W,
                   [=] { ops::swiglu_backward(*dg, *du, *hh, *g, *u); }});
  }

  // DECO's sparse expert path at the target activation ratio: router logits N(-z, 1) with
  // P(r > 0) = target, so P ~ target x E x T pairs.
  if (m.arch == "deco" && E > 0) {
    const double rho = cfg.train.target_ratio;
    // z with P(N(0,1) > z) = rho (bisection on erfc).
    double lo = -8, hi = 8;
    for (int i = 0; i < 80; ++i) {
      const double mid = 0.5 * (lo + hi);
      (0.5 * std::erfc(mid / std::sqrt(2.0)) > rho ? lo : hi) = mid;
    }
    auto r = std::make_shared<Tensor>(random({T, E}, DType::f32, dev, stream++, 1.0, -lo));
    auto pairs = std::make_shared<ops::RoutedPairs>();
    ops::route_pairs(*pairs, *r, 0, E, false);
    const int64_t P = pairs->tokens.numel();
    out.push_back({"route_pairs", shape_of({T, E}), 0, 4.0 * T * E + 8.0 * P,
                   [=] { ops::route_pairs(*pairs, *r, 0, E, false); }});
    // The pairs read their rows of x (and, backward, of dout) through the pairs' token index.
    auto x = std::make_shared<Tensor>(rnd({T, h}));
    auto dout = std::make_shared<Tensor>(rnd({T, h}));
    auto sp = std::make_shared<Tensor>(random({P}, DType::f32, dev, stream++, 0.1, 0.5));
    auto w_pre = std::make_shared<Tensor>(rnd({E * d, h}, DType::f32, 0.02));
    auto w_down = std::make_shared<Tensor>(rnd({h, E * d}, DType::f32, 0.02));
    auto gamma = std::make_shared<Tensor>(rnd({d}, DType::f32, 0.1, 1.0));
    auto mu = std::make_shared<Tensor>(random({P}, DType::f32, dev, stream++, 0.01));
    auto outp = std::make_shared<Tensor>(Tensor::empty({P, h}, dt, dev));
    auto cache = std::make_shared<ops::GroupedExperts>();
    const auto mode = ops::NormSiluMode::full;
    auto fwd = [=] {
      ops::grouped_experts_forward(*outp, *cache, *x, pairs->tokens, pairs->offsets, *sp, mu.get(), *w_pre, nullptr,
                                   *gamma, *w_down, mode, 1e-5);
    };
    fwd();
    auto dxp = std::make_shared<Tensor>(Tensor::empty({P, h}, dt, dev));
    auto dsp = std::make_shared<Tensor>(Tensor::empty({P}, DType::f32, dev));
    auto gmean = std::make_shared<Tensor>(Tensor::empty({P}, DType::f32, dev));
    auto dw_pre = std::make_shared<Tensor>(Tensor::zeros({E * d, h}, sdt, dev)),
         dw_down = std::make_shared<Tensor>(Tensor::zeros({h, E * d}, sdt, dev)),
         dgamma = std::make_shared<Tensor>(Tensor::zeros({d}, sdt, dev));
    auto bwd = [=] {
      ops::grouped_experts_backward(*dxp, *dsp, *gmean, *dw_pre, nullptr, *dgamma, *dw_down, *dout, *cache, *x,
                                    pairs->tokens, pairs->offsets, *sp, *w_pre, nullptr, *gamma, *w_down, mode, 1e-5);
    };
    const std::string shp = shape_of({P, h, E, d});
    // Bytes: the pairs' rows read once (forward x, backward dout and x: each P x h, wherever
    // they come from), outp or dxp written once, the weights and the [P, d] intermediates.
    const double fwd_bytes = e * (2.0 * P * h + 2.0 * E * d * h + 3.0 * P * d);
    const double bwd_bytes = e * (3.0 * P * h + 2.0 * E * d * h + 5.0 * P * d);
    // Under bf16 on a GPU the gathers run inside the GEMMs (gathered_gemm.cu); the rows marked
    // "copy" run the earlier path on the same pairs for the comparison (gather into [P, h] copies,
    // then cuBLAS's grouped GEMM).
    std::vector<bool> fused_paths{true};
#ifdef DECOTRON_WITH_CUDA
    if (dev == Device::cuda && dt == DType::bf16) fused_paths = {true, false};
#endif
    for (bool fused : fused_paths) {
      auto with_path = [fused](const std::function<void()>& f) {
        return [fused, f] {
#ifdef DECOTRON_WITH_CUDA
          cuda::set_fused_expert_gather(fused);
#endif
          f();
#ifdef DECOTRON_WITH_CUDA
          cuda::set_fused_expert_gather(true);
#endif
        };
      };
      const std::string tag = fused_paths.size() > 1 && !fused ? " (copy)" : "";
      out.push_back({"grouped_experts fwd" + tag, shp, 4.0 * P * h * d, fwd_bytes, with_path(fwd)});
      out.push_back({"grouped_experts bwd" + tag, shp, 8.0 * P * h * d, bwd_bytes, with_path(bwd)});
    }
    // The pairs' outputs back into their tokens: through the token-major view (what the layer
    // runs) and, for comparison in the same run, as the bucketed scatter-add of embedding_backward
    // (what it ran before).
    auto combined = std::make_shared<Tensor>(Tensor::empty({T, h}, dt, dev));
    out.push_back({"combine_pairs", shape_of({P, h, T}), 1.0 * P * h, e * (1.0 * P * h + T * h) + 4.0 * T * E,
                   [=] { ops::combine_pairs(*combined, pairs->slot_pair, *outp); }});
    out.push_back({"pair scatter (embedding bwd)", shape_of({P, h, T}), 1.0 * P * h, e * (1.0 * P * h + 2.0 * T * h),
                   [=] {
                     combined->zero_();
                     if (P > 0) ops::embedding_backward(*combined, pairs->tokens, *outp);
                   }});
    auto ds = std::make_shared<Tensor>(Tensor::empty({T, E}, DType::f32, dev));
    out.push_back({"pairs_to_slots", shape_of({T, E}), 0, 4.0 * (2.0 * T * E + P),
                   [=] { ops::pairs_to_slots(*ds, pairs->slot_pair, *dsp, 0); }});
  }

  // The loss on one chunk of logits: the forward, and the gradient in place.
  {
    auto logits = std::make_shared<Tensor>(rnd({C, V}));
    auto tgt = std::make_shared<Tensor>(random_ids(C, V, dev, stream++));
    out.push_back({"cross_entropy (+grad)", shape_of({C, V}), 5.0 * C * V, 2 * e * C * V,
                   [=] { ops::cross_entropy(*logits, *tgt, 1.0 / C); }});
  }

  // The optimizer over a model's worth of fp32 parameters (a whole-model tensor: the cost per
  // element; the real step launches once per parameter tensor).
  {
    int64_t n = V * h * 2;
    for (int64_t l = 0; l < m.layers; ++l) n += 4 * h * h + 3 * h * std::max<int64_t>(F, 2 * E * d / 3);
    n = std::min<int64_t>(n, int64_t(1) << 28);
    auto p = std::make_shared<Tensor>(random({n}, DType::f32, dev, stream++, 0.02)),
         mm = std::make_shared<Tensor>(Tensor::zeros({n}, DType::f32, dev)),
         vv = std::make_shared<Tensor>(Tensor::zeros({n}, DType::f32, dev)),
         g = std::make_shared<Tensor>(random({n}, DType::f32, dev, stream++, 0.001));
    const ops::AdamWStep st{1e-4, 0.9, 0.95, 1e-8, 0.1, 1};
    out.push_back(
        {"adamw_update", shape_of({n}), 15.0 * n, 28.0 * n, [=] { ops::adamw_update(*p, *mm, *vv, *g, st, 1.0); }});
    auto b = std::make_shared<Tensor>(Tensor::empty({n}, DType::bf16, dev));
    out.push_back({"convert fp32->bf16 (weight copies)", shape_of({n}), 0, 6.0 * n, [=] { ops::convert(*b, *p); }});
    out.push_back({"sum_squares (grad norm)", shape_of({n}), 2.0 * n, 4.0 * n, [=] { (void)ops::sum_squares(*g); }});
    // The same elements cut as the model's parameter tensors (embedding, LM head; per layer the
    // attention matrices, two norms, then the router, W_up, gamma, W_down, g, or the dense
    // FFN): the optimizer's real step, one tensor at a time against the multi-tensor launches.
    std::vector<int64_t> sizes = {V * h, V * h};
    for (int64_t l = 0; l < m.layers; ++l) {
      for (int k = 0; k < 4; ++k) sizes.push_back(h * h);
      sizes.insert(sizes.end(), {h, h});
      if (E > 0) sizes.insert(sizes.end(), {E * h, E * d * h, d, h * E * d, E});
      else sizes.insert(sizes.end(), {F * h, F * h, h * F});
    }
    std::vector<ops::AdamWTensor> list;
    std::vector<Tensor> grads;
    for (int64_t at = 0, i = 0; i < static_cast<int64_t>(sizes.size()) && at < n; ++i) {
      const int64_t k = std::min(sizes[i], n - at);
      list.push_back(ops::AdamWTensor{p->rows(at, k), mm->rows(at, k), vv->rows(at, k), g->rows(at, k), true});
      grads.push_back(g->rows(at, k));
      at += k;
    }
    const std::string tensors = std::to_string(list.size()) + " tensors";
    auto multi = std::make_shared<ops::MultiTensorAdamW>(list);
    auto squares = std::make_shared<ops::MultiTensorSquares>(grads);
    out.push_back({"adamw_update, a launch per tensor", tensors, 15.0 * n, 28.0 * n, [=] {
                     for (const ops::AdamWTensor& t : list) {
                       Tensor tp = t.param, tm = t.m, tv = t.v;
                       ops::adamw_update(tp, tm, tv, t.grad, st, 1.0);
                     }
                   }});
    out.push_back({"adamw_update, multi-tensor", tensors, 15.0 * n, 28.0 * n, [=] { multi->update(st, 1.0); }});
    out.push_back({"sum_squares, a sync per tensor", tensors, 2.0 * n, 4.0 * n, [=] {
                     for (const Tensor& t : grads) (void)ops::sum_squares(t);
                   }});
    out.push_back({"sum_squares, multi-tensor", tensors, 2.0 * n, 4.0 * n, [=] { (void)squares->compute(); }});
  }
  return out;
}

void run_bench_kernels(const KernelArgs& a) {
  const Config cfg = load_config(a.config, a.overrides);
  const Device dev = cfg.train.device == "cuda" ? Device::cuda : Device::cpu;
  const DType dt = cfg.train.dtype == "bf16" ? DType::bf16 : DType::f32;
  std::printf("bench kernels: %s, %s, %s, one micro-batch: %lld x %lld tokens, %lld calls after %lld warmup\n",
              a.config.c_str(), device_name(dev), cfg.train.dtype.c_str(),
              static_cast<long long>(cfg.train.micro_batch), static_cast<long long>(cfg.model.seq_len),
              static_cast<long long>(a.iters), static_cast<long long>(a.warmup));
  const double peak = measure_gemm_tflops(dev), bw = measure_copy_gbs(dev);
  std::printf("ceilings measured now: dense GEMM %.3f TFLOP/s (%s), device copy %.1f GB/s\n\n", peak,
              dev == Device::cuda ? "bf16 8192^3" : "fp32 1024^3", bw);
  std::printf(
      "| kernel | shape | ms/call | TFLOP/s | %% of GEMM | GB/s | %% of copy |\n|---|---|---|---|---|---|---|\n");
  std::set<std::string> seen;
  for (Bench& b : make_benches(cfg, dev, dt)) {
    if (!a.only.empty()) {
      bool keep = false;
      for (size_t p = 0, q; p <= a.only.size(); p = q + 1) {
        q = a.only.find(',', p);
        if (q == std::string::npos) q = a.only.size();
        const std::string pre = a.only.substr(p, q - p);
        if (!pre.empty() && b.name.rfind(pre, 0) == 0) keep = true, seen.insert(pre);
      }
      if (!keep) continue;
    }
    const double t = time_per_call(b.run, dev, a.iters, a.warmup);
    const double tf = b.flops / t / 1e12, gbs = b.bytes / t / 1e9;
#ifdef DECOTRON_WITH_CUDA
    if (dev == Device::cuda && b.name.rfind("attention", 0) == 0) {
      const cuda::AttentionPath p = cuda::last_attention_path();
      b.name += p == cuda::AttentionPath::cudnn   ? " (cuDNN)"
                : p == cuda::AttentionPath::flash ? " (flash)"
                                                  : " (reference)";
      cuda::set_attention_override(cuda::AttentionPath::none);
    }
#endif
    std::printf("| %s | %s | %.4f | %.3f | %.1f%% | %.1f | %.1f%% |\n", b.name.c_str(), b.shape.c_str(), 1e3 * t, tf,
                100 * tf / peak, gbs, 100 * gbs / bw);
    std::fflush(stdout);
  }
  if (!a.only.empty() && seen.empty())
    fail("bench kernels --only ", a.only, ": no kernel name starts with that; run without --only to list them");
}

}  // namespace

void register_bench_kernels(CLI::App& bench) {
  auto a = std::make_shared<KernelArgs>();
  auto* cmd = bench.add_subcommand("kernels",
                                   "Each training kernel alone at a config's shapes: time, FLOP/s and "
                                   "bytes/s against the device's measured ceilings");
  cmd->add_option("--config", a->config, "YAML config (e.g. configs/deco-0.1b.yaml; device and dtype from train.*)")
      ->required();
  cmd->add_option("--set", a->overrides, "Override a config key: --set section.key=value (repeatable)");
  cmd->add_option("--iters", a->iters, "Timed calls per kernel")->check(CLI::PositiveNumber);
  cmd->add_option("--warmup", a->warmup, "Untimed calls first")->check(CLI::NonNegativeNumber);
  cmd->add_option("--only", a->only, "Comma list of kernel-name prefixes (e.g. attention,grouped)");
  cmd->callback([a] { run_bench_kernels(*a); });
}

}  // namespace decotron::cli
