// Expert parallelism: the routed experts split over the expert-parallel ranks (carved out of the
// data-parallel ones), only active (token, expert) pairs sent. Checked against one rank: the
// gradients of every parameter in fp64 on four ranks in several layouts (EpWorker, run under
// mpirun by ExpertParallel.GradientsEqualOneRankInFp64), and 20 training steps through the CLI
// in fp32, then checkpoints written at EP4 resumed at EP1 and EP2.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "checkpoint/manager.h"
#include "core/rng.h"
#include "model/expert_dispatch.h"
#include "model/transformer.h"
#include "mpi_test_util.h"
#include "parallel/grad_sync.h"
#include "parallel/process_groups.h"
#include "parallel/tensor_parallel.h"

namespace fs = std::filesystem;
using namespace decotron;
using namespace decotron::mpi_test;

namespace {

// The whole tensor of a parameter from every rank's shard: experts over the expert-parallel
// group, then everything split over the tensor-parallel group.
Tensor whole(const ParallelContext& ctx, const Parameter& p, const Tensor& t) {
  if (p.shard_dim < 0) return t;
  Tensor h = t;
  if (is_expert_partition(p.partition) && ctx.ep->size() > 1) h = tp_gather_shards(*ctx.ep, h, p.shard_dim);
  if (ctx.tp->size() > 1) h = tp_gather_shards(*ctx.tp, h, p.shard_dim);
  return h;
}

void random_tokens(Tensor& t, uint64_t key, int64_t vocab) {
  for (int64_t i = 0; i < t.numel(); ++i)
    t.data<int32_t>()[i] = static_cast<int32_t>(rng::random4(key, 1, i).v[0] % vocab);
}

}  // namespace

// Under mpirun -np 4. Each data-parallel rank trains on its own micro-batch; the reference is
// one rank that runs all of them as micro-batches (loss scale 1/dp), i.e. the same mean loss.
TEST(EpWorker, LayoutsEqualOneRankInFp64) {
  if (!std::getenv("DECOTRON_EP_WORKER")) GTEST_SKIP() << "runs under mpirun (ExpertParallel.GradientsEqualOneRankInFp64)";
  struct Case {
    int tensor, expert;
    const char* compute;
    int64_t experts = 8;
  };
  // 6 experts split unevenly: 2, 2, 1, 1 over EP4 and over TP2 x EP2, 3 + 3 over TP2.
  for (Case c : {Case{1, 4, "sparse"}, Case{1, 4, "dense"}, Case{1, 2, "sparse"}, Case{2, 2, "sparse"},
                 Case{2, 2, "dense"}, Case{2, 1, "sparse"}, Case{1, 1, "sparse"}, Case{1, 4, "sparse", 6},
                 Case{2, 2, "sparse", 6}, Case{2, 2, "dense", 6}}) {
    SCOPED_TRACE(cat("tensor ", c.tensor, " expert ", c.expert, " ", c.compute, " experts ", c.experts));
    ParallelConfig pc;
    pc.tensor = c.tensor, pc.expert = c.expert;
    auto ctx = make_parallel_context(pc, Device::cpu);
    const int dp = ctx->layout.dp_size;
    ModelConfig m;
    m.vocab_size = 64, m.seq_len = 8, m.hidden = 32, m.layers = 3, m.heads = 4, m.ffn_hidden = 64, m.experts = 8;
    m.expert_width = 8, m.shared_expert_width = 16, m.dense_layers = 1, m.parameter_parity = false;
    m.init_std = 0.2;  // large enough that routers activate a mix of experts
    m.expert_compute = c.compute;
    m.experts = c.experts;
    Transformer one(m, DType::f64, Device::cpu), par(m, DType::f64, Device::cpu, ctx->tp.get(), ctx->ep.get());
    one.params().initialize(11);
    par.params().initialize(11);
    const BatchShape bs{2, m.seq_len};
    RegularizerSpec reg;
    reg.kind = RegularizerSpec::Kind::entropy, reg.coef = 0.05;
    auto batch = [&](int d, Tensor& tok, Tensor& tgt) {
      tok = Tensor::empty({bs.tokens()}, DType::i32), tgt = Tensor::empty({bs.tokens()}, DType::i32);
      random_tokens(tok, 100 + d, m.vocab_size);
      random_tokens(tgt, 200 + d, m.vocab_size);
    };
    double ref_loss = 0;
    int64_t ref_active = 0;
    one.params().zero_grad();
    for (int d = 0; d < dp; ++d) {
      Tensor tok, tgt;
      batch(d, tok, tgt);
      ForwardResult f = one.forward(tok, tgt, bs, reg, 1.0 / dp, true);
      one.backward(1.0 / dp);
      ref_loss += f.lm_loss_sum;
      for (const auto& r : f.routing) ref_active += r.active_pairs;
    }
    Tensor tok, tgt;
    batch(ctx->layout.dp_rank, tok, tgt);
    GradientSync sync(par.params().all(), *ctx);  // the gradients now live in its buffers
    par.params().zero_grad();
    ForwardResult f = par.forward(tok, tgt, bs, reg, 1.0, true);
    par.backward(1.0);
    sync.finish_grad_sync();
    std::vector<double> sums = {f.lm_loss_sum};
    std::vector<int64_t> counts = {0, 0};
    for (const auto& r : f.routing) counts[0] += r.active_pairs, counts[1] += r.pairs_computed;
    ctx->dp->sum_in_place(sums);
    ctx->dp->sum_in_place(counts);
    EXPECT_NEAR(sums[0], ref_loss, 1e-10 * std::fabs(ref_loss));
    EXPECT_EQ(counts[0], ref_active);
    EXPECT_GT(ref_active, 0);
    EXPECT_LT(ref_active, int64_t(dp) * bs.tokens() * m.experts * 2);
    // Pairs computed by the experts: the active ones (sparse), or all of them (dense), each once
    // over the tensor x expert grid of every expert-data-parallel replica.
    int64_t computed = ctx->tp->sum(counts[1]);
    if (std::string(c.compute) == "sparse") EXPECT_EQ(computed, ref_active);
    else EXPECT_EQ(computed, int64_t(dp) * bs.tokens() * m.experts * 2);
    auto ps1 = one.params().all(), ps2 = par.params().all();
    ASSERT_EQ(ps1.size(), ps2.size());
    for (size_t i = 0; i < ps1.size(); ++i) {
      ASSERT_EQ(ps1[i]->name, ps2[i]->name);
      Tensor v = whole(*ctx, *ps2[i], ps2[i]->value), g = whole(*ctx, *ps2[i], ps2[i]->grad);
      ASSERT_EQ(v.shape(), ps1[i]->value.shape()) << ps1[i]->name;
      double scale = 0, err = 0, verr = 0;
      for (int64_t k = 0; k < v.numel(); ++k) {
        scale = std::max(scale, std::fabs(ps1[i]->grad.data<double>()[k]));
        err = std::max(err, std::fabs(ps1[i]->grad.data<double>()[k] - g.data<double>()[k]));
        verr = std::max(verr, std::fabs(ps1[i]->value.data<double>()[k] - v.data<double>()[k]));
      }
      EXPECT_EQ(verr, 0.0) << ps1[i]->name << ": the same initial weights";
      EXPECT_GT(scale, 0.0) << ps1[i]->name;
      // No factor of the expert-parallel size: expert gradients equal the one-rank ones.
      EXPECT_LE(err, 1e-10 * scale) << ps1[i]->name << " (" << partition_name(ps1[i]->partition) << ")";
    }
  }
}

// Ranks that send nothing and ranks that receive nothing still join every collective, and
// every pair's result comes back to its token: 4 expert-parallel ranks, 8 experts (2 each);
// only ranks 0 and 2 have active pairs, all of them for experts 0-3 (ranks 0 and 1), so ranks
// 2 and 3 receive nothing and ranks 1 and 3 send nothing. The "experts" here multiply each
// pair's row by its score plus its expert index, so the combined output is known in closed form.
TEST(EpWorker, EmptyRanksJoinEveryExchange) {
  if (!std::getenv("DECOTRON_EP_WORKER")) GTEST_SKIP() << "runs under mpirun (ExpertParallel.GradientsEqualOneRankInFp64)";
  ParallelConfig pc;
  pc.expert = 4;
  auto ctx = make_parallel_context(pc, Device::cpu);
  const int rank = ctx->ep->rank();
  const int64_t T = 5, E = 8, h = 3;
  ExpertDispatcher disp(ctx->ep.get(), {0, 2, 4, 6, 8});
  Tensor x = Tensor::empty({T, h}, DType::f64), r = Tensor::empty({T, E}, DType::f64), s = Tensor::empty({T, E}, DType::f64);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < h; ++j) x.data<double>()[t * h + j] = 100 * rank + 10 * t + j;
    for (int64_t e = 0; e < E; ++e) {
      const bool active = rank % 2 == 0 && e < 4 && (t + e + rank) % 3 != 0;
      r.data<double>()[t * E + e] = active ? 1.0 : -1.0;
      s.data<double>()[t * E + e] = active ? 0.5 + 0.1 * e : 0.0;
    }
  }
  ExpertDispatcher::Received got = disp.dispatch(x, r, s, false);
  ASSERT_EQ(got.offsets.size(), 3u);
  EXPECT_EQ(disp.pairs_received() == 0, rank >= 2) << "rank " << rank;
  // The pairs' inputs, read through the index (the rows received), as the experts read them.
  const int64_t P = got.index.numel();
  Tensor xp = Tensor::empty({P, h}, DType::f64);
  if (P > 0) ops::embedding_forward(xp, got.index, got.rows);
  EXPECT_TRUE(disp.input_rows(x).raw() == got.rows.raw()) << "rank " << rank;
  // The experts: out_p = (s_p + global expert index) * x_p.
  Tensor outp = Tensor::empty({P, h}, DType::f64);
  for (int64_t e = 0; e < 2; ++e)
    for (int64_t p = got.offsets[e]; p < got.offsets[e + 1]; ++p)
      for (int64_t j = 0; j < h; ++j)
        outp.data<double>()[p * h + j] = (got.s.data<double>()[p] + 2 * rank + e) * xp.data<double>()[p * h + j];
  Tensor out = disp.combine(outp);
  for (int64_t t = 0; t < T; ++t) {
    double coef = 0;
    for (int64_t e = 0; e < E; ++e)
      if (r.data<double>()[t * E + e] > 0) coef += s.data<double>()[t * E + e] + e;
    for (int64_t j = 0; j < h; ++j)
      EXPECT_DOUBLE_EQ(out.data<double>()[t * h + j], coef * x.data<double>()[t * h + j]) << "rank " << rank << " t " << t;
  }
  // Backward: the output gradient reaches each pair; dx and ds come back to the tokens.
  Tensor dout = Tensor::empty({T, h}, DType::f64);
  for (int64_t i = 0; i < T * h; ++i) dout.data<double>()[i] = 1.0 + i;
  Tensor dout_rows = disp.dispatch_grad(dout), doutp = Tensor::empty({P, h}, DType::f64);
  if (P > 0) ops::embedding_forward(doutp, got.index, dout_rows);
  Tensor dxp = Tensor::empty(doutp.shape(), DType::f64), dsp = Tensor::empty({doutp.dim(0)}, DType::f64);
  Tensor gmean = Tensor::empty({doutp.dim(0)}, DType::f64);  // per pair: its score + its expert
  for (int64_t e = 0; e < 2; ++e)
    for (int64_t p = got.offsets[e]; p < got.offsets[e + 1]; ++p) {
      gmean.data<double>()[p] = got.s.data<double>()[p] + 2 * rank + e;
      double dot = 0;
      for (int64_t j = 0; j < h; ++j) {
        dxp.data<double>()[p * h + j] = (got.s.data<double>()[p] + 2 * rank + e) * doutp.data<double>()[p * h + j];
        dot += xp.data<double>()[p * h + j] * doutp.data<double>()[p * h + j];
      }
      dsp.data<double>()[p] = dot;
    }
  Tensor dx = Tensor::empty({T, h}, DType::f64), ds = Tensor::empty({T, E}, DType::f64), g;
  disp.combine_grad(dx, ds, g, dxp, dsp, gmean);
  ASSERT_EQ(g.numel(), T);
  for (int64_t t = 0; t < T; ++t) {
    double coef = 0, dot = 0;
    for (int64_t j = 0; j < h; ++j) dot += x.data<double>()[t * h + j] * dout.data<double>()[t * h + j];
    for (int64_t e = 0; e < E; ++e) {
      const bool active = r.data<double>()[t * E + e] > 0;
      if (active) coef += s.data<double>()[t * E + e] + e;
      EXPECT_DOUBLE_EQ(ds.data<double>()[t * E + e], active ? dot : 0.0) << "rank " << rank;
    }
    // The per-pair scalars come back and sum per token: g_t = coef.
    EXPECT_DOUBLE_EQ(g.data<double>()[t], coef) << "rank " << rank << " t " << t;
    for (int64_t j = 0; j < h; ++j)
      EXPECT_DOUBLE_EQ(dx.data<double>()[t * h + j], coef * dout.data<double>()[t * h + j]) << "rank " << rank;
  }
}

TEST(ExpertParallel, GradientsEqualOneRankInFp64) {
  if (std::getenv("DECOTRON_EP_WORKER")) GTEST_SKIP() << "inside the worker";
  const std::string dir = fresh_dir("ep_worker");
  char self[4096] = {0};
  ASSERT_GT(readlink("/proc/self/exe", self, sizeof self - 1), 0);
  int rc = run(std::string("DECOTRON_EP_WORKER=1 ") + kMpirun + " -x DECOTRON_EP_WORKER -np 4 " + self +
                           " --gtest_color=no --gtest_filter=EpWorker.*",
                       dir + "/log", 120);
  const std::string log = read_file(dir + "/log");
  EXPECT_EQ(rc, 0) << log;
  size_t passed = 0;
  for (size_t p = log.find("[  PASSED  ] 2 tests"); p != std::string::npos; p = log.find("[  PASSED  ] 2 tests", p + 1))
    ++passed;
  EXPECT_EQ(passed, 4u) << log;
  EXPECT_EQ(log.find("SKIPPED"), std::string::npos) << log;
}

namespace {

std::string ep_config(const std::string& dir, const std::string& compute) {
  std::string path = dir + "/tiny-" + compute + ".yaml";
  // Adam's eps at 1e-6: with 1e-8, a parameter whose gradient is ~0 turns fp32 rounding
  // differences between layouts into steps of size lr, and a router logit then crosses 0.
  std::ofstream(path) << "model: {arch: deco, vocab_size: 64, seq_len: 16, hidden: 32, layers: 2, heads: 2,\n"
                         "        ffn_hidden: 64, experts: 8, expert_width: 8, shared_expert_width: 16,\n"
                         "        parameter_parity: false, expert_compute: " << compute << "}\n"
                         "train: {iters: 20, micro_batch: 2, global_batch: 8, warmup_iters: 2, decay_iters: 5,\n"
                         "        reg_lambda0: 1.0e-3, reg_multiplier: 1.05, eval_interval: 10, eval_iters: 4,\n"
                         "        adam_eps: 1.0e-6}\n"
                         "checkpoint: {interval: 10}\n"
                         "parallel: {timeout_s: 60}\n"
                         "log: {interval: 1}\n";
  return path;
}

std::string train(const std::string& cfg, const std::string& run_dir, int np, int tensor, int expert,
                  const std::string& extra = "") {
  std::string cmd = std::string(DECOTRON_BINARY) + " train --config " + cfg + " --synthetic-data --run-dir " + run_dir +
                    " --set parallel.tensor=" + std::to_string(tensor) + " --set parallel.expert=" +
                    std::to_string(expert) + extra;
  if (np > 1) cmd = mpirun(np) + cmd;
  const std::string log = run_dir + ".log";
  int rc = run(cmd, log);
  return rc == 0 ? std::string() : cat("exit ", rc, ": ", read_file(log));
}


// The losses of every record within 1e-5 relative. ReLU routing makes the rest discontinuous:
// a router logit within fp32 rounding of 0 is active in one layout and not in another (the
// layouts sum in different orders), which moves the activation ratio by one pair and the
// entropy regularizer's gradient by a finite step; so the routing statistics, the gradient norm
// and (in the checkpoints) the weights are held to looser bounds here, and the exact equality of
// every gradient is checked in fp64 (EpWorker above).
void expect_same_records(const std::string& got_dir, const std::string& ref_dir, const std::string& what) {
  const auto got = train_records(got_dir + "/metrics.jsonl"), ref = train_records(ref_dir + "/metrics.jsonl");
  ASSERT_EQ(got.size(), ref.size()) << what;
  for (size_t i = 0; i < ref.size(); ++i) {
    const std::string at = what + " record " + std::to_string(i);
    if (ref[i].contains("val_loss")) {
      expect_close(got[i]["val_loss"], ref[i]["val_loss"], 1e-5, at + " val_loss");
      continue;
    }
    EXPECT_EQ(got[i]["iter"], ref[i]["iter"]) << at;
    expect_close(got[i]["lm_loss"], ref[i]["lm_loss"], 1e-5, at + " lm_loss");
    for (const char* key : {"reg_loss", "entropy", "grad_norm", "reg_coef"})
      expect_close(got[i][key], ref[i][key], 1e-3, at + " " + key);
    // At most two of the step's 8 x 64 x 2 (token, expert) pairs flipped.
    EXPECT_LE(std::fabs(got[i]["act_ratio"].get<double>() - ref[i]["act_ratio"].get<double>()), 2.0 / 1024 + 1e-12)
        << at;
    EXPECT_GE(got[i]["expert_load_max_over_mean"].get<double>(), 1.0) << at;
    EXPECT_GE(got[i]["rank_load_max_over_mean"].get<double>(), 1.0) << at;
  }
}

// Every tensor of the newest checkpoints (whole tensors by name) within rel of each other (L2).
// router_rel (if > 0) bounds the router weights instead: under bf16 a logit within rounding of 0
// flips between layouts, and the regularizer's gradient jumps there.
void expect_same_checkpoints(const std::string& got_dir, const std::string& ref_dir, double rel,
                             const std::string& what, double router_rel = 0) {
  const auto a = CheckpointManager::read_newest_good(got_dir + "/checkpoints");
  const auto b = CheckpointManager::read_newest_good(ref_dir + "/checkpoints");
  EXPECT_EQ(a.data.state.iteration, b.data.state.iteration) << what;
  ASSERT_EQ(a.data.model.size(), b.data.model.size()) << what;
  for (size_t i = 0; i < a.data.model.size(); ++i) {
    const auto &x = a.data.model[i], &y = b.data.model[i];
    ASSERT_EQ(x.name, y.name);
    ASSERT_EQ(x.shape, y.shape) << what << " " << x.name << ": checkpoints hold whole tensors";
    double diff = 0, norm = 0;  // relative L2 distance (a flipped routing moves a few entries by ~lr)
    for (size_t k = 0; k < x.data.size(); ++k)
      diff += (double(x.data[k]) - y.data[k]) * (double(x.data[k]) - y.data[k]), norm += double(y.data[k]) * y.data[k];
    const bool router = router_rel > 0 && x.name.find("w_router") != std::string::npos;
    EXPECT_LE(std::sqrt(diff), (router ? router_rel : rel) * std::sqrt(norm)) << what << " " << x.name;
  }
}

}  // namespace

// 20 fp32 steps of a tiny DECO at EP2, EP4, TP2 x EP2, TP2 x EP2 with sequence parallelism (and
// activation recomputation) and
// EP2 x DP4 with the distributed optimizer follow the one-rank run (the sparse path: only
// active pairs sent), and EP2 and TP2 x EP2 with the dense-masked reference (every pair sent).
TEST(ExpertParallel, TrainingLayoutsMatchSingleRank) {
  const std::string dir = fresh_dir("ep_layouts");
  for (const std::string compute : {"sparse", "dense"}) {
    const std::string cfg = ep_config(dir, compute), one = dir + "/one-" + compute;
    ASSERT_EQ(train(cfg, one, 1, 1, 1), "");
    struct Layout {
      const char* name;
      int np, tensor, expert;
      const char* extra;
    };
    for (Layout l : {Layout{"ep2", 2, 1, 2, ""}, Layout{"ep4", 4, 1, 4, ""}, Layout{"tp2ep2", 4, 2, 2, ""},
                     Layout{"tp2ep2-sp", 4, 2, 2, " --set parallel.sequence=true --set train.recompute=true"},
                     Layout{"ep2dp4-distopt", 4, 1, 2, " --set parallel.distributed_optimizer=true"}}) {
      // The sparse runs cover the combinations; the dense-masked reference runs EP2 and TP2 x EP2.
      if (compute == "dense" && (std::string(l.name) != "ep2" && std::string(l.name) != "tp2ep2")) continue;
      const std::string run_dir = dir + "/" + l.name + "-" + compute;
      ASSERT_EQ(train(cfg, run_dir, l.np, l.tensor, l.expert, l.extra), "");
      const std::string log = read_file(run_dir + ".log");
      EXPECT_NE(log.find(cat("expert ", l.expert, " within data")), std::string::npos) << log;
      expect_same_records(run_dir, one, cat(l.name, " ", compute));
      expect_same_checkpoints(run_dir, one, 1e-3, cat(l.name, " ", compute));
    }
  }
  // A checkpoint written at EP4 resumes at EP1 and at EP2: 5 more steps follow the EP4 run's own
  // 5 more steps (the same state at step 20, so only rounding differs).
  const std::string cfg = ep_config(dir, "sparse"), more = " --set train.iters=25", ep4 = dir + "/ep4-sparse";
  for (int expert : {1, 2}) fs::copy(ep4, dir + "/from-ep4-to-ep" + std::to_string(expert), fs::copy_options::recursive);
  ASSERT_EQ(train(cfg, ep4, 4, 1, 4, more), "");
  for (int expert : {1, 2}) {
    const std::string run_dir = dir + "/from-ep4-to-ep" + std::to_string(expert);
    ASSERT_EQ(train(cfg, run_dir, expert, 1, expert, more), "");
    EXPECT_NE(read_file(run_dir + ".log").find("resumed from"), std::string::npos);
    expect_same_records(run_dir, ep4, cat("EP4 -> EP", expert));
    expect_same_checkpoints(run_dir, ep4, 1e-5, cat("EP4 -> EP", expert));
  }
  // The same with the distributed optimizer's sharded moments: saved at EP2 x DP4, resumed on
  // one rank without it.
  const std::string distopt = dir + "/ep2dp4-distopt-sparse", to_one = dir + "/from-distopt-to-one";
  fs::copy(distopt, to_one, fs::copy_options::recursive);
  ASSERT_EQ(train(cfg, distopt, 4, 1, 2, more + " --set parallel.distributed_optimizer=true"), "");
  ASSERT_EQ(train(cfg, to_one, 1, 1, 1, more), "");
  EXPECT_NE(read_file(to_one + ".log").find("resumed from"), std::string::npos);
  expect_same_records(to_one, distopt, "EP2 x DP4 distributed optimizer -> one rank");
  expect_same_checkpoints(to_one, distopt, 1e-5, "EP2 x DP4 distributed optimizer -> one rank");
}

// Mixed precision (train.dtype: bf16; emulated on the CPU) in every parallel layout: the
// tensor-parallel partial sums, sequence-parallel slices and expert-parallel rows travel as bf16
// (summed in fp32 and rounded, as NCCL sums bf16), gradients and masters stay fp32. Each layout
// rounds its partial sums at other points than one rank does, so the curves agree to bf16's
// precision, not fp32's: lm_loss within 1e-3 relative at every step (measured: at most 2.1e-5;
// one-rank bf16 vs fp32: 4.4e-5).
TEST(ExpertParallel, Bf16LayoutsTrackSingleRank) {
  const std::string dir = fresh_dir("ep_bf16");
  const std::string cfg = ep_config(dir, "sparse"), bf16 = " --set train.dtype=bf16 --set train.iters=10";
  ASSERT_EQ(train(cfg, dir + "/one", 1, 1, 1, bf16), "");
  ASSERT_EQ(train(cfg, dir + "/one-fp32", 1, 1, 1, " --set train.iters=10"), "");
  const auto ref = train_records(dir + "/one/metrics.jsonl"), fp32 = train_records(dir + "/one-fp32/metrics.jsonl");
  double bf16_vs_fp32 = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    if (!ref[i].contains("val_loss"))
      bf16_vs_fp32 = std::max(bf16_vs_fp32, std::fabs(ref[i]["lm_loss"].get<double>() - fp32[i]["lm_loss"].get<double>()));
  EXPECT_GT(bf16_vs_fp32, 0.0) << "the bf16 run computed in fp32";
  struct Layout {
    const char* name;
    int np, tensor, expert;
    const char* extra;
  };
  for (Layout l : {Layout{"dp2", 2, 1, 1, ""}, Layout{"ep2", 2, 1, 2, ""}, Layout{"tp2", 2, 2, 1, ""},
                   Layout{"tp2ep2-sp", 4, 2, 2, " --set parallel.sequence=true"}}) {
    const std::string run_dir = dir + "/" + l.name;
    ASSERT_EQ(train(cfg, run_dir, l.np, l.tensor, l.expert, bf16 + l.extra), "");
    const auto got = train_records(run_dir + "/metrics.jsonl");
    ASSERT_EQ(got.size(), ref.size()) << l.name;
    for (size_t i = 0; i < ref.size(); ++i) {
      const char* key = ref[i].contains("val_loss") ? "val_loss" : "lm_loss";
      expect_close(got[i][key], ref[i][key], 1e-3, cat(l.name, " record ", i, " ", key));
    }
    // Weights within 2e-2 (L2; measured at most 7.5e-3), the routers within 1e-1 (measured 5e-2).
    expect_same_checkpoints(run_dir, dir + "/one", 2e-2, cat(l.name, " bf16"), 1e-1);
  }
}

// Experts that do not divide split unevenly (8 over EP3: 3, 3, 2) and train as one rank does;
// fewer experts than ranks is a clear error.
TEST(ExpertParallel, UnevenExpertSplits) {
  const std::string dir = fresh_dir("ep_uneven");
  const std::string cfg = ep_config(dir, "sparse"), batch = " --set train.global_batch=12";
  ASSERT_EQ(train(cfg, dir + "/one", 1, 1, 1, batch), "");
  ASSERT_EQ(train(cfg, dir + "/ep3", 3, 1, 3, batch), "");
  expect_same_records(dir + "/ep3", dir + "/one", "EP3 (8 experts)");
  expect_same_checkpoints(dir + "/ep3", dir + "/one", 1e-3, "EP3 (8 experts)");
  std::string err = train(cfg, dir + "/too-few", 4, 1, 4, " --set model.experts=2");
  EXPECT_NE(err.find("parallel.expert"), std::string::npos) << err;
  EXPECT_NE(err.find("a whole expert"), std::string::npos) << err;
}

// Every parallel feature at once on 4 ranks (TP2 x DP2 with EP2 carved out of DP): sequence
// parallelism, the distributed optimizer, activation recomputation, 6 gated experts split
// unevenly (2, 2, 1, 1), the loss head in chunks of 12 of the 32 tokens, and 3 evaluation
// micro-batches over 2 data-parallel ranks: 10 steps follow the one-rank run (this model's
// 6-expert layers see router flips sooner; the fp64 worker above checks exact gradients).
TEST(ExpertParallel, EveryFeatureAtOnce) {
  const std::string dir = fresh_dir("ep_everything");
  const std::string cfg = dir + "/tiny.yaml";
  std::ofstream(cfg) << "model: {arch: deco, vocab_size: 64, seq_len: 16, hidden: 32, layers: 3, heads: 2, dense_layers: 1,\n"
                        "        ffn_hidden: 64, experts: 6, expert_width: 8, shared_expert_width: 16, gated_experts: true,\n"
                        "        parameter_parity: false, expert_compute: sparse}\n"
                        "train: {iters: 10, micro_batch: 2, global_batch: 8, warmup_iters: 2, decay_iters: 3,\n"
                        "        loss_chunk_tokens: 12, reg_lambda0: 1.0e-3, reg_multiplier: 1.05, eval_interval: 5,\n"
                        "        eval_iters: 3, adam_eps: 1.0e-6}\n"
                        "parallel: {timeout_s: 60}\n"
                        "log: {interval: 1}\n";
  ASSERT_EQ(train(cfg, dir + "/one", 1, 1, 1), "");
  ASSERT_EQ(train(cfg, dir + "/all", 4, 2, 2,
                  " --set parallel.sequence=true --set parallel.distributed_optimizer=true --set train.recompute=true"),
            "");
  // The losses (the routing statistics of this smaller model flip more: a layer has 6 experts).
  const auto got = train_records(dir + "/all/metrics.jsonl"), ref = train_records(dir + "/one/metrics.jsonl");
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    const char* key = ref[i].contains("val_loss") ? "val_loss" : "lm_loss";
    expect_close(got[i][key], ref[i][key], 1e-5, cat("record ", i, " ", key));
  }
  expect_same_checkpoints(dir + "/all", dir + "/one", 1e-3, "TP2 x EP2 x DP2 + SP + distopt + recompute");
}
