// Every CUDA op against the CPU reference (kernels/cpu, fp32) on fresh random inputs, in fp32
// and, where the CUDA op has one, bf16; plus the Philox stream on the GPU against the CPU's,
// the caching allocator, copies, and determinism of the reductions. All skip without a GPU.
//
// Tolerances: |got - want| <= rtol |want| + floor * max|want| per element; fp32 rtol = floor =
// 1e-5, bf16 1e-2. For bf16 the CPU reference runs in fp32 on the bf16-rounded inputs, so the
// difference is the GPU's output rounding (2^-9 relative) and its fp32 accumulation order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/multi_tensor.h"
#include "kernels/ops.h"
#ifdef DECOTRON_WITH_CUDA
#include "core/cuda_backend.h"
#include "kernels/cuda/cudnn_attention.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/gathered_gemm.h"
#include "kernels/cuda/random.h"
#endif

using namespace decotron;

namespace {

#define SKIP_WITHOUT_GPU() \
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device visible"

constexpr uint64_t kSeed = 20261123;
uint64_t next_stream = 1;

// N(shift, scale^2) entries from a fresh Philox stream.
Tensor randn(const Shape& s, double scale = 1.0, double shift = 0.0) {
  Tensor t = Tensor::empty(s, DType::f32);
  const uint64_t st = next_stream++;
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(shift + scale * rng::normal(kSeed, st, i));
  return t;
}

Tensor random_ids(int64_t n, int64_t vocab) {
  Tensor t = Tensor::empty({n}, DType::i32);
  const uint64_t st = next_stream++;
  for (int64_t i = 0; i < n; ++i)
    t.data<int32_t>()[i] = static_cast<int32_t>(rng::random4(kSeed, st, i).v[0] % static_cast<uint32_t>(vocab));
  return t;
}

// The fp32 values a dtype can hold: identity for fp32, rounded through bf16 for bf16. The CPU
// reference runs on these, so both sides see the same inputs.
Tensor as(const Tensor& x, DType dt) { return dt == DType::f32 ? x.clone() : cast_cpu(cast_cpu(x, dt), DType::f32); }
// To the GPU in dtype dt (x already representable).
Tensor gpu(const Tensor& x, DType dt) { return (dt == DType::f32 ? x : cast_cpu(x, dt)).to(Device::cuda); }
Tensor gpu(const Tensor& x) { return x.to(Device::cuda); }
// Back to the host as fp32.
Tensor host(const Tensor& x) {
  Tensor h = x.to(Device::cpu);
  return h.dtype() == DType::f32 ? h : cast_cpu(h, DType::f32);
}

struct Tol {
  double rtol, floor;
  double abs = 0;  // an absolute floor, for results that are 0 in exact arithmetic
};
Tol tol(DType dt) { return dt == DType::f32 ? Tol{1e-5, 1e-5} : Tol{1e-2, 1e-2}; }

void expect_close(const Tensor& got_any, const Tensor& want, Tol t, const std::string& what) {
  Tensor got = host(got_any);
  ASSERT_EQ(got.numel(), want.numel()) << what;
  double maxabs = 0;
  for (int64_t i = 0; i < want.numel(); ++i) maxabs = std::max(maxabs, std::abs(want.item(i)));
  int64_t bad = 0, worst = -1;
  double worst_ratio = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double g = got.item(i), w = want.item(i);
    const double lim = t.rtol * std::abs(w) + t.floor * maxabs + t.abs + 1e-30;
    const double ratio = std::abs(g - w) / lim;
    if (!(ratio <= 1.0)) {
      ++bad;
      if (!(ratio <= worst_ratio)) worst_ratio = ratio, worst = i;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.numel() << " entries outside tolerance; worst at " << worst
                    << ": got " << (worst >= 0 ? got.item(worst) : 0.0) << " want " << (worst >= 0 ? want.item(worst) : 0.0)
                    << " (max |want| " << maxabs << ")";
}
void expect_close(const Tensor& got, const Tensor& want, DType dt, const std::string& what) {
  expect_close(got, want, tol(dt), what + " [" + dtype_name(dt) + "]");
}

bool bitwise_equal(const Tensor& a_any, const Tensor& b_any) {
  Tensor a = a_any.to(Device::cpu), b = b_any.to(Device::cpu);
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

const DType kBoth[] = {DType::f32, DType::bf16};

}  // namespace

// ---- device basics ------------------------------------------------------------------------------

TEST(CudaTensor, CopiesRoundTripAndZero) {
  SKIP_WITHOUT_GPU();
  Tensor x = randn({123, 7});
  Tensor d = gpu(x);
  Tensor d2 = d.clone();  // device to device
  EXPECT_TRUE(bitwise_equal(d2, x));
  Tensor r = d2.rows(100, 23);  // a view at an offset
  EXPECT_EQ(r.item(0), x.item(100 * 7));
  d2.zero_();
  Tensor back = d2.to(Device::cpu);
  for (int64_t i = 0; i < back.numel(); ++i) ASSERT_EQ(back.data<float>()[i], 0.0f);
  EXPECT_TRUE(bitwise_equal(d, x));  // the source is untouched
}

TEST(CudaTensor, Fp64OpsFailClearly) {
  SKIP_WITHOUT_GPU();
  Tensor x = Tensor::zeros({8}, DType::f64, Device::cuda);
  try {
    ops::add_(x, x);
    FAIL() << "add_ on an fp64 CUDA tensor did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp64"), std::string::npos) << e.what();
  }
}

#ifdef DECOTRON_WITH_CUDA
TEST(CudaAllocator, ReusesReleasedBlocks) {
  SKIP_WITHOUT_GPU();
  const cuda::AllocatorStats before = cuda::allocator_stats();
  void* first = nullptr;
  {
    Tensor a = Tensor::empty({1000}, DType::f32, Device::cuda);
    first = a.raw();
    EXPECT_EQ(cuda::allocator_stats().bytes_in_use, before.bytes_in_use + 4000);
  }
  const cuda::AllocatorStats after = cuda::allocator_stats();
  EXPECT_EQ(after.bytes_in_use, before.bytes_in_use);
  EXPECT_GE(after.peak_bytes, before.bytes_in_use + 4000);
  if (!after.caching) GTEST_SKIP() << "DECOTRON_CUDA_CACHE=0: caching is off";
  EXPECT_GE(after.cached_bytes, 4000u);
  {
    // 3600 bytes fall in the same size class as 4000: the block comes back without cudaMalloc.
    Tensor b = Tensor::empty({900}, DType::f32, Device::cuda);
    EXPECT_EQ(b.raw(), first);
    EXPECT_EQ(cuda::allocator_stats().device_allocs, after.device_allocs);
    EXPECT_EQ(cuda::allocator_stats().bytes_in_use, before.bytes_in_use + 3600);
  }
  cuda::empty_cache();
  const cuda::AllocatorStats emptied = cuda::allocator_stats();
  EXPECT_EQ(emptied.cached_bytes, 0u);
  EXPECT_GE(emptied.reserved_bytes, emptied.bytes_in_use);
  Tensor c = Tensor::empty({1000}, DType::f32, Device::cuda);  // works again after emptying
  c.zero_();
  EXPECT_EQ(c.item(999), 0.0);
}

// upload_async through more than the whole ring (8 x 256 KiB): every upload, copied on the
// device before the stream is waited for once at the end, holds its own bytes. On a GPU a ring
// that rewrote pinned memory before its copy ran, or a copy that read a rewritten slot, would
// show here as another upload's pattern.
TEST(CudaContext, UploadAsyncSurvivesRingWraps) {
  SKIP_WITHOUT_GPU();
  const int64_t per = 24 * 1024, uploads = 100;  // 96 KiB each, two to a segment: ~6 times round the ring
  Tensor all = Tensor::empty({uploads * per}, DType::i32, Device::cuda);
  cudaStream_t st = cuda::context().stream;
  std::vector<int32_t> v(per);
  for (int64_t u = 0; u < uploads; ++u) {
    for (int64_t i = 0; i < per; ++i) v[i] = static_cast<int32_t>(u * 1000003 + i * 7);
    const void* d = cuda::upload_async(v.data(), per * sizeof(int32_t));
    ASSERT_NE(d, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(d) % 256, 0u);
    std::fill(v.begin(), v.end(), -1);  // the caller's buffer is free on return
    CUDA_CHECK(cudaMemcpyAsync(static_cast<int32_t*>(all.raw()) + u * per, d, per * sizeof(int32_t),
                               cudaMemcpyDeviceToDevice, st));
  }
  Tensor h = all.to(Device::cpu);
  int64_t bad = 0;
  for (int64_t u = 0; u < uploads; ++u)
    for (int64_t i = 0; i < per; ++i) bad += h.data<int32_t>()[u * per + i] != static_cast<int32_t>(u * 1000003 + i * 7);
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(cuda::upload_async(v.data(), cuda::kUploadSegmentBytes + 1), nullptr);  // the caller's Tensor path
  EXPECT_EQ(cuda::upload_async(v.data(), 0), nullptr);
}

TEST(CudaRng, PhiloxNormalMatchesCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 65543;
  const uint64_t seed = 42, stream = rng::stream_of("layers.3.attn.wq");
  Tensor d = Tensor::empty({n}, DType::f32, Device::cuda);
  cuda::fill_normal(d, seed, stream);
  Tensor want = Tensor::empty({n}, DType::f32);
  for (int64_t i = 0; i < n; ++i) want.data<float>()[i] = rng::normal(seed, stream, i);
  Tensor got = d.to(Device::cpu);
  int64_t mismatches = 0, first = -1;
  for (int64_t i = 0; i < n; ++i)
    if (std::memcmp(&got.data<float>()[i], &want.data<float>()[i], 4) != 0) ++mismatches, first = first < 0 ? i : first;
  EXPECT_EQ(mismatches, 0) << "first at " << first << ": gpu " << (first >= 0 ? got.data<float>()[first] : 0.f)
                           << " cpu " << (first >= 0 ? want.data<float>()[first] : 0.f);

  // An offset start continues the same stream; bf16 output is the CPU value rounded once.
  Tensor b = Tensor::empty({1000}, DType::bf16, Device::cuda);
  cuda::fill_normal(b, seed, stream, 0.0f, 1.0f, 500);
  Tensor bh = b.to(Device::cpu);
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(bh.data<bf16>()[i].bits, bf16(want.data<float>()[500 + i]).bits) << i;

  Tensor u = Tensor::empty({4096}, DType::f32, Device::cuda);
  cuda::fill_uniform(u, seed, stream + 1);
  Tensor uh = u.to(Device::cpu);
  for (int64_t i = 0; i < 4096; ++i) ASSERT_EQ(uh.data<float>()[i], rng::uniform(seed, stream + 1, i)) << i;
}

TEST(CudaOps, BadTokenIdsAreReported) {
  SKIP_WITHOUT_GPU();
  Tensor table = randn({10, 4});
  Tensor ids = Tensor::empty({3}, DType::i32);
  ids.data<int32_t>()[0] = 1, ids.data<int32_t>()[1] = 10, ids.data<int32_t>()[2] = -1;
  Tensor y = Tensor::empty({3, 4}, DType::f32, Device::cuda);
  ops::embedding_forward(y, gpu(ids), gpu(table));
  EXPECT_THROW(cuda::check_device_errors(), Error);
  cuda::check_device_errors();  // the flags were cleared

  Tensor logits = gpu(randn({3, 10}));
  EXPECT_THROW(ops::cross_entropy(logits, gpu(ids), 0.0), Error);
}
#endif

// ---- linear --------------------------------------------------------------------------------------

TEST(CudaOps, Linear) {
  SKIP_WITHOUT_GPU();
  struct Mkn {
    int64_t M, K, N;
  };
  for (DType dt : kBoth)
    for (Mkn s : {Mkn{37, 53, 29}, Mkn{64, 128, 96}, Mkn{1, 16, 8}}) {
      const std::string tag = "M" + std::to_string(s.M) + " K" + std::to_string(s.K) + " N" + std::to_string(s.N);
      Tensor x = as(randn({s.M, s.K}), dt), w = as(randn({s.N, s.K}, 0.1), dt), dy = as(randn({s.M, s.N}), dt);
      Tensor y0 = as(randn({s.M, s.N}), dt), dx0 = as(randn({s.M, s.K}), dt), dw0 = as(randn({s.N, s.K}), dt);
      for (bool acc : {false, true}) {
        Tensor y = y0.clone(), yg = gpu(y0, dt);
        ops::linear_forward(y, x, w, acc);
        ops::linear_forward(yg, gpu(x, dt), gpu(w, dt), acc);
        expect_close(yg, y, dt, "linear_forward " + tag + (acc ? " +=" : " ="));

        Tensor dx = dx0.clone(), dw = dw0.clone(), dxg = gpu(dx0, dt), dwg = gpu(dw0, dt);
        ops::linear_backward(&dx, &dw, dy, x, w, acc);
        ops::linear_backward(&dxg, &dwg, gpu(dy, dt), gpu(x, dt), gpu(w, dt), acc);
        expect_close(dxg, dx, dt, "linear_backward dx " + tag);
        expect_close(dwg, dw, dt, "linear_backward dw " + tag);
      }
      if (dt == DType::bf16) {
        // bf16 inputs accumulating into an fp32 weight gradient (bf16 training's main grads).
        Tensor dw = dw0.clone(), dwg = gpu(dw0, DType::f32);
        ops::linear_backward(nullptr, &dw, dy, x, w);
        ops::linear_backward(nullptr, &dwg, gpu(dy, dt), gpu(x, dt), gpu(w, dt));
        expect_close(dwg, dw, Tol{1e-4, 1e-4}, "linear_backward fp32 dw from bf16 " + tag);
      }
    }
}

// ---- elementwise -------------------------------------------------------------------------------

TEST(CudaOps, Elementwise) {
  SKIP_WITHOUT_GPU();
  for (DType dt : kBoth) {
    Tensor a = as(randn({1001}), dt), b = as(randn({1001}), dt), dy = as(randn({1001}), dt);
    Tensor y = a.clone(), yg = gpu(a, dt);
    ops::add_(y, b);
    ops::add_(yg, gpu(b, dt));
    expect_close(yg, y, dt, "add_");
    ops::scale_(y, -0.37);
    ops::scale_(yg, -0.37);
    expect_close(yg, y, dt, "scale_");
    Tensor m = Tensor::empty({1001}, DType::f32), mg = Tensor::empty({1001}, dt, Device::cuda);
    ops::mul_forward(m, a, b);
    ops::mul_forward(mg, gpu(a, dt), gpu(b, dt));
    expect_close(mg, m, dt, "mul_forward");
    Tensor da = Tensor::empty({1001}, DType::f32), db = Tensor::empty({1001}, DType::f32);
    Tensor dag = Tensor::empty({1001}, dt, Device::cuda), dbg = Tensor::empty({1001}, dt, Device::cuda);
    ops::mul_backward(da, db, dy, a, b);
    ops::mul_backward(dag, dbg, gpu(dy, dt), gpu(a, dt), gpu(b, dt));
    expect_close(dag, da, dt, "mul_backward da");
    expect_close(dbg, db, dt, "mul_backward db");
  }
}

TEST(CudaOps, Embedding) {
  SKIP_WITHOUT_GPU();
  const int64_t V = 50, h = 300, T = 97;
  for (DType dt : kBoth) {
    Tensor table = as(randn({V, h}), dt), ids = random_ids(T, 13);  // ids < 13: many repeats
    Tensor y = Tensor::empty({T, h}, DType::f32), yg = Tensor::empty({T, h}, dt, Device::cuda);
    ops::embedding_forward(y, ids, table);
    ops::embedding_forward(yg, gpu(ids), gpu(table, dt));
    expect_close(yg, y, dt, "embedding_forward");

    Tensor dy = as(randn({T, h}), dt), dtab0 = as(randn({V, h}), dt);
    Tensor dtab = dtab0.clone(), dtabg = gpu(dtab0, dt), dtabg2 = gpu(dtab0, dt);
    ops::embedding_backward(dtab, ids, dy);
    ops::embedding_backward(dtabg, gpu(ids), gpu(dy, dt));
    expect_close(dtabg, dtab, dt, "embedding_backward");
    ops::embedding_backward(dtabg2, gpu(ids), gpu(dy, dt));
    EXPECT_TRUE(bitwise_equal(dtabg, dtabg2)) << "embedding_backward is not deterministic";
  }
  // A vocabulary over several prefix-sum blocks (1024 ids each), most rows absent, narrow rows
  // (the pair path scatters [n, 1] scores this way).
  for (int64_t hh : {1, 5}) {
    const int64_t VV = 3000, n = 700;
    Tensor ids = random_ids(n, VV), dy = randn({n, hh}), tab0 = randn({VV, hh});
    Tensor tab = tab0.clone(), tabg = gpu(tab0);
    ops::embedding_backward(tab, ids, dy);
    ops::embedding_backward(tabg, gpu(ids), gpu(dy));
    expect_close(tabg, tab, DType::f32, "embedding_backward V3000 h" + std::to_string(hh));
  }
}

// ---- RMSNorm and RoPE ----------------------------------------------------------------------------

TEST(CudaOps, RmsNorm) {
  SKIP_WITHOUT_GPU();
  for (DType dt : kBoth)
    for (int64_t h : {64, 300, 1000}) {
      const int64_t rows = 7;
      Tensor x = as(randn({rows, h}, 2.0, 0.3), dt), w = as(randn({h}, 0.1, 1.0), dt), dy = as(randn({rows, h}), dt);
      Tensor y = Tensor::empty({rows, h}, DType::f32), rstd = Tensor::empty({rows}, DType::f32);
      Tensor yg = Tensor::empty({rows, h}, dt, Device::cuda), rstdg = Tensor::empty({rows}, DType::f32, Device::cuda);
      ops::rmsnorm_forward(y, rstd, x, w, 1e-5);
      ops::rmsnorm_forward(yg, rstdg, gpu(x, dt), gpu(w, dt), 1e-5);
      const std::string tag = " h" + std::to_string(h);
      expect_close(yg, y, dt, "rmsnorm_forward y" + tag);
      expect_close(rstdg, rstd, dt, "rmsnorm_forward rstd" + tag);

      Tensor dw0 = as(randn({h}), dt);
      Tensor dx = Tensor::empty({rows, h}, DType::f32), dw = dw0.clone();
      Tensor dxg = Tensor::empty({rows, h}, dt, Device::cuda), dwg = gpu(dw0, dt);
      ops::rmsnorm_backward(dx, dw, dy, x, w, rstd);
      ops::rmsnorm_backward(dxg, dwg, gpu(dy, dt), gpu(x, dt), gpu(w, dt), gpu(rstd));
      expect_close(dxg, dx, dt, "rmsnorm_backward dx" + tag);
      expect_close(dwg, dw, dt, "rmsnorm_backward dw" + tag);
    }
}

TEST(CudaOps, Rope) {
  SKIP_WITHOUT_GPU();
  const int64_t B = 2, S = 37, H = 3, D = 16;
  for (DType dt : kBoth) {
    Tensor x = as(randn({B, S, H, D}), dt);
    Tensor y = Tensor::empty({B, S, H, D}, DType::f32), yg = Tensor::empty({B, S, H, D}, dt, Device::cuda);
    ops::rope_forward(y, x, B, S, H, D, 10000.0);
    ops::rope_forward(yg, gpu(x, dt), B, S, H, D, 10000.0);
    expect_close(yg, y, dt, "rope_forward");
    Tensor inplace = gpu(x, dt);
    ops::rope_forward(inplace, inplace, B, S, H, D, 10000.0);
    expect_close(inplace, y, dt, "rope_forward in place");

    Tensor dx = Tensor::empty({B, S, H, D}, DType::f32), dxg = Tensor::empty({B, S, H, D}, dt, Device::cuda);
    ops::rope_backward(dx, x, B, S, H, D, 10000.0);
    ops::rope_backward(dxg, gpu(x, dt), B, S, H, D, 10000.0);
    expect_close(dxg, dx, dt, "rope_backward");
  }
}

// ---- attention (fp32 reference kernel) ----------------------------------------------------------

TEST(CudaOps, Attention) {
  SKIP_WITHOUT_GPU();
  for (ops::AttnShape s : {ops::AttnShape{2, 19, 4, 2, 16}, ops::AttnShape{1, 33, 2, 2, 64}, ops::AttnShape{1, 1, 1, 1, 8},
                           ops::AttnShape{1, 150, 3, 1, 32}}) {
    const std::string tag = "S" + std::to_string(s.seq) + " H" + std::to_string(s.heads) + " G" +
                            std::to_string(s.kv_heads) + " D" + std::to_string(s.head_dim);
    const Shape qs{s.batch, s.seq, s.heads, s.head_dim}, ks{s.batch, s.seq, s.kv_heads, s.head_dim};
    const Shape ls{s.batch, s.heads, s.seq};
    Tensor q = randn(qs), k = randn(ks), v = randn(ks), dout = randn(qs);
    Tensor out = Tensor::empty(qs, DType::f32), lse = Tensor::empty(ls, DType::f32);
    Tensor outg = Tensor::empty(qs, DType::f32, Device::cuda), lseg = Tensor::empty(ls, DType::f32, Device::cuda);
    ops::attention_forward(out, lse, q, k, v, s);
    ops::attention_forward(outg, lseg, gpu(q), gpu(k), gpu(v), s);
    expect_close(outg, out, DType::f32, "attention_forward out " + tag);
    expect_close(lseg, lse, DType::f32, "attention_forward lse " + tag);

    Tensor dq = Tensor::empty(qs, DType::f32), dk = Tensor::empty(ks, DType::f32), dv = Tensor::empty(ks, DType::f32);
    ops::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, s);
    Tensor dqg[2], dkg[2], dvg[2];
    for (int run = 0; run < 2; ++run) {
      // Garbage in the outputs first: the contract is "=", not "+=".
      dqg[run] = gpu(randn(qs)), dkg[run] = gpu(randn(ks)), dvg[run] = gpu(randn(ks));
      ops::attention_backward(dqg[run], dkg[run], dvg[run], gpu(dout), gpu(q), gpu(k), gpu(v), gpu(out), gpu(lse), s);
    }
    // Sums of S products each side, in different orders. With S = 1, dq and dk are exactly 0
    // (out = v, so dout . v = delta) and both sides hold only roundoff (the CPU ~4e-8, the GPU
    // 0 here), which a floor relative to max |want| cannot accept: an absolute 1e-6 (inputs O(1)).
    const Tol t{1e-4, 1e-5, 1e-6};
    expect_close(dqg[0], dq, t, "attention_backward dq " + tag);
    expect_close(dkg[0], dk, t, "attention_backward dk " + tag);
    expect_close(dvg[0], dv, t, "attention_backward dv " + tag);
    EXPECT_TRUE(bitwise_equal(dqg[0], dqg[1]) && bitwise_equal(dkg[0], dkg[1]) && bitwise_equal(dvg[0], dvg[1]))
        << "attention_backward is not deterministic " << tag;
  }
}

// bf16 storage, fp32 arithmetic: against the fp32 reference on the bf16-rounded inputs, with
// the outputs rounded once to bf16 (dout and out too: the backward reads them in bf16).
TEST(CudaOps, AttentionBf16) {
  SKIP_WITHOUT_GPU();
  const DType bf = DType::bf16;
#ifdef DECOTRON_WITH_CUDA
  cuda::set_attention_override(cuda::AttentionPath::flash);  // not cuDNN: the widths here are the reference's
  struct Restore {
    ~Restore() { cuda::set_attention_override(cuda::AttentionPath::none); }
  } restore;
#endif
  for (ops::AttnShape s : {ops::AttnShape{2, 19, 4, 2, 16}, ops::AttnShape{1, 70, 2, 1, 32}}) {
    const std::string tag = "S" + std::to_string(s.seq) + " H" + std::to_string(s.heads);
    const Shape qs{s.batch, s.seq, s.heads, s.head_dim}, ks{s.batch, s.seq, s.kv_heads, s.head_dim};
    const Shape ls{s.batch, s.heads, s.seq};
    Tensor q = as(randn(qs), bf), k = as(randn(ks), bf), v = as(randn(ks), bf), dout = as(randn(qs), bf);
    Tensor out = Tensor::empty(qs, DType::f32), lse = Tensor::empty(ls, DType::f32);
    ops::attention_forward(out, lse, q, k, v, s);
    Tensor outg = Tensor::empty(qs, bf, Device::cuda), lseg = Tensor::empty(ls, DType::f32, Device::cuda);
    ops::attention_forward(outg, lseg, gpu(q, bf), gpu(k, bf), gpu(v, bf), s);
    expect_close(outg, out, bf, "attention_forward out " + tag);
    expect_close(lseg, lse, Tol{1e-5, 1e-5}, "attention_forward lse (fp32 math) " + tag);

    Tensor out_b = as(out, bf);  // the backward's out is the bf16 forward output
    Tensor dq = Tensor::empty(qs, DType::f32), dk = Tensor::empty(ks, DType::f32), dv = Tensor::empty(ks, DType::f32);
    ops::attention_backward(dq, dk, dv, dout, q, k, v, out_b, lse, s);
    Tensor dqg = Tensor::empty(qs, bf, Device::cuda), dkg = Tensor::empty(ks, bf, Device::cuda),
           dvg = Tensor::empty(ks, bf, Device::cuda);
    ops::attention_backward(dqg, dkg, dvg, gpu(dout, bf), gpu(q, bf), gpu(k, bf), gpu(v, bf), gpu(out_b, bf), gpu(lse),
                            s);
    expect_close(dqg, dq, bf, "attention_backward dq " + tag);
    expect_close(dkg, dk, bf, "attention_backward dk " + tag);
    expect_close(dvg, dv, bf, "attention_backward dv " + tag);
#ifdef DECOTRON_WITH_CUDA
    EXPECT_EQ(cuda::last_attention_path(), cuda::AttentionPath::reference) << "head_dim " << s.head_dim;
#endif
  }
}

#ifdef DECOTRON_WITH_CUDA
// A fast bf16 attention path (`path`: the flash kernels or cuDNN) against the CPU fp32 reference
// on the bf16-rounded inputs: the path taken, out and lse, the gradients, bitwise-equal reruns.
static void check_fast_attention(cuda::AttentionPath path, const char* name, std::initializer_list<ops::AttnShape> shapes) {
  const DType bf = DType::bf16;
  cuda::set_attention_override(path);
  struct Restore {
    ~Restore() { cuda::set_attention_override(cuda::AttentionPath::none); }
  } restore;
  for (ops::AttnShape s : shapes) {
    const std::string tag = std::string(name) + " B" + std::to_string(s.batch) + " S" + std::to_string(s.seq) + " H" +
                            std::to_string(s.heads) + " G" + std::to_string(s.kv_heads) + " D" +
                            std::to_string(s.head_dim);
    const Shape qs{s.batch, s.seq, s.heads, s.head_dim}, ks{s.batch, s.seq, s.kv_heads, s.head_dim};
    const Shape ls{s.batch, s.heads, s.seq};
    Tensor q = as(randn(qs), bf), k = as(randn(ks), bf), v = as(randn(ks), bf), dout = as(randn(qs), bf);
    Tensor out = Tensor::empty(qs, DType::f32), lse = Tensor::empty(ls, DType::f32);
    ops::attention_forward(out, lse, q, k, v, s);
    Tensor outg = Tensor::empty(qs, bf, Device::cuda), lseg = Tensor::empty(ls, DType::f32, Device::cuda);
    ops::attention_forward(outg, lseg, gpu(q, bf), gpu(k, bf), gpu(v, bf), s);
    EXPECT_EQ(cuda::last_attention_path(), path) << "forward " << tag << " took another path";
    // out: P is rounded to bf16 before P V (as FlashAttention does) and out once more: the
    // bf16 tolerance. lse: exact scores (bf16 products in fp32) and an fp32 softmax.
    expect_close(outg, out, bf, "forward out " + tag);
    expect_close(lseg, lse, Tol{1e-4, 1e-4}, "forward lse " + tag);

    Tensor out_b = as(out, bf);  // the backward's out is the bf16 forward output
    Tensor dq = Tensor::empty(qs, DType::f32), dk = Tensor::empty(ks, DType::f32), dv = Tensor::empty(ks, DType::f32);
    ops::attention_backward(dq, dk, dv, dout, q, k, v, out_b, lse, s);
    Tensor dqg[2], dkg[2], dvg[2];
    for (int run = 0; run < 2; ++run) {
      // Garbage in the outputs first: the contract is "=", not "+=".
      dqg[run] = gpu(randn(qs), bf), dkg[run] = gpu(randn(ks), bf), dvg[run] = gpu(randn(ks), bf);
      ops::attention_backward(dqg[run], dkg[run], dvg[run], gpu(dout, bf), gpu(q, bf), gpu(k, bf), gpu(v, bf),
                              gpu(out_b, bf), gpu(lse), s);
      EXPECT_EQ(cuda::last_attention_path(), path) << "backward " << tag << " took another path";
    }
    // Twice the bf16 relative tolerance: besides the output rounding, P and dS are rounded to
    // bf16 before the tensor-core products (2^-9 relative each, as FlashAttention does), and
    // dQ, dK sum up to S such terms of both signs, so entries that mostly cancel carry more
    // relative error; the floor (1e-2 of the largest entry) covers those.
    const Tol t{2e-2, 1e-2};
    expect_close(dqg[0], dq, t, "backward dq " + tag);
    expect_close(dkg[0], dk, t, "backward dk " + tag);
    expect_close(dvg[0], dv, t, "backward dv " + tag);
    EXPECT_TRUE(bitwise_equal(dqg[0], dqg[1]) && bitwise_equal(dkg[0], dkg[1]) && bitwise_equal(dvg[0], dvg[1]))
        << "attention backward is not deterministic " << tag;
  }
}

// Tails (S not a multiple of the 64 tile: 19, 130, 257), one tile exactly (64), grouped heads
// (H/G = 1, 2, 3), batch 2.
TEST(CudaOps, FlashAttention) {
  SKIP_WITHOUT_GPU();
  if (const char* e = std::getenv("DECOTRON_ATTENTION"); e && std::string(e) == "reference")
    GTEST_SKIP() << "DECOTRON_ATTENTION=reference";
  check_fast_attention(cuda::AttentionPath::flash, "flash",
                       {ops::AttnShape{2, 19, 4, 2, 64}, ops::AttnShape{1, 64, 2, 2, 128},
                        ops::AttnShape{1, 130, 6, 3, 128}, ops::AttnShape{1, 257, 2, 1, 64}});
}

// cuDNN's fused SDPA (builds that found cuDNN and cudnn-frontend): the same checks; its backward
// is built deterministic, so two runs match.
TEST(CudaOps, CudnnAttention) {
  SKIP_WITHOUT_GPU();
  if (!cuda::cudnn_attention_built()) GTEST_SKIP() << "this build has no cuDNN attention";
  check_fast_attention(cuda::AttentionPath::cudnn, "cudnn",
                       {ops::AttnShape{2, 64, 4, 2, 64}, ops::AttnShape{1, 128, 2, 2, 128},
                        ops::AttnShape{1, 130, 6, 3, 128}, ops::AttnShape{2, 19, 4, 4, 64}});
}
#endif

// ---- convert -----------------------------------------------------------------------------------

TEST(CudaOps, Convert) {
  SKIP_WITHOUT_GPU();
  Tensor x = randn({1000}, 3.0);
  // fp32 -> bf16 rounds to nearest even exactly as the CPU (bit for bit); bf16 -> fp32 is exact.
  Tensor want = Tensor::empty({1000}, DType::bf16);
  ops::convert(want, x);
  Tensor got = Tensor::empty({1000}, DType::bf16, Device::cuda);
  ops::convert(got, gpu(x));
  EXPECT_TRUE(bitwise_equal(got, want)) << "fp32 -> bf16";
  Tensor back = Tensor::empty({1000}, DType::f32, Device::cuda);
  ops::convert(back, got);
  EXPECT_TRUE(bitwise_equal(back, cast_cpu(want, DType::f32))) << "bf16 -> fp32";
  Tensor same = Tensor::empty({1000}, DType::f32, Device::cuda);
  ops::convert(same, gpu(x));
  EXPECT_TRUE(bitwise_equal(same, x)) << "fp32 -> fp32";
}

// ---- SwiGLU ----------------------------------------------------------------------------------

TEST(CudaOps, SwiGlu) {
  SKIP_WITHOUT_GPU();
  for (DType dt : kBoth) {
    Tensor g = as(randn({3, 333}, 2.0), dt), u = as(randn({3, 333}), dt), dh = as(randn({3, 333}), dt);
    Tensor h = Tensor::empty({3, 333}, DType::f32), hg = Tensor::empty({3, 333}, dt, Device::cuda);
    ops::swiglu_forward(h, g, u);
    ops::swiglu_forward(hg, gpu(g, dt), gpu(u, dt));
    expect_close(hg, h, dt, "swiglu_forward");
    Tensor dg = Tensor::empty({3, 333}, DType::f32), du = Tensor::empty({3, 333}, DType::f32);
    Tensor dgg = Tensor::empty({3, 333}, dt, Device::cuda), dug = Tensor::empty({3, 333}, dt, Device::cuda);
    ops::swiglu_backward(dg, du, dh, g, u);
    ops::swiglu_backward(dgg, dug, gpu(dh, dt), gpu(g, dt), gpu(u, dt));
    expect_close(dgg, dg, dt, "swiglu_backward dgate");
    expect_close(dug, du, dt, "swiglu_backward dup");
  }
}

// ---- DECO ops ---------------------------------------------------------------------------------

TEST(CudaOps, NormSilu) {
  SKIP_WITHOUT_GPU();
  struct Ed {
    int64_t E, d;
  };
  const ops::NormSiluMode modes[] = {ops::NormSiluMode::full, ops::NormSiluMode::no_mean, ops::NormSiluMode::no_rms,
                                     ops::NormSiluMode::silu};
  const char* names[] = {"full", "no_mean", "no_rms", "silu"};
  for (DType dt : kBoth)
    for (Ed s : {Ed{3, 64}, Ed{7, 16}, Ed{42, 64}})
      for (int mi = 0; mi < 4; ++mi) {
        const ops::NormSiluMode mode = modes[mi];
        const int64_t T = 5, n = s.E * s.d;
        const std::string tag = std::string(names[mi]) + " E" + std::to_string(s.E) + " d" + std::to_string(s.d);
        Tensor u = as(randn({T, n}, 1.5, 0.4), dt), gamma = as(randn({s.d}, 0.2, 1.0), dt), dz = as(randn({T, n}), dt);
        Tensor z = Tensor::empty({T, n}, DType::f32), st = Tensor::empty({T, 1 + s.E}, DType::f32);
        Tensor zg = Tensor::empty({T, n}, dt, Device::cuda), stg = Tensor::empty({T, 1 + s.E}, DType::f32, Device::cuda);
        ops::normsilu_forward(z, st, u, gamma, s.E, mode, 1e-5);
        ops::normsilu_forward(zg, stg, gpu(u, dt), gpu(gamma, dt), s.E, mode, 1e-5);
        expect_close(zg, z, dt, "normsilu_forward z " + tag);
        expect_close(stg, st, dt, "normsilu_forward stats " + tag);

        Tensor dg0 = as(randn({s.d}), dt);
        Tensor du = Tensor::empty({T, n}, DType::f32), dgamma = dg0.clone();
        Tensor dug = Tensor::empty({T, n}, dt, Device::cuda), dgammag = gpu(dg0, dt);
        ops::normsilu_backward(du, dgamma, dz, u, gamma, st, s.E, mode, 1e-5);
        ops::normsilu_backward(dug, dgammag, gpu(dz, dt), gpu(u, dt), gpu(gamma, dt), gpu(st), s.E, mode, 1e-5);
        expect_close(dug, du, dt, "normsilu_backward du " + tag);
        expect_close(dgammag, dgamma, dt, "normsilu_backward dgamma " + tag);
      }
}

TEST(CudaOps, RouterScale) {
  SKIP_WITHOUT_GPU();
  const int64_t T = 33, E = 7;
  for (int64_t gn : {E, int64_t{1}})
    for (int variant = 0; variant < 3; ++variant) {  // 0: dg and da_extra, 1: dg only, 2: neither
      const std::string tag = "g[" + std::to_string(gn) + "] variant " + std::to_string(variant);
      Tensor r = randn({T, E}), g = randn({gn}, 0.05, 0.1), ds = randn({T, E}), extra = randn({T, E});
      Tensor s = Tensor::empty({T, E}, DType::f32), sg = Tensor::empty({T, E}, DType::f32, Device::cuda);
      ops::router_scale_forward(s, r, g);
      ops::router_scale_forward(sg, gpu(r), gpu(g));
      expect_close(sg, s, DType::f32, "router_scale_forward " + tag);

      Tensor dg0 = randn({gn});
      Tensor dr = Tensor::empty({T, E}, DType::f32), dg = dg0.clone();
      Tensor drg = Tensor::empty({T, E}, DType::f32, Device::cuda), dgg = gpu(dg0), extrag = gpu(extra);
      ops::router_scale_backward(dr, variant < 2 ? &dg : nullptr, ds, r, g, variant == 0 ? &extra : nullptr);
      ops::router_scale_backward(drg, variant < 2 ? &dgg : nullptr, gpu(ds), gpu(r), gpu(g),
                                 variant == 0 ? &extrag : nullptr);
      expect_close(drg, dr, DType::f32, "router_scale_backward dr " + tag);
      expect_close(dgg, dg, DType::f32, "router_scale_backward dg " + tag);
    }
}

TEST(CudaOps, ActivityCountsAndRegularizers) {
  SKIP_WITHOUT_GPU();
  const int64_t T = 257, E = 42;
  Tensor r = randn({T, E}, 1.0, -0.8), rg = gpu(r);
  EXPECT_EQ(ops::count_active(rg), ops::count_active(r));
  EXPECT_EQ(ops::count_tokens_with_active(rg), ops::count_tokens_with_active(r));
  std::vector<int64_t> c(E), cg(E);
  ops::count_active_per_expert(r, c.data());
  ops::count_active_per_expert(rg, cg.data());
  EXPECT_EQ(cg, c);

  const double h = ops::entropy_forward(r), hg = ops::entropy_forward(rg);
  EXPECT_NEAR(hg, h, 1e-9 * std::abs(h));
  EXPECT_EQ(ops::entropy_forward(rg), hg) << "entropy_forward is not deterministic";
  Tensor da0 = randn({T, E});
  Tensor da = da0.clone(), dag = gpu(da0);
  ops::entropy_backward(da, r, 0.3);
  ops::entropy_backward(dag, rg, 0.3);
  expect_close(dag, da, DType::f32, "entropy_backward");

  const double l1 = ops::l1_reg_forward(r, 0.2), l1g = ops::l1_reg_forward(rg, 0.2);
  EXPECT_NEAR(l1g, l1, 1e-9 * std::abs(l1));
  Tensor da1 = da0.clone(), da1g = gpu(da0);
  ops::l1_reg_backward(da1, r, 0.2, 0.7);
  ops::l1_reg_backward(da1g, rg, 0.2, 0.7);
  expect_close(da1g, da1, DType::f32, "l1_reg_backward");

  // routing_summary: the same reductions as the host-returning ops, so the same bits.
  Tensor sg = Tensor::empty({2 * E + 2}, DType::f64, Device::cuda);
  ops::routing_summary(sg, rg);
  Tensor s = sg.to(Device::cpu);
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(s.data<double>()[e], static_cast<double>(cg[e])) << e;
  EXPECT_EQ(s.data<double>()[2 * E], static_cast<double>(ops::count_tokens_with_active(rg)));
  EXPECT_EQ(s.data<double>()[2 * E + 1], hg);
  double total = 0;
  for (int64_t e = 0; e < E; ++e) total += s.data<double>()[E + e] * s.data<double>()[e];
  EXPECT_EQ(total / (0.2 * T * T), l1g);
}

TEST(CudaOps, ExpertScale) {
  SKIP_WITHOUT_GPU();
  const int64_t T = 6, E = 5, d = 64, n = E * d;
  for (DType dt : kBoth) {
    Tensor z = as(randn({T, n}), dt), s = randn({T, E}), dy = as(randn({T, n}), dt);  // s fp32 (router side)
    Tensor y = Tensor::empty({T, n}, DType::f32), yg = Tensor::empty({T, n}, dt, Device::cuda);
    ops::expert_scale_forward(y, z, s, E);
    ops::expert_scale_forward(yg, gpu(z, dt), gpu(s), E);
    expect_close(yg, y, dt, "expert_scale_forward");
    Tensor dz = Tensor::empty({T, n}, DType::f32), ds = Tensor::empty({T, E}, DType::f32);
    Tensor dzg = Tensor::empty({T, n}, dt, Device::cuda), dsg = Tensor::empty({T, E}, DType::f32, Device::cuda);
    ops::expert_scale_backward(dz, ds, dy, z, s, E);
    ops::expert_scale_backward(dzg, dsg, gpu(dy, dt), gpu(z, dt), gpu(s), E);
    expect_close(dzg, dz, dt, "expert_scale_backward dz");
    // ds is fp32 either way; from bf16 inputs it sums exact products in fp32.
    expect_close(dsg, ds, DType::f32, std::string("expert_scale_backward ds from ") + dtype_name(dt));
  }
}

// ---- cross-entropy -------------------------------------------------------------------------------

TEST(CudaOps, CrossEntropy) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 13, V = 1000;
  for (DType dt : kBoth)
    for (double grad_scale : {0.0, 1.0 / 13}) {
      Tensor logits = as(randn({rows, V}, 3.0), dt), tg = random_ids(rows, V);
      Tensor lg = gpu(logits, dt);
      Tensor ref = logits.clone();
      const double loss = ops::cross_entropy(ref, tg, grad_scale);
      const double lossg = ops::cross_entropy(lg, gpu(tg), grad_scale);
      EXPECT_NEAR(lossg, loss, 1e-5 * std::abs(loss)) << dtype_name(dt);
      expect_close(lg, ref, dt, "cross_entropy gradient (grad_scale " + std::to_string(grad_scale) + ")");
    }
}

// The vocabulary-parallel halves on one rank's columns (ids 500..999 of 1000): the fp64 stats
// (log-sum-exp and the target's logit, from an fp32 sum on the GPU) and the in-place gradient.
TEST(CudaOps, VocabParallelCrossEntropyPieces) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 13, V_l = 500, start = 500;
  for (DType dt : kBoth) {
    Tensor logits = as(randn({rows, V_l}, 3.0), dt), tg = random_ids(rows, 2 * V_l);
    Tensor stats = Tensor::empty({2, rows}, DType::f64);
    Tensor statsg = Tensor::empty({2, rows}, DType::f64, Device::cuda);
    ops::vocab_parallel_ce_forward(stats, logits, tg, start);
    ops::vocab_parallel_ce_forward(statsg, gpu(logits, dt), gpu(tg), start);
    expect_close(statsg, stats, tol(DType::f32), std::string("vocab_parallel_ce_forward stats ") + dtype_name(dt));
    Tensor lse = stats.rows(0, 1).view({rows});  // any log-sum-exp will do for the backward
    Tensor ref = logits.clone(), lg = gpu(logits, dt);
    ops::vocab_parallel_ce_backward(ref, tg, lse, start, 1.0 / rows);
    ops::vocab_parallel_ce_backward(lg, gpu(tg), gpu(lse), start, 1.0 / rows);
    expect_close(lg, ref, dt, "vocab_parallel_ce_backward");
  }
}

// ---- optimizer and reductions ------------------------------------------------------------------

TEST(CudaOps, AdamW) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 1003;
  Tensor p = randn({n}), m = Tensor::zeros({n}, DType::f32), v = Tensor::zeros({n}, DType::f32);
  Tensor pg = gpu(p), mg = gpu(m), vg = gpu(v);
  for (int64_t step = 1; step <= 3; ++step) {
    const ops::AdamWStep s{1e-3, 0.9, 0.95, 1e-8, 0.1, step};
    Tensor g = randn({n}, 0.01);
    ops::adamw_update(p, m, v, g, s, 0.5);
    ops::adamw_update(pg, mg, vg, gpu(g), s, 0.5);
    expect_close(pg, p, DType::f32, "adamw param step " + std::to_string(step));
    expect_close(mg, m, DType::f32, "adamw m step " + std::to_string(step));
    expect_close(vg, v, DType::f32, "adamw v step " + std::to_string(step));
  }
}

TEST(CudaOps, SumSquaresAndNonFinite) {
  SKIP_WITHOUT_GPU();
  for (DType dt : kBoth) {
    Tensor x = as(randn({30011}), dt);  // 118 blocks of partial sums
    Tensor xg = gpu(x, dt);
    const double want = ops::sum_squares(x), got = ops::sum_squares(xg);
    EXPECT_NEAR(got, want, 1e-12 * want) << dtype_name(dt);
    EXPECT_EQ(ops::sum_squares(xg), got) << "sum_squares is not deterministic";
    EXPECT_FALSE(ops::has_nonfinite(xg));
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      Tensor y = x.clone();
      y.data<float>()[12345] = bad;
      EXPECT_TRUE(ops::has_nonfinite(gpu(y, dt))) << dtype_name(dt) << " " << bad;
    }
  }
}

// kernels/multi_tensor.h on the device against the single-tensor ops: sizes below, at and above
// a chunk (16384), an empty tensor, views into one shared buffer (as the distributed
// optimizer's shards are), decay on and off.
TEST(CudaOps, MultiTensorAdamWAndSquares) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> sizes = {1003, 16384, 0, 40000, 7, 16385};
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  Tensor buf = randn({total});  // the parameters: views of one buffer
  Tensor bufg = gpu(buf);
  std::vector<Tensor> p, m, v, pg, mg, vg, g, gg;
  std::vector<ops::AdamWTensor> list;
  int64_t at = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t n = sizes[i];
    p.push_back(buf.rows(at, n));
    pg.push_back(bufg.rows(at, n));
    at += n;
    m.push_back(Tensor::zeros({n}, DType::f32)), v.push_back(Tensor::zeros({n}, DType::f32));
    mg.push_back(gpu(m.back())), vg.push_back(gpu(v.back()));
    g.push_back(randn({n}, 0.01)), gg.push_back(gpu(g.back()));
    list.push_back(ops::AdamWTensor{pg.back(), mg.back(), vg.back(), gg.back(), i % 2 == 0});
  }
  ops::MultiTensorAdamW adamw(list);
  ops::MultiTensorSquares squares(gg);
  for (int64_t step = 1; step <= 3; ++step) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      Tensor fresh = randn({sizes[i]}, 0.01);
      g[i].copy_from(fresh);
      gg[i].copy_from(fresh);  // the views the lists hold see the new gradient
    }
    const std::vector<double> sq = squares.compute();
    ASSERT_EQ(sq.size(), sizes.size());
    for (size_t i = 0; i < sizes.size(); ++i) {
      const double want = ops::sum_squares(g[i]);
      EXPECT_NEAR(sq[i], want, 1e-12 * want) << "tensor " << i << " of " << sizes[i];
    }
    EXPECT_EQ(squares.compute(), sq) << "multi-tensor squares are not deterministic";
    const ops::AdamWStep s{1e-3, 0.9, 0.95, 1e-8, 0.1, step};
    for (size_t i = 0; i < sizes.size(); ++i) {
      ops::AdamWStep si = s;
      if (i % 2 != 0) si.weight_decay = 0.0;
      ops::adamw_update(p[i], m[i], v[i], g[i], si, 0.5);
    }
    adamw.update(s, 0.5);
    // The same per-element arithmetic as the single-tensor kernel, which matches the CPU's to
    // the last bit or so (device sqrt): compare with the CPU at fp32 bounds...
    for (size_t i = 0; i < sizes.size(); ++i) {
      const std::string what = " tensor " + std::to_string(i) + " step " + std::to_string(step);
      expect_close(pg[i], p[i], DType::f32, "multi-tensor adamw param" + what);
      expect_close(mg[i], m[i], DType::f32, "multi-tensor adamw m" + what);
      expect_close(vg[i], v[i], DType::f32, "multi-tensor adamw v" + what);
    }
  }
  // ... and with the single-tensor CUDA kernel bit for bit.
  Tensor q = gpu(buf), qm = Tensor::zeros({total}, DType::f32).to(Device::cuda),
         qv = Tensor::zeros({total}, DType::f32).to(Device::cuda), qg = gpu(randn({total}, 0.01));
  Tensor q2 = gpu(buf), qm2 = qm.clone(), qv2 = qv.clone();
  ops::MultiTensorAdamW one({ops::AdamWTensor{q2, qm2, qv2, qg, true}});
  const ops::AdamWStep s{1e-3, 0.9, 0.95, 1e-8, 0.1, 1};
  ops::adamw_update(q, qm, qv, qg, s, 0.7);
  one.update(s, 0.7);
  EXPECT_EQ(std::memcmp(q.to(Device::cpu).raw(), q2.to(Device::cpu).raw(), total * 4), 0)
      << "multi-tensor AdamW differs from adamw_update";
  EXPECT_EQ(std::memcmp(qv.to(Device::cpu).raw(), qv2.to(Device::cpu).raw(), total * 4), 0);
}

// ---- DECO routed experts on (token, expert) pairs ------------------------------------------------
// The sparse expert path's CUDA kernels (kernels/cuda/grouped_experts.cu) against the CPU
// reference (kernels/cpu/grouped_experts.cpp), and, composed as model/ffn.cpp composes them,
// against the dense-masked path on the GPU.

TEST(CudaOps, RoutePairs) {
  SKIP_WITHOUT_GPU();
  const int64_t E = 7;
  struct Range {
    int64_t begin, end;
    bool all;
  };
  for (int64_t T : {37, 600, 0})  // the CUDA kernel takes tokens in chunks of 256
    for (Range g : {Range{0, E, false}, Range{2, 5, false}, Range{4, 4, false}, Range{1, 6, true}, Range{3, 4, false}}) {
      Tensor r = randn({T, E}, 1.0, -0.6);
      for (int64_t t = 0; t < T; ++t) r.data<float>()[t * E + 3] = -1.0f;  // expert 3 never active
      const std::string tag = "T " + std::to_string(T) + " experts [" + std::to_string(g.begin) + ", " +
                              std::to_string(g.end) + ")" + (g.all ? " all pairs" : "");
      ops::RoutedPairs want, got;
      ops::route_pairs(want, r, g.begin, g.end, g.all);
      ops::route_pairs(got, gpu(r), g.begin, g.end, g.all);
      EXPECT_EQ(got.offsets, want.offsets) << tag;
      EXPECT_EQ(got.tokens.device(), Device::cuda);
      EXPECT_TRUE(bitwise_equal(got.tokens, want.tokens)) << tag;
      EXPECT_TRUE(bitwise_equal(got.slots, want.slots)) << tag;
      EXPECT_EQ(got.slot_pair.shape(), want.slot_pair.shape()) << tag;
      EXPECT_TRUE(bitwise_equal(got.slot_pair, want.slot_pair)) << tag;  // [3, 4): no pair, every entry -1
    }
}

// The token-side ops of the pair path (kernels/cuda/pair_combine.cu) on routes from route_pairs:
// more local experts than a warp's 32 (the slot loop), widths across the 256-column passes,
// tokens without pairs; against the CPU, and combine_pairs against the scatter-add it replaces
// (embedding_backward on the pairs' tokens) bit for bit: same summation order.
TEST(CudaOps, PairCombineOps) {
  SKIP_WITHOUT_GPU();
  struct Case {
    int64_t T, E, e_begin, e_end, c;
  };
  for (Case k : {Case{37, 7, 0, 7, 48}, Case{300, 45, 0, 45, 300}, Case{70, 9, 2, 8, 1}, Case{5, 40, 3, 39, 513}})
    for (DType dt : kBoth) {
      const std::string tag = "T " + std::to_string(k.T) + " E " + std::to_string(k.E) + " [" +
                              std::to_string(k.e_begin) + ", " + std::to_string(k.e_end) + ") c " +
                              std::to_string(k.c) + " " + dtype_name(dt);
      Tensor r = randn({k.T, k.E}, 1.0, -0.8);
      for (int64_t e = 0; e < k.E; ++e) r.data<float>()[e] = -1.0f;  // token 0 has no pair
      ops::RoutedPairs rp, rpg;
      ops::route_pairs(rp, r, k.e_begin, k.e_end, false);
      ops::route_pairs(rpg, gpu(r), k.e_begin, k.e_end, false);
      const int64_t P = rp.tokens.numel();
      ASSERT_GT(P, 0) << tag;
      Tensor rows = as(randn({P, k.c}), dt), rowsg = gpu(rows, dt);
      Tensor out = Tensor::empty({k.T, k.c}, DType::f32), outg = gpu(randn({k.T, k.c}), dt);
      ops::combine_pairs(out, rp.slot_pair, rows);
      ops::combine_pairs(outg, rpg.slot_pair, rowsg);
      expect_close(outg, out, dt, "combine_pairs " + tag);
      Tensor scattered = Tensor::zeros({k.T, k.c}, dt, Device::cuda);
      ops::embedding_backward(scattered, rpg.tokens, rowsg);
      EXPECT_TRUE(bitwise_equal(outg, scattered)) << "combine_pairs vs embedding_backward's scatter-add " << tag;

      Tensor v = randn({P}), slots = Tensor::empty({k.T, k.E}, DType::f32), slotsg = gpu(randn({k.T, k.E}));
      ops::pairs_to_slots(slots, rp.slot_pair, v, k.e_begin);
      ops::pairs_to_slots(slotsg, rpg.slot_pair, gpu(v), k.e_begin);
      EXPECT_TRUE(bitwise_equal(slotsg, slots)) << "pairs_to_slots " << tag;  // a copy: exact

      Tensor a = randn({k.T}), row = as(randn({k.c}), dt), x = as(randn({k.T, k.c}), dt);
      Tensor y = x.clone(), yg = gpu(x, dt);
      ops::add_outer_(y, a, row, -0.7);
      ops::add_outer_(yg, gpu(a), gpu(row, dt), -0.7);
      expect_close(yg, y, dt, "add_outer_ " + tag);
      for (DType odt : kBoth) {
        if (dt == DType::f32 && odt == DType::bf16) continue;
        Tensor acc0 = as(randn({k.c}), odt), acc = acc0.clone();
        Tensor accg = gpu(acc0, odt);
        ops::weighted_col_sum_(acc, a, x);
        ops::weighted_col_sum_(accg, gpu(a), gpu(x, dt));
        expect_close(accg, acc, odt, "weighted_col_sum_ " + tag + " into " + dtype_name(odt));
      }
    }
}

// A slot entry outside [-1, P) is reported, not read: check_device_errors throws, names the op.
TEST(CudaOps, PairCombineRejectsBadSlots) {
  SKIP_WITHOUT_GPU();
  Tensor sp = Tensor::empty({2, 3}, DType::i32);
  const int32_t bad[] = {0, -1, 1, 7, -1, -5};
  std::copy(bad, bad + 6, sp.data<int32_t>());
  Tensor out = Tensor::empty({2, 4}, DType::f32, Device::cuda), rows = gpu(randn({2, 4}));
  ops::combine_pairs(out, gpu(sp), rows);
  try {
    cuda::check_device_errors();
    ADD_FAILURE() << "a bad pair index went unreported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("combine_pairs"), std::string::npos) << e.what();
  }
  Tensor slots = Tensor::empty({2, 3}, DType::f32, Device::cuda);
  ops::pairs_to_slots(slots, gpu(sp), gpu(randn({2})), 0);
  EXPECT_THROW(cuda::check_device_errors(), Error);
  cuda::check_device_errors();  // cleared
}

TEST(CudaOps, SumRowsAddRows) {
  SKIP_WITHOUT_GPU();
  for (DType dt : kBoth) {
    Tensor x = as(randn({37, 53}), dt), row = as(randn({53}), dt);
    Tensor s = Tensor::empty({53}, DType::f32), sg = Tensor::empty({53}, dt, Device::cuda);
    ops::sum_rows(s, x);
    ops::sum_rows(sg, gpu(x, dt));
    expect_close(sg, s, dt, "sum_rows");
    Tensor y = x.clone(), yg = gpu(x, dt);
    ops::add_rows_(y, row, -0.3);
    ops::add_rows_(yg, gpu(row, dt), -0.3);
    expect_close(yg, y, dt, "add_rows_");
  }
}

namespace {

const ops::NormSiluMode kModes[] = {ops::NormSiluMode::full, ops::NormSiluMode::no_mean, ops::NormSiluMode::no_rms,
                                    ops::NormSiluMode::silu};
const char* kModeNames[] = {"full", "no_mean", "no_rms", "silu"};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(1, 0);
  for (int64_t c : counts) off.push_back(off.back() + c);
  return off;
}

// One grouped-experts case: CPU reference in fp32 on the dtype's values, CUDA in dtype dt; the
// weight gradients (and gx, dgamma) in gdt: dt, or fp32 master gradients under bf16 (the
// trainer's mixed precision, where the cuBLAS path rounds each call's product to bf16 once and
// the fused gathers add fp32 sums). The pairs read rows of R = rows_per_pair x P source rows
// through a random index (repeats: a token's several experts), as the layer's x and dy; under
// bf16 the fused-gather GEMMs (gathered_gemm.cu) run unless `fused` is false (the copy + cuBLAS
// path). Outputs ("=") start as garbage on the GPU; accumulators ("+=") start equal on both
// sides. Returns the GPU's gradients for a determinism check.
std::vector<Tensor> check_grouped(const std::vector<int64_t>& counts, int64_t h, int64_t d, ops::NormSiluMode mode,
                                  bool gated, DType dt, const std::string& tag, DType gdt = DType::f32,
                                  bool fused = true) {
  if (dt == DType::f32) gdt = DType::f32;
  cuda::set_fused_expert_gather(fused);
  const std::vector<int64_t> off = offsets_of(counts);
  const int64_t El = static_cast<int64_t>(counts.size()), P = off.back();
  const int64_t R = std::max<int64_t>(1, (P + 2) / 3);
  const double eps = 1e-5;
  const double ws = 1.0 / std::sqrt(static_cast<double>(h));
  Tensor x_rows = as(randn({R, h}, 1.0, 0.1), dt), sp = randn({P}, 0.5, 0.3), w_bar = as(randn({h}, 0.1, 0.02), dt);
  Tensor index = Tensor::empty({P}, DType::i32);
  {
    Tensor u = randn({P});
    for (int64_t p = 0; p < P; ++p)
      index.data<int32_t>()[p] =
          static_cast<int32_t>(std::min<int64_t>(R - 1, static_cast<int64_t>(std::fabs(u.data<float>()[p]) * R) % R));
  }
  Tensor w_pre = as(randn({El * d, h}, ws, 0.05), dt), w_up = as(randn({El * d, h}, ws), dt);
  Tensor gamma = as(randn({d}, 0.2, 1.0), dt), w_down = as(randn({h, El * d}, 0.1), dt);
  Tensor dout_rows = as(randn({R, h}), dt);
  const Tensor* wu = gated ? &w_up : nullptr;

  // mu_p = x_p . w_bar (the layer's, one per token), fp32 on both sides.
  const bool mean = mode == ops::NormSiluMode::full || mode == ops::NormSiluMode::no_rms;
  Tensor mu = Tensor::empty({P}, DType::f32);
  for (int64_t p = 0; p < P; ++p) {
    const float* xr = x_rows.data<float>() + index.data<int32_t>()[p] * h;
    double acc = 0;
    for (int64_t k = 0; k < h; ++k) acc += static_cast<double>(xr[k]) * w_bar.data<float>()[k];
    mu.data<float>()[p] = static_cast<float>(acc);
  }
  Tensor outp = Tensor::empty({P, h}, DType::f32);
  ops::GroupedExperts cache;
  ops::grouped_experts_forward(outp, cache, x_rows, index, off, sp, mean ? &mu : nullptr, w_pre, wu, gamma, w_down,
                               mode, eps);
  Tensor outg = gpu(randn({P, h}), dt);
  ops::GroupedExperts cg;
  Tensor w_upg = gpu(w_up, dt);
  const Tensor* wug = gated ? &w_upg : nullptr;
  const Tensor xg = gpu(x_rows, dt), ig = index.to(Device::cuda), spg = gpu(sp), mug = gpu(mu), w_preg = gpu(w_pre, dt);
  const Tensor gammag = gpu(gamma, dt), w_downg = gpu(w_down, dt);
  ops::grouped_experts_forward(outg, cg, xg, ig, off, spg, mean ? &mug : nullptr, w_preg, wug, gammag, w_downg, mode,
                               eps);
  expect_close(outg, outp, dt, "grouped_experts_forward outp " + tag);
  expect_close(cg.pre, cache.pre, dt, "grouped_experts_forward pre " + tag);
  expect_close(cg.y, cache.y, dt, "grouped_experts_forward y " + tag);
  expect_close(cg.mu, cache.mu, dt, "grouped_experts_forward mu " + tag);  // given, or 0 without the mean step
  expect_close(cg.rs, cache.rs, dt, "grouped_experts_forward rs " + tag);
  if (gated) expect_close(cg.up, cache.up, dt, "grouped_experts_forward up " + tag);

  Tensor dwp0 = as(randn({El * d, h}), gdt), dwu0 = as(randn({El * d, h}), gdt);
  Tensor dg0 = as(randn({d}), gdt), dwd0 = as(randn({h, El * d}), gdt);
  Tensor dxp = Tensor::empty({P, h}, DType::f32), dsp = Tensor::empty({P}, DType::f32);
  Tensor gm = Tensor::empty({P}, DType::f32);
  Tensor dwp = dwp0.clone(), dwu = dwu0.clone(), dg = dg0.clone(), dwd = dwd0.clone();
  ops::grouped_experts_backward(dxp, dsp, gm, dwp, gated ? &dwu : nullptr, dg, dwd, dout_rows, cache, x_rows, index, off,
                                sp, w_pre, wu, gamma, w_down, mode, eps);
  Tensor dxpg = gpu(randn({P, h}), dt), dspg = gpu(randn({P})), gmg = gpu(randn({P}));
  Tensor dwpg = gpu(dwp0, gdt), dwug = gpu(dwu0, gdt), dgg = gpu(dg0, gdt), dwdg = gpu(dwd0, gdt);
  ops::grouped_experts_backward(dxpg, dspg, gmg, dwpg, gated ? &dwug : nullptr, dgg, dwdg, gpu(dout_rows, dt), cg, xg, ig,
                                off, spg, w_preg, wug, gammag, w_downg, mode, eps);
  cuda::set_fused_expert_gather(true);
  expect_close(dxpg, dxp, dt, "grouped_experts_backward dxp " + tag);
  // dsp sums d products of dY (bf16 under bf16 where the grouped GEMM computes it) with z.
  expect_close(dspg, dsp, dt, "grouped_experts_backward dsp " + tag);
  // g_p, 0 without the mean step (the garbage the GPU's buffer held is overwritten).
  expect_close(gmg, gm, dt, "grouped_experts_backward gmean " + tag);
  expect_close(dwpg, dwp, dt, "grouped_experts_backward dw_pre " + tag);
  if (gated) expect_close(dwug, dwu, dt, "grouped_experts_backward dw_up " + tag);
  expect_close(dgg, dg, dt, "grouped_experts_backward dgamma " + tag);
  expect_close(dwdg, dwd, dt, "grouped_experts_backward dw_down " + tag);
  return {dxpg, dspg, gmg, dwpg, dwug, dgg, dwdg};
}

}  // namespace

TEST(CudaOps, GroupedExperts) {
  SKIP_WITHOUT_GPU();
  struct Case {
    std::vector<int64_t> counts;
    int64_t h, d;
  };
  // Several local expert counts, experts without pairs (first, middle, last), one expert, d
  // below a warp, and a case with more pairs than one backward block takes (64).
  // Under the fused gathers: tiles of 64 pairs (70, 90: a partial second tile), h not a multiple
  // of the 32-column step (40, 33: and 33 not of 8, the unvectorized loads), d below, at and
  // above a 64-column tile (16, 64, 80), an expert whose 64-pair steps of the weight gradient
  // end early (130 = 4 x 32 + 2).
  const Case cases[] = {{{5, 0, 17, 3}, 48, 64}, {{0, 9, 0, 4, 0}, 40, 16}, {{21}, 24, 64}, {{70, 1, 90}, 33, 32},
                        {{130, 2}, 96, 80}};
  for (const Case& c : cases)
    for (int mi = 0; mi < 4; ++mi)
      for (bool gated : {false, true}) {
        std::string tag = std::string(kModeNames[mi]) + (gated ? " gated" : "") + " E_l" +
                          std::to_string(c.counts.size()) + " P" + std::to_string(offsets_of(c.counts).back()) + " h" +
                          std::to_string(c.h) + " d" + std::to_string(c.d);
        check_grouped(c.counts, c.h, c.d, kModes[mi], gated, DType::f32, tag);
        if (mi == 0 || mi == 3) check_grouped(c.counts, c.h, c.d, kModes[mi], gated, DType::bf16, tag, DType::bf16);
        // bf16 with fp32 gradients: the trainer's case, through the fused gathers and the copy.
        if (mi == 0 || gated)
          check_grouped(c.counts, c.h, c.d, kModes[mi], gated, DType::bf16, tag + " fp32 grads", DType::f32, true);
        if (mi == 0) {
          check_grouped(c.counts, c.h, c.d, kModes[mi], gated, DType::bf16, tag + " fp32 grads, copy", DType::f32,
                        false);
        }
      }
}

TEST(CudaOps, GroupedExpertsNoPairs) {
  SKIP_WITHOUT_GPU();
  for (bool gated : {false, true}) {
    check_grouped({0, 0, 0}, 16, 16, ops::NormSiluMode::full, gated, DType::f32, gated ? "P0 gated" : "P0");
    for (DType gdt : kBoth)
      check_grouped({0}, 16, 64, ops::NormSiluMode::no_mean, gated, DType::bf16, gated ? "P0 E_l1 gated" : "P0 E_l1", gdt);
  }
}

// The fused gathers read a pair's row only inside [0, rows): an index outside it (a caller's
// bug) is reported by check_device_errors and reads as zeros, forward and backward.
TEST(CudaOps, GroupedExpertsRejectBadRowIndex) {
  SKIP_WITHOUT_GPU();
  const int64_t R = 3, P = 4, h = 16, d = 16;
  const std::vector<int64_t> off{0, 2, 4};
  Tensor index = Tensor::empty({P}, DType::i32);
  const int32_t rows_of[] = {0, 2, 3, 1};  // 3 is outside [0, 3)
  std::copy(rows_of, rows_of + P, index.data<int32_t>());
  const Tensor ig = index.to(Device::cuda);
  const DType bf = DType::bf16;
  Tensor x = gpu(randn({R, h}), bf), dout = gpu(randn({R, h}), bf), sp = gpu(randn({P}, 0.5, 0.3));
  Tensor w_pre = gpu(randn({2 * d, h}, 0.25), bf), gamma = gpu(randn({d}, 0.2, 1.0), bf);
  Tensor w_down = gpu(randn({h, 2 * d}, 0.1), bf), outp = Tensor::empty({P, h}, bf, Device::cuda);
  ops::GroupedExperts cache;
  ops::grouped_experts_forward(outp, cache, x, ig, off, sp, nullptr, w_pre, nullptr, gamma, w_down,
                               ops::NormSiluMode::no_mean, 1e-5);
  try {
    cuda::check_device_errors();
    ADD_FAILURE() << "a bad row index went unreported (forward)";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gathered expert GEMMs"), std::string::npos) << e.what();
  }
  Tensor dxp = Tensor::empty({P, h}, bf, Device::cuda), dsp = Tensor::empty({P}, DType::f32, Device::cuda);
  Tensor gm = Tensor::empty({P}, DType::f32, Device::cuda);
  Tensor dwp = Tensor::zeros({2 * d, h}, DType::f32, Device::cuda), dwd = Tensor::zeros({h, 2 * d}, DType::f32, Device::cuda);
  Tensor dg = Tensor::zeros({d}, DType::f32, Device::cuda);
  ops::grouped_experts_backward(dxp, dsp, gm, dwp, nullptr, dg, dwd, dout, cache, x, ig, off, sp, w_pre, nullptr, gamma,
                                w_down, ops::NormSiluMode::no_mean, 1e-5);
  EXPECT_THROW(cuda::check_device_errors(), Error);
  cuda::check_device_errors();  // cleared
  // The bad pair's pre-activations are those of a zero row.
  Tensor pre = cache.pre.to(Device::cpu);
  for (int64_t j = 0; j < d; ++j) EXPECT_EQ(pre.item(2 * d + j), 0.0) << j;
}

TEST(CudaOps, GroupedExpertsDeterministic) {
  SKIP_WITHOUT_GPU();
  for (DType dt : kBoth)
    for (DType gdt : kBoth) {  // under bf16 both gradient dtypes (fp32: the fused gathers' own sums)
      if (dt == DType::f32 && gdt == DType::bf16) continue;
      for (bool fused : {true, false}) {  // bf16 and fp32 gradients: the fused gathers, or the copy's WeightGrad
        if (!fused && (dt == DType::f32 || gdt == DType::bf16)) continue;
        next_stream = 9000;  // the same inputs twice
        std::vector<Tensor> a =
            check_grouped({70, 3, 0, 90}, 40, 64, ops::NormSiluMode::full, true, dt, "run 1", gdt, fused);
        next_stream = 9000;
        std::vector<Tensor> b =
            check_grouped({70, 3, 0, 90}, 40, 64, ops::NormSiluMode::full, true, dt, "run 2", gdt, fused);
        for (size_t i = 0; i < a.size(); ++i)
          EXPECT_TRUE(bitwise_equal(a[i], b[i]))
              << "grouped_experts_backward output " << i << " differs between runs [" << dtype_name(dt)
              << ", gradients " << dtype_name(gdt) << (fused ? ", fused gathers" : ", copy") << "]";
      }
    }
}

// The pair path composed as model/ffn.cpp composes it (route, gather, grouped experts, combine,
// the mean's terms per token: add_outer_ into dx, weighted_col_sum_ and add_rows_ into dW_pre)
// equals the dense-masked path, both on the GPU in
// fp32: the identities of deco-model.md hold for the CUDA kernels.
TEST(CudaOps, PairPathEqualsDenseMasked) {
  SKIP_WITHOUT_GPU();
  const int64_t T = 23, E = 6, d = 16, h = 32, n = E * d;
  const double eps = 1e-5, ws = 1.0 / std::sqrt(static_cast<double>(h));
  auto dev = [](const Shape& s) { return Tensor::empty(s, DType::f32, Device::cuda); };
  auto dev0 = [](const Shape& s) { return Tensor::zeros(s, DType::f32, Device::cuda); };
  for (int mi : {0, 2, 3})
    for (bool gated : {false, true}) {
      const ops::NormSiluMode mode = kModes[mi];
      const bool mean = mi == 0 || mi == 2;
      const std::string tag = std::string(kModeNames[mi]) + (gated ? " gated" : "");
      Tensor x = gpu(randn({T, h})), r = gpu(randn({T, E}, 1.0, -0.4)), g = gpu(randn({E}, 0.02, 0.1));
      Tensor w_up = gpu(randn({n, h}, ws, 0.05)), w_gate = gpu(randn({n, h}, ws, -0.03));
      Tensor gamma = gpu(randn({d}, 0.2, 1.0)), w_down = gpu(randn({h, n}, 0.1)), dy = gpu(randn({T, h}));
      const Tensor& w_pre = gated ? w_gate : w_up;
      Tensor s = dev({T, E});
      ops::router_scale_forward(s, r, g);

      // Dense-masked (model/ffn.cpp without a dispatcher).
      Tensor u = dev({T, n}), pre = dev({T, n}), act = dev({T, n}), z = dev({T, n}), st = dev({T, 1 + E});
      ops::linear_forward(u, x, w_up);
      if (gated) {
        ops::linear_forward(pre, x, w_gate);
        ops::normsilu_forward(act, st, pre, gamma, E, mode, eps);
        ops::mul_forward(z, act, u);
      } else {
        ops::normsilu_forward(z, st, u, gamma, E, mode, eps);
      }
      Tensor y = dev({T, n}), out = dev({T, h});
      ops::expert_scale_forward(y, z, s, E);
      ops::linear_forward(out, y, w_down);
      Tensor dY = dev({T, n}), dz = dev({T, n}), ds = dev({T, E}), du = dev({T, n}), dx = dev({T, h});
      Tensor dw_down = dev0({h, n}), dw_up = dev0({n, h}), dw_gate = dev0({n, h}), dgamma = dev0({d});
      ops::linear_backward(&dY, &dw_down, dy, y, w_down);
      ops::expert_scale_backward(dz, ds, dY, z, s, E);
      if (gated) {
        Tensor dact = dev({T, n}), dpre = dev({T, n});
        ops::mul_backward(dact, du, dz, act, u);
        ops::normsilu_backward(dpre, dgamma, dact, pre, gamma, st, E, mode, eps);
        ops::linear_backward(&dx, &dw_gate, dpre, x, w_gate, false);
        ops::linear_backward(&dx, &dw_up, du, x, w_up, true);
      } else {
        ops::normsilu_backward(du, dgamma, dz, u, gamma, st, E, mode, eps);
        ops::linear_backward(&dx, &dw_up, du, x, w_up, false);
      }

      // Pairs (model/ffn.cpp experts_forward_pairs / experts_backward_pairs, one rank).
      Tensor w_bar = dev0({h});
      if (mean) {
        ops::sum_rows(w_bar, w_pre);
        ops::scale_(w_bar, 1.0 / static_cast<double>(n));
      }
      ops::RoutedPairs rp;
      ops::route_pairs(rp, r, 0, E, false);
      const int64_t P = rp.tokens.numel();
      ASSERT_GT(P, 0) << tag;
      ASSERT_LT(P, T * E) << tag;
      Tensor sp = dev({P, 1});
      ops::embedding_forward(sp, rp.slots, s.view({T * E, 1}));
      sp = sp.view({P});
      // mu per token, gathered to the pairs (ExpertDispatcher::pair_dot).
      Tensor mu_tok = dev({T, 1}), mu = dev({P, 1});
      ops::linear_forward(mu_tok, x, w_bar.view({1, h}));
      ops::embedding_forward(mu, rp.tokens, mu_tok);
      mu = mu.view({P});
      Tensor outp = dev({P, h}), out2 = dev0({T, h});
      ops::GroupedExperts cache;
      ops::grouped_experts_forward(outp, cache, x, rp.tokens, rp.offsets, sp, mean ? &mu : nullptr, w_pre,
                                   gated ? &w_up : nullptr, gamma, w_down, mode, eps);
      ops::combine_pairs(out2, rp.slot_pair, outp);
      const Tol t{1e-4, 1e-4};
      expect_close(out2, host(out), t, "pair path out vs dense-masked " + tag);

      Tensor dxp = dev({P, h}), dsp = dev({P}), gm = dev({P}), gx = dev0({h});
      Tensor dw_pre2 = dev0({n, h}), dw_up2 = dev0({n, h}), dgamma2 = dev0({d}), dw_down2 = dev0({h, n});
      ops::grouped_experts_backward(dxp, dsp, gm, dw_pre2, gated ? &dw_up2 : nullptr, dgamma2, dw_down2, dy, cache, x,
                                    rp.tokens, rp.offsets, sp, w_pre, gated ? &w_up : nullptr, gamma, w_down, mode, eps);
      Tensor dx2 = dev({T, h}), ds2 = dev({T, E});
      ops::combine_pairs(dx2, rp.slot_pair, dxp);
      ops::pairs_to_slots(ds2, rp.slot_pair, dsp, 0);
      if (mean) {  // the mean's terms per token, as the layer applies them
        Tensor g = dev({T, 1});
        ops::combine_pairs(g, rp.slot_pair, gm.view({P, 1}));
        g = g.view({T});
        ops::add_outer_(dx2, g, w_bar, -1.0);
        ops::weighted_col_sum_(gx, g, x);
        ops::add_rows_(dw_pre2, gx, -1.0 / static_cast<double>(n));
      }
      expect_close(dx2, host(dx), t, "pair path dx vs dense-masked " + tag);
      // ds matters where r > 0 only (the router backward masks it); the pair path leaves 0 elsewhere.
      Tensor dsm = host(ds), rh = host(r);
      for (int64_t i = 0; i < T * E; ++i)
        if (!(rh.data<float>()[i] > 0)) dsm.data<float>()[i] = 0.0f;
      expect_close(ds2, dsm, t, "pair path ds vs dense-masked " + tag);
      expect_close(dw_pre2, host(gated ? dw_gate : dw_up), t, "pair path dW_pre vs dense-masked " + tag);
      if (gated) expect_close(dw_up2, host(dw_up), t, "pair path dW_up vs dense-masked " + tag);
      expect_close(dgamma2, host(dgamma), t, "pair path dgamma vs dense-masked " + tag);
      expect_close(dw_down2, host(dw_down), t, "pair path dW_down vs dense-masked " + tag);
    }
}
