// The CPU runtime's forward pass, layer by layer (deco-model.md is the model; runtime.h says
// how weights are held and why the DECO FFN is exact when sparse).
#include "inference/runtime.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include "core/error.h"
#include "inference/model_file.h"
#include "kernels/ops.h"
#include "model/layers.h"

namespace decotron::inference {

namespace fs = std::filesystem;

struct Model::Layer {
  Tensor attn_norm, wq, wk, wv, wo, ffn_norm;
  bool deco = false;
  Tensor w_gate, w_up, w_down;       // dense SwiGLU
  Tensor router, g, gamma;           // DECO: W_r [E, h], g [E] or [1] (or the constant 1), gamma [d]
  Tensor up, gate, down;             // DECO experts, expert-major [E, d, h]
  Tensor w_bar;                      // [1, h]: mean of the rows of the matrix NormSiLU applies to
  Tensor sh_gate, sh_up, sh_down;    // DECO shared expert (undefined if none)
  Tensor k_cache, v_cache;           // [context, kv_heads * head_dim]
};

namespace {

bool uses_mean(ops::NormSiluMode m) { return m == ops::NormSiluMode::full || m == ops::NormSiluMode::no_rms; }

// The NormSiLU mode to run on one expert's block once the mean has been subtracted by us:
// the block alone cannot know the mean over all E*d entries, so the kernel gets c_e = u_e - mu
// and only does what is per expert (the RMS step and the SiLU).
ops::NormSiluMode per_block_mode(ops::NormSiluMode m) {
  return (m == ops::NormSiluMode::full || m == ops::NormSiluMode::no_mean) ? ops::NormSiluMode::no_mean
                                                                            : ops::NormSiluMode::silu;
}

// Expert e's [d, h] block of an expert-major [E, d, h] tensor (a view, no copy).
Tensor block(const Tensor& t, int64_t e) { return t.rows(e, 1).view({t.dim(1), t.dim(2)}); }

}  // namespace

Model::Model(const std::string& dir) : dir_(dir) {
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  if (!fs::is_directory(dir)) fail(dir, ": not a directory (pass --model the directory `decotron export` wrote)");
  info_ = read_export_info(cfg_path);
  SafetensorsFile file((fs::path(dir) / "model.safetensors").string());
  check_against_config(file, info_, cfg_path);
  const std::string tok_path = (fs::path(dir) / "tokenizer.model").string();
  if (!fs::exists(tok_path)) fail(tok_path, ": missing; the export is incomplete");
  tokenizer_ = std::make_unique<data::Tokenizer>(tok_path);
  if (tokenizer_->vocab_size() != info_.tokenizer_vocab)
    fail(tok_path, ": has ", tokenizer_->vocab_size(), " ids but config.json says ", info_.tokenizer_vocab);
  export_bytes_per_elem_ = info_.int8 ? 1.0 : static_cast<double>(file_dtype_size(info_.dtype));

  const ModelConfig& m = info_.model;
  auto load = [&](const std::string& name) {
    Tensor t = file.read_f32(name);
    named_.push_back({name, t});
    return t;
  };
  const int64_t hd = m.hidden / m.heads, kvd = (m.kv_heads ? m.kv_heads : m.heads) * hd;
  embedding_ = load("embedding.weight");
  for (int64_t i = 0; i < m.layers; ++i) {
    auto L = std::make_unique<Layer>();
    const std::string p = cat("layers.", i, ".");
    L->attn_norm = load(p + "attn_norm.weight");
    L->wq = load(p + "attn.wq");
    L->wk = load(p + "attn.wk");
    L->wv = load(p + "attn.wv");
    L->wo = load(p + "attn.wo");
    L->ffn_norm = load(p + "ffn_norm.weight");
    L->deco = m.arch == "deco" && i >= m.dense_layers;
    if (!L->deco) {
      L->w_gate = load(p + "ffn.w_gate");
      L->w_up = load(p + "ffn.w_up");
      L->w_down = load(p + "ffn.w_down");
    } else {
      L->router = load(p + "ffn.w_router");
      if (file.has(p + "ffn.g")) {
        L->g = load(p + "ffn.g");
      } else {  // expert_scaling "none": s = a (g = 1)
        L->g = Tensor::empty({1}, DType::f32);
        L->g.data<float>()[0] = 1.0f;
      }
      L->gamma = load(p + "ffn.gamma");
      L->up = load(p + "ffn.experts.up");
      L->down = load(p + "ffn.experts.down");
      if (m.gated_experts) L->gate = load(p + "ffn.experts.gate");
      // w_bar = mean over the E*d rows of the matrix whose output NormSiLU normalizes.
      const Tensor& src = m.gated_experts ? L->gate : L->up;
      const int64_t rows = m.experts * m.expert_width, h = m.hidden;
      std::vector<double> acc(h, 0.0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < h; ++j) acc[j] += src.data<float>()[r * h + j];
      L->w_bar = Tensor::empty({1, h}, DType::f32);
      for (int64_t j = 0; j < h; ++j) L->w_bar.data<float>()[j] = static_cast<float>(acc[j] / rows);
      if (m.shared_expert_width > 0) {
        L->sh_gate = load(p + "ffn.shared.w_gate");
        L->sh_up = load(p + "ffn.shared.w_up");
        L->sh_down = load(p + "ffn.shared.w_down");
      }
    }
    L->k_cache = Tensor::zeros({m.seq_len, kvd}, DType::f32);
    L->v_cache = Tensor::zeros({m.seq_len, kvd}, DType::f32);
    layers_.push_back(std::move(L));
  }
  final_norm_ = load("final_norm.weight");
  lm_head_ = load("lm_head.weight");

  // Rotary tables with the trainer's formula (kernels/cpu/rmsnorm.cpp): theta = pos * base^(-2i/D).
  const int64_t half = hd / 2;
  rope_cos_.resize(m.seq_len * half);
  rope_sin_.resize(m.seq_len * half);
  for (int64_t s = 0; s < m.seq_len; ++s)
    for (int64_t i = 0; i < half; ++i) {
      const double theta = s * std::pow(m.rope_base, -2.0 * i / hd);
      rope_cos_[s * half + i] = std::cos(theta);
      rope_sin_[s * half + i] = std::sin(theta);
    }
}

Model::~Model() = default;

const Tensor& Model::weight(const std::string& name) const {
  for (const auto& [n, t] : named_)
    if (n == name) return t;
  fail(dir_, ": no weight named '", name, "'");
}

size_t Model::weight_bytes_loaded() const {
  size_t b = 0;
  for (const auto& [n, t] : named_) b += t.nbytes();
  return b;
}

void Model::count_weight(const Tensor& w, int64_t elements, bool fp32_in_export, int64_t scales) {
  const double n = elements < 0 ? static_cast<double>(w.numel()) : static_cast<double>(elements);
  counters_.weight_bytes_f32 += 4 * n;
  // Vectors, the router and w_bar are fp32 in the export (or computed); matrices are in its
  // dtype, and int8 adds its fp32 scales (one per output row unless `scales` says otherwise).
  if (fp32_in_export || w.ndim() < 2) {
    counters_.weight_bytes_export += 4 * n;
    return;
  }
  counters_.weight_bytes_export += export_bytes_per_elem_ * n;
  if (info_.int8) counters_.weight_bytes_export += 4.0 * (scales < 0 ? n / w.dim(-1) : scales);
}

void Model::rope(Tensor& x, int64_t n, int64_t heads) const {
  // x: [n, heads * D] at positions pos_ .. pos_ + n - 1; rotate-half, as ops::rope_forward.
  const int64_t D = info_.model.hidden / info_.model.heads, half = D / 2;
  float* p = x.data<float>();
  for (int64_t t = 0; t < n; ++t) {
    const double* c = rope_cos_.data() + (pos_ + t) * half;
    const double* s = rope_sin_.data() + (pos_ + t) * half;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* v = p + (t * heads + hh) * D;
      for (int64_t i = 0; i < half; ++i) {
        const double x1 = v[i], x2 = v[i + half];
        v[i] = static_cast<float>(x1 * c[i] - x2 * s[i]);
        v[i + half] = static_cast<float>(x2 * c[i] + x1 * s[i]);
      }
    }
  }
}

void Model::attention(Layer& L, const Tensor& xn, Tensor& out, int64_t n) {
  const ModelConfig& m = info_.model;
  const int64_t H = m.heads, G = m.kv_heads ? m.kv_heads : m.heads, D = m.hidden / H, group = H / G;
  Tensor q = Tensor::empty({n, H * D}, DType::f32);
  Tensor k = L.k_cache.rows(pos_, n), v = L.v_cache.rows(pos_, n);  // written in place: the cache
  ops::linear_forward(q, xn, L.wq);
  ops::linear_forward(k, xn, L.wk);
  ops::linear_forward(v, xn, L.wv);
  for (const Tensor* w : {&L.wq, &L.wk, &L.wv, &L.wo}) count_weight(*w);
  rope(q, n, H);
  rope(k, n, G);
  Tensor o = Tensor::empty({n, H * D}, DType::f32);
  if (pos_ == 0) {
    // Prefill from an empty cache: exactly the trainer's causal attention.
    Tensor lse = Tensor::empty({1, H, n}, DType::f32);
    ops::attention_forward(o, lse, q, k, v, {1, n, H, G, D});
  } else {
    // Query rows at positions pos_ + t attend over cache rows [0, pos_ + t].
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    std::vector<float> sc(pos_ + n);
    const float* K = L.k_cache.data<float>();
    const float* V = L.v_cache.data<float>();
    for (int64_t t = 0; t < n; ++t) {
      const int64_t len = pos_ + t + 1;
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t g = hh / group;
        const float* qv = q.data<float>() + (t * H + hh) * D;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < len; ++j) {
          const float* kj = K + (j * G + g) * D;
          float dot = 0;
          for (int64_t i = 0; i < D; ++i) dot += qv[i] * kj[i];
          sc[j] = dot * scale;
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < len; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
        const float inv = static_cast<float>(1.0 / sum);
        float* ov = o.data<float>() + (t * H + hh) * D;
        std::fill(ov, ov + D, 0.0f);
        for (int64_t j = 0; j < len; ++j) {
          const float pj = sc[j] * inv;
          const float* vj = V + (j * G + g) * D;
          for (int64_t i = 0; i < D; ++i) ov[i] += pj * vj[i];
        }
      }
      counters_.kv_bytes += 2.0 * 4 * len * G * D;
    }
  }
  ops::linear_forward(out, o, L.wo);
}

Tensor Model::swiglu(const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down) {
  const int64_t n = x.dim(0), F = w_up.dim(0);
  Tensor gate = Tensor::empty({n, F}, DType::f32), up = Tensor::empty({n, F}, DType::f32);
  ops::linear_forward(gate, x, w_gate);
  ops::linear_forward(up, x, w_up);
  Tensor hdn = Tensor::empty({n, F}, DType::f32);
  ops::swiglu_forward(hdn, gate, up);
  Tensor y = Tensor::empty({n, x.dim(1)}, DType::f32);
  ops::linear_forward(y, hdn, w_down);
  for (const Tensor* w : {&w_gate, &w_up, &w_down}) count_weight(*w);
  return y;
}

Tensor Model::deco_ffn(int layer, const Tensor& x) {
  Layer& L = *layers_.at(layer);
  DT_ASSERT(L.deco, "layer ", layer, " has a dense FFN");
  const ModelConfig& m = info_.model;
  const int64_t n = x.dim(0), h = m.hidden, E = m.experts, d = m.expert_width;
  const ops::NormSiluMode mode = normsilu_mode(m.normsilu), block_mode = per_block_mode(mode);
  // 1-3. Router (fp32), ReLU routing, scaling: s = ReLU(r) * g.
  Tensor r = Tensor::empty({n, E}, DType::f32), s = Tensor::empty({n, E}, DType::f32);
  ops::linear_forward(r, x, L.router);
  ops::router_scale_forward(s, r, L.g);
  count_weight(L.router, -1, true);
  count_weight(L.g);
  count_weight(L.gamma);
  if (uses_mean(mode)) count_weight(L.w_bar, -1, true);
  // Active pairs grouped by expert: expert e runs on the rows t with a_te = ReLU(r_te) > 0,
  // so each active block is read once per call, however many tokens use it (prefill), and
  // inactive experts are never touched.
  std::vector<std::vector<int64_t>> rows_of(E);
  const float* rp = r.data<float>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < E; ++e)
      if (rp[t * E + e] > 0) rows_of[e].push_back(t);
  // 5a. NormSiLU's mean over all E*d entries of each token: mean(p_t) = x_t . w_bar.
  std::vector<double> mu(n, 0.0);
  if (uses_mean(mode))
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < h; ++j) mu[t] += static_cast<double>(x.data<float>()[t * h + j]) * L.w_bar.data<float>()[j];
  Tensor out = Tensor::zeros({n, h}, DType::f32);
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<int64_t>& rows = rows_of[e];
    const int64_t k = static_cast<int64_t>(rows.size());
    counters_.active_pairs += k;
    if (k == 0) continue;
    Tensor X = k == 1 ? x.rows(rows[0], 1) : Tensor::empty({k, h}, DType::f32);  // the rows routed to e
    if (k > 1)
      for (int64_t i = 0; i < k; ++i) std::copy_n(x.data<float>() + rows[i] * h, h, X.data<float>() + i * h);
    // 4. u = X up_e^T [k, d] from expert e's contiguous block (and the gate's pre-activation).
    Tensor U = Tensor::empty({k, d}, DType::f32);
    ops::linear_forward(U, X, block(L.up, e));
    Tensor P = U;  // what NormSiLU normalizes
    if (m.gated_experts) {
      P = Tensor::empty({k, d}, DType::f32);
      ops::linear_forward(P, X, block(L.gate, e));
    }
    // 5b. c = p - mean_t, then the per-block rest of NormSiLU (RMS over this block's d
    //     entries, gamma, SiLU) by the trainer's kernel on these blocks alone.
    Tensor C = P;
    if (uses_mean(mode)) {
      C = Tensor::empty({k, d}, DType::f32);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < d; ++j)
          C.data<float>()[i * d + j] = static_cast<float>(P.data<float>()[i * d + j] - mu[rows[i]]);
    }
    Tensor Z = Tensor::empty({k, d}, DType::f32), nstats = Tensor::empty({k, 2}, DType::f32);
    ops::normsilu_forward(Z, nstats, C, L.gamma, 1, block_mode, m.norm_eps);
    if (m.gated_experts) {  // 8. gated ablation: z = NormSiLU(W_gate x)_e * (W_up x)_e
      Tensor zg = Tensor::empty({k, d}, DType::f32);
      ops::mul_forward(zg, Z, U);
      Z = zg;
    }
    // 6. y = s_te z; out_t += y down_e: expert e's contiguous [d, h] block of W_down^T, through
    //    the input-gradient GEMM of a linear layer (dx = dy . W).
    Tensor S = Tensor::empty({k, 1}, DType::f32);
    for (int64_t i = 0; i < k; ++i) S.data<float>()[i] = s.data<float>()[rows[i] * E + e];
    Tensor Y = Tensor::empty({k, d}, DType::f32);
    ops::expert_scale_forward(Y, Z, S, 1);
    Tensor O = Tensor::empty({k, h}, DType::f32);
    ops::linear_backward(&O, nullptr, Y, X, block(L.down, e));
    for (int64_t i = 0; i < k; ++i) {
      float* dst = out.data<float>() + rows[i] * h;
      const float* src = O.data<float>() + i * h;
      for (int64_t j = 0; j < h; ++j) dst[j] += src[j];
    }
    count_weight(L.up, d * h);
    if (m.gated_experts) count_weight(L.gate, d * h);
    count_weight(L.down, d * h, false, /*scales: per (expert, output channel)*/ h);
  }
  counters_.routed_pairs += n * E;
  // 7. The shared expert, always on.
  if (L.sh_up.defined()) ops::add_(out, swiglu(x, L.sh_gate, L.sh_up, L.sh_down));
  return out;
}

Tensor Model::forward(std::span<const int32_t> tokens, bool all_logits) {
  const ModelConfig& m = info_.model;
  const int64_t n = static_cast<int64_t>(tokens.size()), h = m.hidden;
  if (n == 0) fail("forward: no tokens");
  if (pos_ + n > m.seq_len)
    fail("the sequence needs ", pos_ + n, " positions but the model's context is ", m.seq_len, " tokens");
  Tensor tok = Tensor::empty({n}, DType::i32);
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= m.vocab_size)
      fail("token id ", tokens[i], " is outside the model's vocabulary of ", m.vocab_size);
    tok.data<int32_t>()[i] = tokens[i];
  }
  Tensor x = Tensor::empty({n, h}, DType::f32);
  ops::embedding_forward(x, tok, embedding_);
  count_weight(embedding_, n * h);
  Tensor xn = Tensor::empty({n, h}, DType::f32), rstd = Tensor::empty({n}, DType::f32);
  Tensor a = Tensor::empty({n, h}, DType::f32);
  for (auto& Lp : layers_) {
    Layer& L = *Lp;
    // x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x))
    ops::rmsnorm_forward(xn, rstd, x, L.attn_norm, m.norm_eps);
    attention(L, xn, a, n);
    ops::add_(x, a);
    ops::rmsnorm_forward(xn, rstd, x, L.ffn_norm, m.norm_eps);
    count_weight(L.attn_norm);
    count_weight(L.ffn_norm);
    Tensor f = L.deco ? deco_ffn(static_cast<int>(&Lp - layers_.data()), xn) : swiglu(xn, L.w_gate, L.w_up, L.w_down);
    ops::add_(x, f);
  }
  const int64_t rows = all_logits ? n : 1;
  Tensor last = all_logits ? x : x.rows(n - 1, 1);
  Tensor hn = Tensor::empty({rows, h}, DType::f32), rs = Tensor::empty({rows}, DType::f32);
  ops::rmsnorm_forward(hn, rs, last, final_norm_, m.norm_eps);
  Tensor logits = Tensor::empty({rows, m.vocab_size}, DType::f32);
  ops::linear_forward(logits, hn, lm_head_);
  count_weight(final_norm_);
  count_weight(lm_head_);
  pos_ += n;
  counters_.forwards += 1;
  counters_.tokens += n;
  return logits;
}

}  // namespace decotron::inference
