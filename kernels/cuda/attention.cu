// Causal grouped-query attention on the GPU. bf16 goes to cuDNN's fused SDPA where this build
// has it and cuDNN has a plan (kernels/cuda/cudnn_attention.cu), else, with head_dim 64 or 128,
// to the flash kernels (kernels/cuda/flash_attention.cu: tiled, tensor cores); everything else
// (fp32, other widths) runs the plain reference kernels below (fp32 or bf16 storage, fp32
// arithmetic), correct and deterministic, not fast, and kept as the test oracle.
// DECOTRON_ATTENTION=flash or =reference (read once) skips the faster paths, e.g. to benchmark
// them against each other. Same layout and contract as the CPU reference: q, out [B, S, H, D]; k, v [B, S, G, D];
// lse [B, H, S] (fp32), the backward recomputes probabilities from it.
//
// Forward: one block per (query row i, head h, batch b): scores of keys 0..i into shared
//   memory, block max and sum, lse, then out = P V with threads over D.
// Backward, no atomics:
//   delta[b, h, i] = dout_i . out_i (one thread per row);
//   dq: one block per (i, h, b): ds_ij = p_ij (dout_i . v_j - delta_i) * scale into shared
//       memory, then dq_i = sum_j ds_ij k_j with threads over D;
//   dk, dv: one block per (key row j, kv head g, b): for each query head of the group, p_ij and
//       ds_ij for i >= j into shared memory, then dv_j += sum_i p_ij dout_i and
//       dk_j += sum_i ds_ij q_i, summed over i in order by the thread owning each d.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/cudnn_attention.h"
#include "kernels/cuda/flash_attention.h"

namespace decotron::cuda {

namespace {

constexpr int kAttnThreads = 128;

template <class A, class B> __device__ __forceinline__ float dot_(const A* a, const B* b, int D) {
  float s = 0.0f;
  for (int d = 0; d < D; ++d) s += to_float(a[d]) * to_float(b[d]);
  return s;
}

template <class T>
__global__ void attn_forward_kernel(T* out, float* lse, const T* q, const T* k, const T* v, int S, int H,
                                    int G, int D, float scale) {
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (H / G), tid = threadIdx.x;
  extern __shared__ float sm[];
  float* qs = sm;     // [D]
  float* p = sm + D;  // [S]
  const int64_t qo = ((static_cast<int64_t>(b) * S + i) * H + h) * D;
  for (int d = tid; d < D; d += blockDim.x) qs[d] = to_float(q[qo + d]);
  __syncthreads();
  float m = -INFINITY;
  for (int j = tid; j <= i; j += blockDim.x) {
    const float s = dot_(qs, k + ((static_cast<int64_t>(b) * S + j) * G + g) * D, D) * scale;
    p[j] = s;
    m = fmaxf(m, s);
  }
  m = block_max(m);
  float sum = 0.0f;
  for (int j = tid; j <= i; j += blockDim.x) {
    const float e = expf(p[j] - m);
    p[j] = e;
    sum += e;
  }
  sum = block_sum(sum);  // also makes every p[j] visible to the whole block
  if (tid == 0) lse[(static_cast<int64_t>(b) * H + h) * S + i] = m + logf(sum);
  for (int d = tid; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j <= i; ++j) acc += p[j] * to_float(v[((static_cast<int64_t>(b) * S + j) * G + g) * D + d]);
    out[qo + d] = from_float<T>(acc / sum);
  }
}

// delta[(b * H + h) * S + i] = dout_i . out_i
template <class T>
__global__ void attn_delta_kernel(float* delta, const T* dout, const T* out, int S, int H, int D, int64_t rows) {
  DT_GRID_STRIDE(r, rows) {
    const int64_t i = r % S, bh = r / S, h = bh % H, b = bh / H;
    const int64_t o = ((b * S + i) * H + h) * D;
    delta[r] = dot_(dout + o, out + o, D);
  }
}

template <class T>
__global__ void attn_dq_kernel(T* dq, const T* dout, const T* q, const T* k, const T* v,
                               const float* lse, const float* delta, int S, int H, int G, int D, float scale) {
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (H / G), tid = threadIdx.x;
  extern __shared__ float sm[];
  float* qs = sm;          // [D]
  float* dos = sm + D;     // [D]
  float* ds = sm + 2 * D;  // [S]
  const int64_t qo = ((static_cast<int64_t>(b) * S + i) * H + h) * D;
  for (int d = tid; d < D; d += blockDim.x) {
    qs[d] = to_float(q[qo + d]);
    dos[d] = to_float(dout[qo + d]);
  }
  __syncthreads();
  const int64_t row = (static_cast<int64_t>(b) * H + h) * S + i;
  const float l = lse[row], dl = delta[row];
  for (int j = tid; j <= i; j += blockDim.x) {
    const int64_t ko = ((static_cast<int64_t>(b) * S + j) * G + g) * D;
    const float p = expf(dot_(qs, k + ko, D) * scale - l);
    ds[j] = p * (dot_(dos, v + ko, D) - dl) * scale;
  }
  __syncthreads();
  for (int d = tid; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j <= i; ++j) acc += ds[j] * to_float(k[((static_cast<int64_t>(b) * S + j) * G + g) * D + d]);
    dq[qo + d] = from_float<T>(acc);
  }
}

template <class T>
__global__ void attn_dkv_kernel(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                                const float* lse, const float* delta, int S, int H, int G, int D, float scale) {
  const int j = blockIdx.x, g = blockIdx.y, b = blockIdx.z, group = H / G, tid = threadIdx.x;
  extern __shared__ float sm[];
  float* ks = sm;              // [D]
  float* vs = sm + D;          // [D]
  float* dk_acc = sm + 2 * D;  // [D]
  float* dv_acc = sm + 3 * D;  // [D]
  float* ps = sm + 4 * D;      // [S]
  float* dss = ps + S;         // [S]
  const int64_t ko = ((static_cast<int64_t>(b) * S + j) * G + g) * D;
  for (int d = tid; d < D; d += blockDim.x) {
    ks[d] = to_float(k[ko + d]);
    vs[d] = to_float(v[ko + d]);
    dk_acc[d] = 0.0f;
    dv_acc[d] = 0.0f;
  }
  __syncthreads();
  for (int hh = 0; hh < group; ++hh) {
    const int h = g * group + hh;
    const int64_t lrow = (static_cast<int64_t>(b) * H + h) * S;
    for (int i = j + tid; i < S; i += blockDim.x) {
      const int64_t qo = ((static_cast<int64_t>(b) * S + i) * H + h) * D;
      const float p = expf(dot_(q + qo, ks, D) * scale - lse[lrow + i]);
      ps[i] = p;
      dss[i] = p * (dot_(dout + qo, vs, D) - delta[lrow + i]) * scale;
    }
    __syncthreads();
    for (int d = tid; d < D; d += blockDim.x) {
      float a_k = 0.0f, a_v = 0.0f;
      for (int i = j; i < S; ++i) {
        const int64_t qo = ((static_cast<int64_t>(b) * S + i) * H + h) * D + d;
        a_v += ps[i] * to_float(dout[qo]);
        a_k += dss[i] * to_float(q[qo]);
      }
      dk_acc[d] += a_k;
      dv_acc[d] += a_v;
    }
    __syncthreads();  // ps/dss are rewritten for the next head
  }
  for (int d = tid; d < D; d += blockDim.x) {
    dk[ko + d] = from_float<T>(dk_acc[d]);
    dv[ko + d] = from_float<T>(dv_acc[d]);
  }
}

void check_shapes(const AttnShape& s, const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  DT_ASSERT(s.kv_heads > 0 && s.heads % s.kv_heads == 0, op, ": heads ", s.heads, " not a multiple of kv_heads ",
            s.kv_heads);
  DT_ASSERT(q.numel() == s.batch * s.seq * s.heads * s.head_dim && k.numel() == s.batch * s.seq * s.kv_heads * s.head_dim &&
                v.numel() == k.numel(),
            op, ": q ", shape_str(q.shape()), " k ", shape_str(k.shape()), " v ", shape_str(v.shape()));
  DT_ASSERT(s.seq < (int64_t(1) << 31) && s.heads <= 65535 && s.batch <= 65535, op, ": shape too large");
}

AttentionPath last_path = AttentionPath::none;

// DECOTRON_ATTENTION (read once): unset or "auto" = cuDNN, else the flash kernels, else the
// reference, each where it supports the tensors; "flash" skips cuDNN; "reference" uses the
// reference kernels only.
enum class Choice { automatic, flash, reference };
Choice attention_choice() {
  static const Choice c = [] {
    const char* e = std::getenv("DECOTRON_ATTENTION");
    if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0 || std::strcmp(e, "cudnn") == 0)
      return Choice::automatic;
    if (std::strcmp(e, "flash") == 0) return Choice::flash;
    if (std::strcmp(e, "reference") == 0) return Choice::reference;
    fail("DECOTRON_ATTENTION=", e, ": expected auto, cudnn, flash or reference");
  }();
  return c;
}
AttentionPath override_path = AttentionPath::none;
Choice choice() {
  switch (override_path) {
    case AttentionPath::cudnn: return Choice::automatic;
    case AttentionPath::flash: return Choice::flash;
    case AttentionPath::reference: return Choice::reference;
    case AttentionPath::none: break;
  }
  return attention_choice();
}
bool reference_forced() { return choice() == Choice::reference; }
bool cudnn_allowed() { return choice() == Choice::automatic; }

// The flash kernels move 16 bytes at a time; a view at an odd offset takes the reference path.
bool aligned16(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->raw()) % 16 != 0) return false;
  return true;
}

}  // namespace

AttentionPath last_attention_path() { return last_path; }
void set_attention_override(AttentionPath p) { override_path = p; }

void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v, const AttnShape& s) {
  check_shapes(s, q, k, v, "attention_forward");
  expect_numel(out, q.numel(), "attention_forward", "out");
  expect_numel(lse, s.batch * s.heads * s.seq, "attention_forward", "lse");
  expect_dtype(lse, DType::f32, "attention_forward", "lse");
  if (q.numel() == 0) return;
  const int S = static_cast<int>(s.seq), H = static_cast<int>(s.heads), G = static_cast<int>(s.kv_heads),
            D = static_cast<int>(s.head_dim);
  if (cudnn_allowed() && cudnn_attention_forward(out, lse, q, k, v, s)) {
    last_path = AttentionPath::cudnn;
    return;
  }
  if (!reference_forced() && flash_attention_supported(q, s) && aligned16({&out, &q, &k, &v})) {
    flash_attention_forward(out, lse, q, k, v, s);
    last_path = AttentionPath::flash;
    return;
  }
  last_path = AttentionPath::reference;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  DT_CUDA_F32_BF16(q.dtype(), "attention_forward", T, {
    const size_t smem = (static_cast<size_t>(D) + S) * sizeof(float);
    allow_shared(attn_forward_kernel<T>, smem, "attention_forward");
    dim3 grid(S, H, static_cast<unsigned>(s.batch));
    attn_forward_kernel<T><<<grid, kAttnThreads, smem, context().stream>>>(ptr<T>(out), ptr<float>(lse), ptr<T>(q),
                                                                       ptr<T>(k), ptr<T>(v), S, H, G, D, scale);
    CUDA_CHECK_LAUNCH();
  });
}

void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnShape& s) {
  check_shapes(s, q, k, v, "attention_backward");
  expect_numel(dq, q.numel(), "attention_backward", "dq");
  expect_numel(dout, q.numel(), "attention_backward", "dout");
  expect_numel(out, q.numel(), "attention_backward", "out");
  expect_numel(dk, k.numel(), "attention_backward", "dk");
  expect_numel(dv, k.numel(), "attention_backward", "dv");
  expect_numel(lse, s.batch * s.heads * s.seq, "attention_backward", "lse");
  expect_dtype(lse, DType::f32, "attention_backward", "lse");
  if (q.numel() == 0) return;
  const int S = static_cast<int>(s.seq), H = static_cast<int>(s.heads), G = static_cast<int>(s.kv_heads),
            D = static_cast<int>(s.head_dim);
  if (cudnn_allowed() && cudnn_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, s)) {
    last_path = AttentionPath::cudnn;
    return;
  }
  if (!reference_forced() && flash_attention_supported(q, s) &&
      aligned16({&dq, &dk, &dv, &dout, &q, &k, &v, &out})) {
    flash_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, s);
    last_path = AttentionPath::flash;
    return;
  }
  last_path = AttentionPath::reference;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  cudaStream_t st = context().stream;
  DT_CUDA_F32_BF16(q.dtype(), "attention_backward", T, {
    const int64_t rows = s.batch * s.heads * s.seq;
    Tensor delta = scratch(rows, DType::f32);
    attn_delta_kernel<T><<<grid_for(rows), kThreads, 0, st>>>(ptr<float>(delta), ptr<T>(dout), ptr<T>(out), S, H, D, rows);
    CUDA_CHECK_LAUNCH();

    const size_t smem_q = (2 * static_cast<size_t>(D) + S) * sizeof(float);
    allow_shared(attn_dq_kernel<T>, smem_q, "attention_backward");
    attn_dq_kernel<T><<<dim3(S, H, static_cast<unsigned>(s.batch)), kAttnThreads, smem_q, st>>>(
        ptr<T>(dq), ptr<T>(dout), ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<float>(lse), ptr<float>(delta), S, H, G, D, scale);
    CUDA_CHECK_LAUNCH();

    const size_t smem_kv = (4 * static_cast<size_t>(D) + 2 * static_cast<size_t>(S)) * sizeof(float);
    allow_shared(attn_dkv_kernel<T>, smem_kv, "attention_backward");
    attn_dkv_kernel<T><<<dim3(S, G, static_cast<unsigned>(s.batch)), kAttnThreads, smem_kv, st>>>(
        ptr<T>(dk), ptr<T>(dv), ptr<T>(dout), ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<float>(lse), ptr<float>(delta), S, H, G,
        D, scale);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace decotron::cuda
