// The DECO FFN's own ops on the GPU (deco-model.md): NormSiLU, router activation and scaling,
// expert scaling, the sparsity regularizers and the activity counts. Every reduction is
// deterministic: block/warp trees or the fixed-order partial sums of common.cuh, no float
// atomics. dtypes: NormSiLU and expert scaling fp32 and bf16 (their stats, router scores s
// and ds in fp32); the router-side ops (r, s, g, da) fp32, as the model keeps the router in fp32.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace decotron::cuda {

namespace {

bool uses_mean(NormSiluMode m) { return m == NormSiluMode::full || m == NormSiluMode::no_rms; }
bool uses_rms(NormSiluMode m) { return m == NormSiluMode::full || m == NormSiluMode::no_mean; }

__device__ __forceinline__ float silu_grad(float x) {
  const float sg = sigmoidf_(x);
  return sg * (1.0f + x * (1.0f - sg));
}

// ---- NormSiLU ---------------------------------------------------------------------------------
// One block per token: the mean over all E*d entries (block tree), then one warp per expert
// block for its RMS (warp tree) and the output.
template <class T>
__global__ void normsilu_forward_kernel(T* z, float* stats, const T* u, const T* gamma, int E, int d, bool mean,
                                        bool rms, float eps) {
  const int64_t t = blockIdx.x, n = static_cast<int64_t>(E) * d;
  const T* ut = u + t * n;
  T* zt = z + t * n;
  float* st = stats + t * (1 + E);
  float mu = 0.0f;
  if (mean) {
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += to_float(ut[j]);
    mu = block_sum(s) / static_cast<float>(n);
  }
  if (threadIdx.x == 0) st[0] = mu;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int e = w; e < E; e += nw) {
    const T* ue = ut + static_cast<int64_t>(e) * d;
    float rs = 1.0f;
    if (rms) {
      float ss = 0.0f;
      for (int j = lane; j < d; j += 32) {
        const float c = to_float(ue[j]) - mu;
        ss += c * c;
      }
      rs = 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
    }
    if (lane == 0) st[1 + e] = rs;
    for (int j = lane; j < d; j += 32) {
      const float c = to_float(ue[j]) - mu;
      const float pre = rms ? to_float(gamma[j]) * c * rs : c;
      zt[static_cast<int64_t>(e) * d + j] = from_float<T>(pre * sigmoidf_(pre));
    }
  }
}

// One block per token: per expert block (one warp each) the RMSNorm backward within the block
// into shared memory, then the mean's backward over the token.
template <class T>
__global__ void normsilu_backward_kernel(T* du, const T* dz, const T* u, const T* gamma, const float* stats, int E, int d,
                                         bool mean, bool rms) {
  extern __shared__ float dc[];  // [E * d]
  const int64_t t = blockIdx.x, n = static_cast<int64_t>(E) * d;
  const T *ut = u + t * n, *dzt = dz + t * n;
  const float* st = stats + t * (1 + E);
  const float mu = st[0];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int e = w; e < E; e += nw) {
    const int64_t o = static_cast<int64_t>(e) * d;
    if (!rms) {
      for (int j = lane; j < d; j += 32) dc[o + j] = to_float(dzt[o + j]) * silu_grad(to_float(ut[o + j]) - mu);
      continue;
    }
    // pre = gamma * chat, chat = c * rs; dchat = dpre * gamma; dc = rs (dchat - chat mean(dchat chat))
    const float rs = st[1 + e];
    float dot = 0.0f;
    for (int j = lane; j < d; j += 32) {
      const float chat = (to_float(ut[o + j]) - mu) * rs, g = to_float(gamma[j]);
      const float dchat = to_float(dzt[o + j]) * silu_grad(g * chat) * g;
      dc[o + j] = dchat;
      dot += dchat * chat;
    }
    dot = warp_sum(dot) / static_cast<float>(d);
    for (int j = lane; j < d; j += 32) {
      const float chat = (to_float(ut[o + j]) - mu) * rs;
      dc[o + j] = rs * (dc[o + j] - chat * dot);
    }
  }
  __syncthreads();
  float mean_dc = 0.0f;
  if (mean) {
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += dc[j];
    mean_dc = block_sum(s) / static_cast<float>(n);
  }
  T* dut = du + t * n;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dut[j] = from_float<T>(dc[j] - mean_dc);
}

// dgamma[j] += sum over (token, expert) rows of dpre * chat
template <class T> struct NormSiluDgamma {
  const T *dz, *u, *gamma;
  const float* stats;
  int E, d;
  __device__ double operator()(int64_t r, int64_t j) const {
    const int64_t t = r / E, e = r - t * E, i = (t * E + e) * d + j;
    const float* st = stats + t * (1 + E);
    const float chat = (to_float(u[i]) - st[0]) * st[1 + e];
    return static_cast<double>(to_float(dz[i]) * silu_grad(to_float(gamma[j]) * chat)) * chat;
  }
};

// ---- router -------------------------------------------------------------------------------------
__global__ void router_scale_forward_kernel(float* s, const float* r, const float* g, int64_t E, int64_t gs, int64_t n) {
  DT_GRID_STRIDE(i, n) s[i] = fmaxf(r[i], 0.0f) * g[(i % E) * gs];
}

__global__ void router_scale_backward_kernel(float* dr, const float* ds, const float* r, const float* g,
                                             const float* da_extra, int64_t E, int64_t gs, int64_t n) {
  DT_GRID_STRIDE(i, n) {
    const float da = ds[i] * g[(i % E) * gs] + (da_extra ? da_extra[i] : 0.0f);
    dr[i] = r[i] > 0.0f ? da : 0.0f;
  }
}

struct DsTimesA {  // (t, e) -> ds * relu(r)
  const float *ds, *r;
  int64_t E;
  __device__ double operator()(int64_t t, int64_t e) const {
    return static_cast<double>(ds[t * E + e]) * fmaxf(r[t * E + e], 0.0f);
  }
};
struct DsTimesAFlat {
  const float *ds, *r;
  __device__ double operator()(int64_t i) const { return static_cast<double>(ds[i]) * fmaxf(r[i], 0.0f); }
};
struct IsActive {
  const float* r;
  __device__ double operator()(int64_t i) const { return r[i] > 0.0f ? 1.0 : 0.0; }
};
struct RowHasActive {  // 1 if token t has at least one active expert
  const float* r;
  int64_t E;
  __device__ double operator()(int64_t t) const {
    for (int64_t e = 0; e < E; ++e)
      if (r[t * E + e] > 0.0f) return 1.0;
    return 0.0;
  }
};
struct IsActiveCol {
  const float* r;
  int64_t E;
  __device__ double operator()(int64_t t, int64_t e) const { return r[t * E + e] > 0.0f ? 1.0 : 0.0; }
};
struct ActiveMassCol {
  const float* r;
  int64_t E;
  __device__ double operator()(int64_t t, int64_t e) const { return fmaxf(r[t * E + e], 0.0f); }
};

// ---- entropy regularizer (constants 1e-5 as the reference code) ----------------------------------
struct EntropyRow {  // H_t of one token, in double
  const float* r;
  int64_t E;
  __device__ double operator()(int64_t t) const {
    const float* rt = r + t * E;
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += fmaxf(rt[e], 0.0f);
    double h = 0;
    for (int64_t e = 0; e < E; ++e) {
      const double p = fmaxf(rt[e], 0.0f) / (sum + 1e-5);
      h -= p * log(p + 1e-5);
    }
    return h;
  }
};

// One thread per token: dH/da_k = inv (gp_k - sum_e gp_e p_e), gp_e = dH/dp_e.
__global__ void entropy_backward_kernel(float* da, const float* r, int64_t E, int64_t rows, double coef) {
  DT_GRID_STRIDE(t, rows) {
    const float* rt = r + t * E;
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += fmaxf(rt[e], 0.0f);
    const double inv = 1.0 / (sum + 1e-5);
    double wsum = 0;
    for (int64_t e = 0; e < E; ++e) {
      const double p = fmaxf(rt[e], 0.0f) * inv;
      wsum += -(log(p + 1e-5) + p / (p + 1e-5)) * p;
    }
    for (int64_t e = 0; e < E; ++e) {
      const double p = fmaxf(rt[e], 0.0f) * inv;
      const double gp = -(log(p + 1e-5) + p / (p + 1e-5));
      da[t * E + e] += static_cast<float>(coef * inv * (gp - wsum));
    }
  }
}

__global__ void l1_backward_kernel(float* da, const double* counts, int64_t E, int64_t n, double coef_over_denom) {
  DT_GRID_STRIDE(i, n) da[i] += static_cast<float>(coef_over_denom * counts[i % E]);
}

// ---- expert scaling -----------------------------------------------------------------------------
template <class T>
__global__ void expert_scale_forward_kernel(T* y, const T* z, const float* s, int64_t E, int64_t d, int64_t n_total) {
  const int64_t n = E * d;
  DT_GRID_STRIDE(i, n_total) {
    const int64_t t = i / n, e = (i - t * n) / d;
    y[i] = from_float<T>(to_float(z[i]) * s[t * E + e]);
  }
}

template <class T>
__global__ void expert_scale_dz_kernel(T* dz, const T* dy, const float* s, int64_t E, int64_t d, int64_t n_total) {
  const int64_t n = E * d;
  DT_GRID_STRIDE(i, n_total) {
    const int64_t t = i / n, e = (i - t * n) / d;
    dz[i] = from_float<T>(to_float(dy[i]) * s[t * E + e]);
  }
}

// One warp per (token, expert): ds = dy . z over the expert's d entries.
template <class T>
__global__ void expert_scale_ds_kernel(float* ds, const T* dy, const T* z, int64_t d, int64_t pairs) {
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= pairs) return;  // whole warps leave together
  const T *a = dy + warp * d, *b = z + warp * d;
  float acc = 0.0f;
  for (int64_t j = lane; j < d; j += 32) acc += to_float(a[j]) * to_float(b[j]);
  acc = warp_sum(acc);
  if (lane == 0) ds[warp] = acc;
}

void expect_router(const Tensor& r, const char* op) {
  DT_ASSERT(r.ndim() >= 1, op, ": r needs a last dimension");
  if (r.dtype() != DType::f32) no_kernel(op, r.dtype());
}

}  // namespace

void normsilu_forward(Tensor& z, Tensor& stats, const Tensor& u, const Tensor& gamma, int64_t E, NormSiluMode mode,
                      double eps) {
  const int64_t d = gamma.numel(), n = E * d, rows = n ? u.numel() / n : 0;
  expect_numel(u, rows * n, "normsilu_forward", "u");
  expect_numel(z, rows * n, "normsilu_forward", "z");
  expect_numel(stats, rows * (1 + E), "normsilu_forward", "stats");
  expect_dtype(stats, DType::f32, "normsilu_forward", "stats");
  if (rows == 0) return;
  DT_CUDA_F32_BF16(u.dtype(), "normsilu_forward", T, {
    normsilu_forward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, context().stream>>>(
        ptr<T>(z), ptr<float>(stats), ptr<T>(u), ptr<T>(gamma), static_cast<int>(E), static_cast<int>(d),
        uses_mean(mode), uses_rms(mode), static_cast<float>(eps));
    CUDA_CHECK_LAUNCH();
  });
}

void normsilu_backward(Tensor& du, Tensor& dgamma, const Tensor& dz, const Tensor& u, const Tensor& gamma,
                       const Tensor& stats, int64_t E, NormSiluMode mode, double eps) {
  const int64_t d = gamma.numel(), n = E * d, rows = n ? u.numel() / n : 0;
  expect_numel(u, rows * n, "normsilu_backward", "u");
  expect_numel(dz, rows * n, "normsilu_backward", "dz");
  expect_numel(du, rows * n, "normsilu_backward", "du");
  expect_numel(stats, rows * (1 + E), "normsilu_backward", "stats");
  expect_dtype(stats, DType::f32, "normsilu_backward", "stats");
  if (rows == 0) return;
  const size_t smem = n * sizeof(float);
  DT_CUDA_F32_BF16(u.dtype(), "normsilu_backward", T, {
    allow_shared(normsilu_backward_kernel<T>, smem, "normsilu_backward");
    normsilu_backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, smem, context().stream>>>(
        ptr<T>(du), ptr<T>(dz), ptr<T>(u), ptr<T>(gamma), ptr<float>(stats), static_cast<int>(E), static_cast<int>(d),
        uses_mean(mode), uses_rms(mode));
    CUDA_CHECK_LAUNCH();
    if (uses_rms(mode)) {
      expect_numel(dgamma, d, "normsilu_backward", "dgamma");
      NormSiluDgamma<T> f{ptr<T>(dz), ptr<T>(u), ptr<T>(gamma), ptr<float>(stats), static_cast<int>(E), static_cast<int>(d)};
      if (dgamma.dtype() == DType::f32) col_sum_into(f, rows * E, d, ptr<float>(dgamma), true);
      else col_sum_into(f, rows * E, d, ptr<T>(dgamma), true);
    }
  });
}

void router_scale_forward(Tensor& s, const Tensor& r, const Tensor& g) {
  expect_router(r, "router_scale_forward");
  const int64_t E = r.dim(-1), n = r.numel();
  DT_ASSERT(g.numel() == 1 || g.numel() == E, "router scale g ", shape_str(g.shape()));
  expect_numel(s, n, "router_scale_forward", "s");
  if (n == 0) return;
  router_scale_forward_kernel<<<grid_for(n), kThreads, 0, context().stream>>>(ptr<float>(s), ptr<float>(r), ptr<float>(g),
                                                                              E, g.numel() == 1 ? 0 : 1, n);
  CUDA_CHECK_LAUNCH();
}

void router_scale_backward(Tensor& dr, Tensor* dg, const Tensor& ds, const Tensor& r, const Tensor& g,
                           const Tensor* da_extra) {
  expect_router(r, "router_scale_backward");
  const int64_t E = r.dim(-1), n = r.numel(), rows = E ? n / E : 0;
  DT_ASSERT(g.numel() == 1 || g.numel() == E, "router scale g ", shape_str(g.shape()));
  expect_numel(dr, n, "router_scale_backward", "dr");
  expect_numel(ds, n, "router_scale_backward", "ds");
  if (da_extra) expect_numel(*da_extra, n, "router_scale_backward", "da_extra");
  if (n == 0) return;
  router_scale_backward_kernel<<<grid_for(n), kThreads, 0, context().stream>>>(
      ptr<float>(dr), ptr<float>(ds), ptr<float>(r), ptr<float>(g), da_extra ? ptr<float>(*da_extra) : nullptr, E,
      g.numel() == 1 ? 0 : 1, n);
  CUDA_CHECK_LAUNCH();
  if (dg) {
    expect_numel(*dg, g.numel(), "router_scale_backward", "dg");
    if (g.numel() == E) col_sum_into(DsTimesA{ptr<float>(ds), ptr<float>(r), E}, rows, E, ptr<float>(*dg), true);
    else sum_into(DsTimesAFlat{ptr<float>(ds), ptr<float>(r)}, n, ptr<float>(*dg), true);
  }
}

int64_t count_active(const Tensor& r) {
  expect_router(r, "count_active");
  if (r.numel() == 0) return 0;
  return static_cast<int64_t>(sum_to_host(IsActive{ptr<float>(r)}, r.numel()));
}

int64_t count_tokens_with_active(const Tensor& r) {
  expect_router(r, "count_tokens_with_active");
  const int64_t E = r.dim(-1), rows = E ? r.numel() / E : 0;
  if (rows == 0) return 0;
  return static_cast<int64_t>(sum_to_host(RowHasActive{ptr<float>(r), E}, rows));
}

void count_active_per_expert(const Tensor& r, int64_t* counts) {
  expect_router(r, "count_active_per_expert");
  const int64_t E = r.dim(-1), rows = E ? r.numel() / E : 0;
  if (E == 0) return;
  Tensor c = scratch(E, DType::f64);
  col_sum_into(IsActiveCol{ptr<float>(r), E}, rows, E, ptr<double>(c), false);
  Tensor host = c.to(Device::cpu);
  for (int64_t e = 0; e < E; ++e) counts[e] = static_cast<int64_t>(host.data<double>()[e]);
}

double entropy_forward(const Tensor& r) {
  expect_router(r, "entropy_forward");
  const int64_t E = r.dim(-1), rows = E ? r.numel() / E : 0;
  if (rows == 0) return 0.0;
  return sum_to_host(EntropyRow{ptr<float>(r), E}, rows);
}

void entropy_backward(Tensor& da, const Tensor& r, double coef) {
  expect_router(r, "entropy_backward");
  const int64_t E = r.dim(-1), rows = E ? r.numel() / E : 0;
  expect_numel(da, r.numel(), "entropy_backward", "da");
  if (rows == 0) return;
  entropy_backward_kernel<<<grid_for(rows), kThreads, 0, context().stream>>>(ptr<float>(da), ptr<float>(r), E, rows,
                                                                             coef);
  CUDA_CHECK_LAUNCH();
}

double l1_reg_forward(const Tensor& r, double target) {
  expect_router(r, "l1_reg_forward");
  const int64_t E = r.dim(-1), rows = E ? r.numel() / E : 0;
  if (E == 0) return 0.0;
  Tensor mass = scratch(E, DType::f64), count = scratch(E, DType::f64);
  col_sum_into(ActiveMassCol{ptr<float>(r), E}, rows, E, ptr<double>(mass), false);
  col_sum_into(IsActiveCol{ptr<float>(r), E}, rows, E, ptr<double>(count), false);
  Tensor m = mass.to(Device::cpu), c = count.to(Device::cpu);
  double total = 0;
  for (int64_t e = 0; e < E; ++e) total += m.data<double>()[e] * c.data<double>()[e];
  return total / (target * static_cast<double>(rows) * rows);
}

void routing_summary(Tensor& out, const Tensor& r) {
  expect_router(r, "routing_summary");
  const int64_t E = r.dim(-1), rows = E ? r.numel() / E : 0;
  expect_numel(out, 2 * E + 2, "routing_summary", "out");
  double* o = ptr<double>(out);
  if (rows == 0) {
    CUDA_CHECK(cudaMemsetAsync(o, 0, out.numel() * sizeof(double), context().stream));
    return;
  }
  // The same reductions as the host-returning ops, so the same bits, without their waits.
  col_sum_into(IsActiveCol{ptr<float>(r), E}, rows, E, o, false);
  col_sum_into(ActiveMassCol{ptr<float>(r), E}, rows, E, o + E, false);
  sum_into(RowHasActive{ptr<float>(r), E}, rows, o + 2 * E, false);
  sum_into(EntropyRow{ptr<float>(r), E}, rows, o + 2 * E + 1, false);
}

void l1_reg_backward(Tensor& da, const Tensor& r, double target, double coef) {
  expect_router(r, "l1_reg_backward");
  const int64_t E = r.dim(-1), n = r.numel(), rows = E ? n / E : 0;
  expect_numel(da, n, "l1_reg_backward", "da");
  if (n == 0) return;
  Tensor count = scratch(E, DType::f64);
  col_sum_into(IsActiveCol{ptr<float>(r), E}, rows, E, ptr<double>(count), false);
  const double denom = target * static_cast<double>(rows) * rows;
  l1_backward_kernel<<<grid_for(n), kThreads, 0, context().stream>>>(ptr<float>(da), ptr<double>(count), E, n,
                                                                     coef / denom);
  CUDA_CHECK_LAUNCH();
}

void expert_scale_forward(Tensor& y, const Tensor& z, const Tensor& s, int64_t E) {
  const int64_t n = z.dim(-1), d = E ? n / E : 0, total = z.numel(), rows = n ? total / n : 0;
  DT_ASSERT(d * E == n, "expert_scale_forward: width ", n, " is not ", E, " experts");
  expect_numel(s, rows * E, "expert_scale_forward", "s");
  expect_numel(y, total, "expert_scale_forward", "y");
  if (total == 0) return;
  DT_CUDA_F32_BF16(z.dtype(), "expert_scale_forward", T, {
    expert_scale_forward_kernel<T><<<grid_for(total), kThreads, 0, context().stream>>>(ptr<T>(y), ptr<T>(z),
                                                                                       ptr<float>(s), E, d, total);
    CUDA_CHECK_LAUNCH();
  });
}

void expert_scale_backward(Tensor& dz, Tensor& ds, const Tensor& dy, const Tensor& z, const Tensor& s, int64_t E) {
  const int64_t n = z.dim(-1), d = E ? n / E : 0, total = z.numel(), rows = n ? total / n : 0;
  DT_ASSERT(d * E == n, "expert_scale_backward: width ", n, " is not ", E, " experts");
  expect_numel(s, rows * E, "expert_scale_backward", "s");
  expect_numel(ds, rows * E, "expert_scale_backward", "ds");
  expect_numel(dy, total, "expert_scale_backward", "dy");
  expect_numel(dz, total, "expert_scale_backward", "dz");
  if (total == 0) return;
  cudaStream_t st = context().stream;
  DT_CUDA_F32_BF16(z.dtype(), "expert_scale_backward", T, {
    expert_scale_dz_kernel<T><<<grid_for(total), kThreads, 0, st>>>(ptr<T>(dz), ptr<T>(dy), ptr<float>(s), E, d, total);
    CUDA_CHECK_LAUNCH();
    const int64_t pairs = rows * E;
    const int64_t blocks = (pairs * 32 + kThreads - 1) / kThreads;
    expert_scale_ds_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(ptr<float>(ds), ptr<T>(dy), ptr<T>(z),
                                                                                  d, pairs);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace decotron::cuda
