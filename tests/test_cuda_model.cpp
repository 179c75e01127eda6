// A tiny model's loss and gradients on the GPU against the CPU, one forward and backward from
// the same weights: fp32 (the CPU reference's math) and bf16 mixed precision (against the CPU's
// emulated bf16), for every DECO expert path and the dense twin. Skips without a GPU; runs in
// the host emulator (tools/cuda_emu/run.sh) too.
#include <gtest/gtest.h>

#include <cmath>

#include "core/cuda_backend.h"
#include "model/transformer.h"
#include "trainer/training_data.h"

using namespace decotron;

namespace {

ModelConfig tiny_model(const char* arch, const char* expert_compute, bool gated) {
  ModelConfig m;
  m.arch = arch;
  m.vocab_size = 64;
  m.seq_len = 16;
  m.hidden = 32;
  m.layers = 2;
  m.heads = 2;
  m.ffn_hidden = 64;
  m.experts = 8;
  m.expert_width = 8;
  m.shared_expert_width = 16;
  m.parameter_parity = false;
  m.expert_compute = expert_compute;
  m.gated_experts = gated;
  return m;
}

void batch(int64_t B, int64_t S, Tensor& tok, Tensor& tgt) {
  auto data = make_synthetic_data(64, S, 3, 0);
  std::vector<int32_t> s = data->next_train(B);
  tok = Tensor::empty({B * S}, DType::i32), tgt = Tensor::empty({B * S}, DType::i32);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < S; ++j) {
      tok.data<int32_t>()[i * S + j] = s[i * (S + 1) + j];
      tgt.data<int32_t>()[i * S + j] = s[i * (S + 1) + j + 1];
    }
}

double relative_l2(const Tensor& got_any, const Tensor& want) {
  Tensor got = got_any.to(Device::cpu);
  double num = 0, den = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double d = got.item(i) - want.item(i);
    num += d * d, den += want.item(i) * want.item(i);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace

TEST(CudaModel, TinyModelLossAndGradientsMatchTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device visible";
  struct Case {
    const char* arch;
    const char* expert_compute;
    bool gated;
  };
  for (DType compute : {DType::f32, DType::bf16}) {
    for (Case k : {Case{"deco", "sparse", false}, Case{"deco", "dense", false}, Case{"deco", "sparse", true},
                   Case{"dense", "sparse", false}}) {
      const std::string tag = std::string(k.arch) + "/" + k.expert_compute + (k.gated ? "/gated" : "") + " " +
                              dtype_name(compute);
      ModelConfig m = tiny_model(k.arch, k.expert_compute, k.gated);
      Transformer cpu(m, DType::f32, Device::cpu), gpu(m, DType::f32, Device::cuda);
      for (Transformer* t : {&cpu, &gpu}) {
        t->params().initialize(11);
        t->params().set_compute_dtype(compute);
        t->params().zero_grad();
      }
      Tensor tok, tgt;
      batch(2, 16, tok, tgt);
      // fp32: the regularizer too (router logits agree to fp32 rounding); bf16: none (its
      // gradient jumps at r = 0, see test_mixed_precision.cpp).
      RegularizerSpec reg;
      if (compute == DType::f32) reg = RegularizerSpec{RegularizerSpec::Kind::entropy, 0.05, 0.2};
      ForwardResult rc = cpu.forward(tok, tgt, {2, 16}, reg, 1.0, true);
      cpu.backward(1.0);
      ForwardResult rg = gpu.forward(tok.to(Device::cuda), tgt.to(Device::cuda), {2, 16}, reg, 1.0, true);
      gpu.backward(1.0);
      const double loss_tol = compute == DType::f32 ? 1e-5 : 1e-2;
      EXPECT_NEAR(rg.lm_loss_sum, rc.lm_loss_sum, loss_tol * std::abs(rc.lm_loss_sum)) << tag;
      EXPECT_NEAR(rg.reg_loss, rc.reg_loss, 1e-5 * std::abs(rc.reg_loss) + 1e-12) << tag;
      ASSERT_EQ(rg.routing.size(), rc.routing.size()) << tag;
      for (size_t l = 0; l < rc.routing.size(); ++l)
        EXPECT_NEAR(rg.routing[l].active_pairs, rc.routing[l].active_pairs, compute == DType::f32 ? 0 : 4) << tag;
      // fp32: sums in other orders (cuBLAS, block trees): 1e-4 relative. bf16: both sides round
      // at the same points, but a rounding flips where the fp32 sums before it differ.
      const double grad_tol = compute == DType::f32 ? 1e-4 : 3e-2;
      for (Parameter* p : cpu.params().all()) {
        if (!p->trainable) continue;
        const Parameter& q = gpu.params().find(p->name);
        const double e = relative_l2(q.grad, p->grad);
        EXPECT_LT(e, p->full_precision && compute == DType::bf16 ? 0.1 : grad_tol) << tag << " " << p->name;
      }
    }
  }
}
