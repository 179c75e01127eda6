// A tiny model's loss and gradients on the GPU against the CPU, one forward and backward from
// the same weights: fp32 (the CPU reference's math) and bf16 mixed precision (against the CPU's
// emulated bf16), for every DECO expert path and the dense twin. Skips without a GPU; runs in
// the host emulator (tools/cuda_emu/run.sh) too.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "core/cuda_backend.h"
#include "kernels/ops.h"
#include "model/transformer.h"
#include "mpi_test_util.h"
#include "parallel/process_groups.h"
#include "parallel/tensor_parallel.h"
#include "tiny_config.h"
#include "trainer/trainer.h"
#include "trainer/training_data.h"

using namespace decotron;

namespace {

ModelConfig tiny_model(const char* arch, const char* expert_compute, bool gated) {
  ModelConfig m = test::tiny_model(arch);
  m.expert_compute = expert_compute;
  m.gated_experts = gated;
  return m;
}

// Micro-batch `which` (0, 1, ...) of a fixed synthetic stream.
void batch(int64_t B, int64_t S, Tensor& tok, Tensor& tgt, int which = 0) {
  auto data = make_synthetic_data(64, S, 3, 0);
  std::vector<int32_t> s;
  for (int i = 0; i <= which; ++i) s = data->next_train(B);
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
      const std::string tag =
          std::string(k.arch) + "/" + k.expert_compute + (k.gated ? "/gated" : "") + " " + dtype_name(compute);
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

// Tensor, sequence and expert parallelism on device tensors, through the MPI backend (data
// staged through the host: two ranks sharing one GPU) and the NCCL one: every rank's loss and
// gradients against one CPU rank; and data-parallel training (overlapped gradient buckets, the
// distributed optimizer) on the device against the same run on the CPU. Runs this binary under
// mpirun (CudaParallelWorker); in the emulator NCCL is tools/cuda_emu/fake_nccl.cpp.
TEST(CudaModel, ParallelLayoutsOnTheDeviceMatchOneRank) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device visible";
  if (std::getenv("DECOTRON_CUDA_PAR_WORKER")) GTEST_SKIP() << "inside the worker";
  using namespace mpi_test;
  const std::string dir = fresh_dir("cuda_layouts");
  const int rc = run(std::string("DECOTRON_CUDA_PAR_WORKER=1 ") + kMpirun + " -x DECOTRON_CUDA_PAR_WORKER -np 2 " +
                         self_exe() + " --gtest_color=no --gtest_filter=CudaParallelWorker.*",
                     dir + "/log", 1800);
  const std::string log = read_file(dir + "/log");
  EXPECT_EQ(rc, 0) << log;
  size_t passed = 0;
  for (size_t p = log.find("[  PASSED  ] 2 tests"); p != std::string::npos; p = log.find("[  PASSED  ] 2 tests", p + 1))
    ++passed;
  EXPECT_EQ(passed, 2u) << log;  // the worker suite's 2 tests on each of the 2 ranks

  EXPECT_EQ(log.find("SKIPPED"), std::string::npos) << log;
}

TEST(CudaParallelWorker, LayoutsMatchOneCpuRank) {
  if (!std::getenv("DECOTRON_CUDA_PAR_WORKER")) GTEST_SKIP() << "runs under mpirun from CudaModel.ParallelLayouts*";
  ModelConfig m = tiny_model("deco", "sparse", false);
  // The one-rank reference on the CPU: micro-batches 0 and 1, and their gradients.
  Transformer ref(m, DType::f32, Device::cpu);
  ref.params().initialize(11);
  double ref_loss[2];
  std::map<std::string, Tensor> ref_grad[2];
  Tensor tok[2], tgt[2];
  for (int b = 0; b < 2; ++b) {
    batch(2, 16, tok[b], tgt[b], b);
    ref.params().zero_grad();
    ref_loss[b] = ref.forward(tok[b], tgt[b], {2, 16}, RegularizerSpec{}, 1.0, true).lm_loss_sum;
    ref.backward(1.0);
    for (Parameter* p : ref.params().all()) ref_grad[b][p->name] = p->grad.clone();
  }
  struct Layout {
    const char* name;
    int tensor, expert;
    bool sequence;
  };
  for (const char* backend : {"mpi", "nccl"})
    for (Layout l : {Layout{"TP2", 2, 1, false}, Layout{"TP2+SP", 2, 1, true}, Layout{"EP2", 1, 2, false}}) {
      ParallelConfig pc;
      pc.tensor = l.tensor, pc.expert = l.expert, pc.sequence = l.sequence, pc.backend = backend, pc.timeout_s = 600;
      const std::string tag = std::string(l.name) + " " + backend;
      auto par = make_parallel_context(pc, Device::cuda);
      const int d = par->layout.dp_rank;  // TP ranks share a micro-batch; EP ranks (carved from DP) do not
      Transformer model(m, DType::f32, Device::cuda, par->tp.get(), par->ep.get(), l.sequence);
      model.params().initialize(11);
      model.params().zero_grad();
      const double loss =
          model.forward(tok[d].to(Device::cuda), tgt[d].to(Device::cuda), {2, 16}, RegularizerSpec{}, 1.0, true)
              .lm_loss_sum;
      model.backward(1.0);
      if (l.sequence) tp_all_reduce_sequence_parallel_grads(*par->tp, model.params().all());
      EXPECT_NEAR(loss, ref_loss[d], 1e-5 * std::abs(ref_loss[d])) << tag;
      for (Parameter* p : model.params().all()) {
        if (!p->trainable) continue;
        // Expert parallelism: a rank's experts saw both ranks' tokens; gamma (shared by all
        // experts) holds its experts' part, summed over the expert-parallel group here.
        const bool both = l.expert > 1 && (is_expert_partition(p->partition) || p->name.ends_with(".gamma"));
        Tensor want = ref_grad[d][p->name].clone();
        if (both) ops::add_(want, ref_grad[1 - d][p->name]);
        if (p->shard_dim >= 0)
          want = slice_shard(want, Shard{p->shard_dim, p->shard_start, p->value.dim(p->shard_dim)});
        Tensor got = p->grad.to(Device::cpu);
        if (l.expert > 1 && p->name.ends_with(".gamma")) {
          std::vector<double> v(got.numel());
          for (int64_t i = 0; i < got.numel(); ++i) v[i] = got.item(i);
          par->ep->sum_in_place(v);
          for (int64_t i = 0; i < got.numel(); ++i) got.data<float>()[i] = static_cast<float>(v[i]);
        }
        EXPECT_LT(relative_l2(got, want), 1e-4) << tag << " rank " << par->layout.world_rank << " " << p->name;
      }
    }
}

TEST(CudaParallelWorker, DataParallelTrainingMatchesTheCpu) {
  if (!std::getenv("DECOTRON_CUDA_PAR_WORKER")) GTEST_SKIP() << "runs under mpirun from CudaModel.ParallelLayouts*";
  Config c;
  c.model = tiny_model("deco", "sparse", false);
  c.train.iters = 2, c.train.micro_batch = 2, c.train.global_batch = 4, c.train.lr = 1e-2, c.train.warmup_iters = 1;
  c.train.lr_schedule = "constant", c.train.reg_lambda0 = 1e-3, c.train.eval_iters = 2;
  c.parallel.timeout_s = 600;
  validate_config(c);
  auto steps = [&](Config cfg) {
    Trainer t(cfg, make_synthetic_data(64, 16, 5, 0), "");
    std::vector<StepResult> r;
    for (int i = 0; i < 2; ++i) r.push_back(t.train_step());
    return r;
  };
  const std::vector<StepResult> want = steps(c);  // DP2 on the CPU (equal to one rank: test_parallel_mpi)
  for (const char* backend : {"mpi", "nccl"})
    for (bool distopt : {false, true}) {
      Config g = c;
      g.train.device = "cuda", g.parallel.backend = backend, g.parallel.distributed_optimizer = distopt;
      const std::vector<StepResult> got = steps(g);
      for (size_t i = 0; i < want.size(); ++i) {
        const std::string tag = cat(backend, distopt ? " distributed optimizer" : "", " step ", i + 1);
        EXPECT_NEAR(got[i].lm_loss, want[i].lm_loss, 1e-5 * want[i].lm_loss) << tag;
        EXPECT_NEAR(got[i].grad_norm, want[i].grad_norm, 1e-4 * want[i].grad_norm) << tag;
      }
    }
}
