// Parallelism: the process grid, the communicators (single rank here, two ranks through
// mpirun), data-parallel training equal to one rank, a signal on one rank stopping every rank
// at the same step, and the watchdog aborting a job whose rank hangs.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "checkpoint/manager.h"
#include "core/config.h"
#include "core/rng.h"
#include "kernels/ops.h"
#include "model/parameter.h"
#include "model/transformer.h"
#include "parallel/grad_sync.h"
#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"
#include "parallel/tensor_parallel.h"
#include "parallel/vocab_parallel_cross_entropy.h"
#include "mpi_test_util.h"

namespace fs = std::filesystem;
using namespace decotron;
using namespace decotron::mpi_test;

namespace {

// Pid of the process whose environment holds `tag` and OMPI_COMM_WORLD_RANK=rank (0 if none).
pid_t find_rank(const std::string& tag, int rank) {
  const std::string want_rank = "OMPI_COMM_WORLD_RANK=" + std::to_string(rank);
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string env = read_file(e.path().string() + "/environ");
    std::set<std::string> vars;
    for (size_t i = 0, j; i < env.size(); i = j + 1) {
      j = env.find('\0', i);
      if (j == std::string::npos) j = env.size();
      vars.insert(env.substr(i, j - i));
    }
    if (vars.count(tag) && vars.count(want_rank)) return std::stoi(name);
  }
  return 0;
}

int64_t last_iter(const std::string& metrics) {
  int64_t it = 0;
  for (const auto& j : train_records(metrics))
    if (j.contains("iter")) it = j["iter"].get<int64_t>();
  return it;
}

// The communication of one optimizer step on one rank (bytes it sends or contributes, by group
// and op, as CommTraffic counts them), from the volume formulas of docs/performance-model.md for
// the layers as they are in this checkout; scripts/perf_model.py (`volumes`) computes the same.
// The one place to update when a layer's communication changes.
using GroupOpBytes = std::map<std::string, std::map<std::string, int64_t>>;
GroupOpBytes expected_step_bytes(const Config& c, int tp, int dp) {
  const ModelConfig& m = c.model;
  const int64_t es = 4;  // fp32 activations and gradients
  const int64_t T = c.train.micro_batch * m.seq_len;  // tokens per micro-batch
  const int64_t micro = c.train.global_batch / (c.train.micro_batch * dp);
  const int64_t h = m.hidden, L = m.layers, E = m.experts, d = m.expert_width;
  const int64_t D = m.arch == "deco" ? m.layers - m.dense_layers : 0;  // DECO layers
  GroupOpBytes out;
  if (tp > 1) {
    // Per micro-batch, all-reduces of [T, h]: the embedding's output, the LM head's dh, and per
    // layer attention and FFN, forward (output) and backward (dx).
    out["tp"]["all_reduce"] = micro * (2 + 4 * L) * T * h * es + 8;  // + the gradient norm's split sum (fp64)
    // Per DECO layer: w_bar and the mean's rank-one gradient gx [h], gamma's gradient [d], and the
    // router's ds [T, E] (NormSiLU's mean is x . w_bar: u is never gathered).
    out["tp"]["all_reduce"] += micro * D * (2 * h + d + T * E) * es;
    // All-gather, this rank's part: the vocabulary-parallel cross-entropy's per-token local
    // log-sum-exp and target logit [2, T] (fp64).
    out["tp"]["all_gather"] = micro * 2 * T * 8;
  }
  if (dp > 1) {
    // The bucketed gradient all-reduce: every trainable element this rank holds (its tensor-
    // parallel shard), fp32; then the step's statistics: {lm, reg, entropy} sums (fp64) and
    // {tokens, tokens without expert, active pairs per DECO layer, active tokens per layer and expert} (i64).
    Transformer whole(m, DType::f32, Device::cpu);
    int64_t local = 0;
    for (Parameter* p : whole.params().all()) {
      if (!p->trainable) continue;
      Shard s = shard_of(p->name, p->partition, p->value.shape(), p->expert_block, 0, tp);
      local += s.dim < 0 ? p->value.numel() : p->value.numel() / p->value.dim(s.dim) * s.count;
    }
    out["dp"]["all_reduce"] = local * es + 3 * 8 + (2 + D + D * E) * 8;
  }
  // Pairs computed per rank (the load metric): a sum of one-hot i64 vectors over the world.
  if (D > 0 && tp * dp > 1) out["world"]["all_reduce"] = 8 * tp * dp;
  return out;
}


}  // namespace

// ---- the grid --------------------------------------------------------------------------------

TEST(ParallelLayout, GridAndGroupsForEveryRank) {
  ParallelConfig cfg;
  cfg.tensor = 2, cfg.expert = 2;  // world 8: tp 2 x dp 4, ep 2 within dp, edp 2
  std::map<std::pair<std::string, int>, std::vector<int>> groups;
  for (int r = 0; r < 8; ++r) {
    ParallelLayout l = make_layout(cfg, 8, r);
    EXPECT_EQ(l.tp_size, 2);
    EXPECT_EQ(l.dp_size, 4);
    EXPECT_EQ(l.ep_size, 2);
    EXPECT_EQ(l.edp_size, 2);
    EXPECT_EQ(l.tp_rank, r % 2);
    EXPECT_EQ(l.dp_rank, r / 2);
    EXPECT_EQ(l.ep_rank, (r / 2) % 2);
    EXPECT_EQ(l.edp_rank, (r / 2) / 2);
    groups[{"tp", l.tp_color()}].push_back(r);
    groups[{"dp", l.dp_color()}].push_back(r);
    groups[{"ep", l.ep_color()}].push_back(r);
    groups[{"edp", l.edp_color()}].push_back(r);
  }
  // Tensor peers are neighbours; data peers share the tensor rank; an expert group is two
  // consecutive data ranks; expert-data peers hold the same experts.
  EXPECT_EQ((groups[{"tp", 1}]), (std::vector<int>{2, 3}));
  EXPECT_EQ((groups[{"dp", 1}]), (std::vector<int>{1, 3, 5, 7}));
  EXPECT_EQ((groups[{"ep", 1}]), (std::vector<int>{4, 6}));  // tp 0, dp ranks 2 and 3
  EXPECT_EQ((groups[{"edp", 1}]), (std::vector<int>{2, 6}));  // tp 0, ep rank 1
  for (const auto& [key, members] : groups) {
    const size_t want = key.first == "dp" ? 4 : 2;
    EXPECT_EQ(members.size(), want) << key.first << " " << key.second;
  }
  EXPECT_NE(describe_layout(cfg, 8).find("rank 5: tp 1 dp 2 ep 0 edp 1"), std::string::npos)
      << describe_layout(cfg, 8);
}

TEST(ParallelLayout, RejectsSizesThatDoNotDivide) {
  ParallelConfig cfg;
  cfg.tensor = 4;
  EXPECT_THROW(make_layout(cfg, 6, 0), Error);
  cfg.tensor = 1, cfg.expert = 3;
  EXPECT_THROW(make_layout(cfg, 4, 0), Error);
  cfg.expert = 1, cfg.data = 3;
  EXPECT_THROW(make_layout(cfg, 4, 0), Error);
  cfg.data = 0;
  EXPECT_EQ(make_layout(cfg, 4, 3).dp_size, 4);
}

TEST(TensorParallelShard, SplitsByPartition) {
  // W_up of 8 experts of width 4 over 2 ranks: rank 1 holds experts 4..7 (rows 16..31).
  Shard s = shard_of("w_up", Partition::expert_rows, {32, 6}, 4, 1, 2);
  EXPECT_EQ(s.dim, 0);
  EXPECT_EQ(s.start, 16);
  EXPECT_EQ(s.count, 16);
  s = shard_of("w_down", Partition::expert_cols, {6, 32}, 4, 0, 2);
  EXPECT_EQ(s.dim, 1);
  EXPECT_EQ(s.count, 16);
  EXPECT_EQ(shard_of("wo", Partition::row, {6, 8}, 0, 1, 2).start, 4);
  EXPECT_EQ(shard_of("emb", Partition::vocab, {10, 3}, 0, 1, 2).dim, 0);
  EXPECT_EQ(shard_of("g", Partition::expert_entries, {8}, 1, 1, 2).dim, -1);  // replicated with the router
  EXPECT_EQ(shard_of("norm", Partition::replicated, {8}, 0, 1, 2).dim, -1);
  EXPECT_EQ(shard_of("wq", Partition::column, {8, 8}, 0, 0, 1).dim, -1);      // one rank: whole
  // 3 experts over 2 ranks: balanced, 2 + 1; 1 expert over 2 ranks: an error.
  s = shard_of("w_up", Partition::expert_rows, {12, 6}, 4, 0, 2);
  EXPECT_EQ(s.start, 0);
  EXPECT_EQ(s.count, 8);
  s = shard_of("w_up", Partition::expert_rows, {12, 6}, 4, 1, 2);
  EXPECT_EQ(s.start, 8);
  EXPECT_EQ(s.count, 4);
  EXPECT_THROW(shard_of("w_up", Partition::expert_rows, {4, 6}, 4, 0, 2), Error);
  EXPECT_THROW(shard_of("wo", Partition::row, {6, 9}, 0, 0, 2), Error);  // 9 columns over 2 ranks
  for (int size : {1, 2, 3, 4, 7})  // balanced blocks cover 0..n-1 once, sizes differ by at most one
    for (int64_t n : {7, 8, 102}) {
      int64_t next = 0;
      for (int r = 0; r < size; ++r) {
        Block b = balanced_block(n, r, size);
        EXPECT_EQ(b.start, next);
        EXPECT_TRUE(b.count == n / size || b.count == n / size + 1);
        next += b.count;
      }
      EXPECT_EQ(next, n);
    }
  // slice_shard cuts columns of a row-major matrix.
  Tensor t = Tensor::empty({2, 4}, DType::f32);
  for (int i = 0; i < 8; ++i) t.data<float>()[i] = static_cast<float>(i);
  Tensor c = slice_shard(t, Shard{1, 2, 2});
  EXPECT_EQ(c.shape(), (Shape{2, 2}));
  EXPECT_EQ(c.data<float>()[0], 2.0f);
  EXPECT_EQ(c.data<float>()[3], 7.0f);
}

// ---- communicators ---------------------------------------------------------------------------

// Every collective on the groups of `ctx`, checked against the sums each rank can compute.
void check_collectives(const ParallelContext& ctx) {
  Communicator& c = *ctx.world;
  const int n = c.size(), r = c.rank();
  const CommTraffic before = ctx.log->traffic();
  std::vector<float> f = {1.0f + r, 2.0f * r};
  c.all_reduce(f.data(), 2, CommType::f32);
  EXPECT_EQ(f[0], n + n * (n - 1) / 2.0f);
  EXPECT_EQ(f[1], static_cast<float>(n * (n - 1)));
  std::vector<double> d = {0.5 * (r + 1)};
  c.all_reduce(d.data(), 1, CommType::f64);
  EXPECT_DOUBLE_EQ(d[0], 0.25 * n * (n + 1));
  EXPECT_EQ(c.sum(int64_t{1} << 40), (int64_t{1} << 40) * n);
  // reduce_scatter: rank j receives the sum of every rank's block j.
  std::vector<double> send(2 * n), recv(2);
  for (int j = 0; j < 2 * n; ++j) send[j] = 100.0 * r + j;
  c.reduce_scatter(send.data(), recv.data(), 2, CommType::f64);
  EXPECT_DOUBLE_EQ(recv[0], 100.0 * n * (n - 1) / 2 + n * (2 * r));
  EXPECT_DOUBLE_EQ(recv[1], 100.0 * n * (n - 1) / 2 + n * (2 * r + 1));
  // all_gather
  std::vector<int64_t> mine = {r, -r}, all(2 * n);
  c.all_gather(mine.data(), all.data(), 2, CommType::i64);
  for (int j = 0; j < n; ++j) {
    EXPECT_EQ(all[2 * j], j);
    EXPECT_EQ(all[2 * j + 1], -j);
  }
  // all_to_all with per-rank counts: rank i sends i + j + 1 values to rank j, each 1000i + j.
  std::vector<int64_t> sc(n), rc(n);
  std::vector<float> out, in;
  for (int j = 0; j < n; ++j) {
    sc[j] = r + j + 1, rc[j] = j + r + 1;
    for (int k = 0; k < sc[j]; ++k) out.push_back(1000.0f * r + j);
  }
  int64_t total_in = 0;
  for (int64_t x : rc) total_in += x;
  in.assign(total_in, -1.0f);
  c.all_to_all(out.data(), sc, in.data(), rc, CommType::f32);
  size_t pos = 0;
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < rc[j]; ++k) EXPECT_EQ(in[pos++], 1000.0f * j + r) << "from rank " << j;
  // broadcast from the last rank
  std::vector<double> b = {static_cast<double>(r)};
  c.broadcast(b.data(), 1, CommType::f64, n - 1);
  EXPECT_EQ(b[0], n - 1);
  c.barrier();
  // The log saw them all, completed.
  auto recent = ctx.log->recent();
  ASSERT_FALSE(recent.empty());
  EXPECT_EQ(recent.back().op, "barrier");
  EXPECT_TRUE(recent.back().done);
  EXPECT_NE(ctx.log->format().find("world all_to_all"), std::string::npos) << ctx.log->format();
  // The traffic counted for them (docs/parallelism.md, "Communication volume"); nothing on one rank.
  const CommTraffic t = ctx.log->traffic().since(before);
  if (n == 1) {
    EXPECT_TRUE(t.groups.empty()) << t.summary();
  } else {
    auto at = [&](const char* op) { return t.groups.at("world").at(op); };
    EXPECT_EQ(at("all_reduce").bytes, 2 * 4 + 8 + 8u);  // buffers: 2 fp32, 1 fp64, sum(int64)
    EXPECT_EQ(at("all_reduce").calls, 3u);
    EXPECT_EQ(at("reduce_scatter").bytes, 2u * n * 8);  // the whole input
    EXPECT_EQ(at("all_gather").bytes, 2 * 8u);          // this rank's part
    int64_t to_others = 0;
    for (int j = 0; j < n; ++j) to_others += j == r ? 0 : sc[j];
    EXPECT_EQ(at("all_to_all").bytes, static_cast<uint64_t>(to_others) * 4);  // not the block kept
    EXPECT_EQ(at("broadcast").bytes, r == n - 1 ? 8u : 0u);                    // the root's buffer
    EXPECT_EQ(at("barrier").bytes, 0u);
    EXPECT_EQ(at("barrier").calls, 1u);
    EXPECT_EQ(t.bytes("world"), t.total_bytes());
    EXPECT_EQ(t.total_calls(), 8u);
  }

  // Gradient averaging: bucketed (tiny buckets: several of them), replicated and expert
  // parameters, each rank's gradient filled with its rank.
  ParameterSet ps(DType::f32, Device::cpu);
  ps.add("a", {3, 4}, Partition::replicated, Init::ones, 0, false);
  ps.add("w_up", {8, 4}, Partition::expert_rows, Init::ones, 0, true, 4);
  ps.add("b", {5}, Partition::column, Init::ones, 0, false);
  for (Parameter* p : ps.all())
    for (int64_t i = 0; i < p->grad.numel(); ++i) p->grad.data<float>()[i] = static_cast<float>(r + i);
  GradientSync sync(ps.all(), ctx, GradientSync::Options{64});
  if (ctx.dp->size() > 1) EXPECT_GE(sync.num_buckets(), 2u);
  sync.finish_grad_sync();
  const int dp = ctx.dp->size();
  for (Parameter* p : ps.all()) {
    for (int64_t i = 0; i < p->grad.numel(); ++i)
      ASSERT_FLOAT_EQ(p->grad.data<float>()[i], (dp - 1) / 2.0f + i) << p->name << "[" << i << "]";
  }
}

TEST(Communicator, SingleRankIsTheSameCodePath) {
  if (std::getenv("DECOTRON_MPI_WORKER")) GTEST_SKIP() << "inside the two-rank worker";
  auto ctx = make_parallel_context(ParallelConfig{}, Device::cpu);
  ASSERT_EQ(ctx->world->size(), 1);
  for (auto* g : {ctx->tp.get(), ctx->dp.get(), ctx->ep.get(), ctx->edp.get()}) EXPECT_EQ(g->size(), 1);
  EXPECT_TRUE(ctx->is_main());
  check_collectives(*ctx);
}

// Run by the next test under mpirun (skipped otherwise): the collectives on two ranks, then on
// the groups of a tensor-parallel grid (tp 2: the dp group has one rank).
TEST(MpiWorker, Collectives) {
  if (!std::getenv("DECOTRON_MPI_WORKER")) GTEST_SKIP() << "runs under mpirun (ParallelMpi.CollectivesOnTwoRanks)";
  auto ctx = make_parallel_context(ParallelConfig{}, Device::cpu);
  ASSERT_EQ(ctx->world->size(), 2);
  EXPECT_EQ(ctx->dp->size(), 2);
  check_collectives(*ctx);
  ParallelConfig tp2;
  tp2.tensor = 2;
  auto ctx2 = make_parallel_context(tp2, Device::cpu);
  EXPECT_EQ(ctx2->tp->size(), 2);
  EXPECT_EQ(ctx2->dp->size(), 1);
  double v = ctx2->tp->rank() + 1.0;
  EXPECT_EQ(ctx2->tp->sum(v), 3.0);
}

// A layout of `ctx` (tensor parallel, with or without sequence parallelism, data parallel over
// ctx.dp with the batch split as the trainer splits it) equals one rank on the whole batch, in
// `dt`: the loss, the regularizer, the routing counts, and every parameter's gradient after one
// forward/backward (the shards gathered into whole tensors), each within `rtol` of the largest
// entry. Prints the largest relative differences seen.
void expect_layout_equals_one_rank(const ParallelContext& ctx, bool sequence, DType dt, double rtol) {
  ModelConfig m;
  m.vocab_size = 64, m.seq_len = 8, m.hidden = 32, m.layers = 3, m.heads = 4, m.ffn_hidden = 64, m.experts = 8;
  m.expert_width = 8, m.shared_expert_width = 16, m.dense_layers = 1, m.parameter_parity = false;
  m.init_std = 0.2;  // large enough that routers activate a mix of experts
  const int dp = ctx.dp->size(), dp_rank = ctx.layout.dp_rank;
  const int64_t b = 2, B = b * dp;  // per data-parallel rank, whole batch
  Transformer one(m, dt, Device::cpu), par(m, dt, Device::cpu, ctx.tp.get(), nullptr, sequence);
  GradientSync sync(par.params().all(), ctx);  // the gradients now live in its buffers
  one.params().initialize(11);
  par.params().initialize(11);
  const BatchShape whole{B, m.seq_len}, mine{b, m.seq_len};
  Tensor tok = Tensor::empty({whole.tokens()}, DType::i32), tgt = Tensor::empty({whole.tokens()}, DType::i32);
  for (int64_t i = 0; i < whole.tokens(); ++i) {
    tok.data<int32_t>()[i] = static_cast<int32_t>(rng::random4(5, 1, i).v[0] % m.vocab_size);
    tgt.data<int32_t>()[i] = static_cast<int32_t>(rng::random4(5, 2, i).v[0] % m.vocab_size);
  }
  Tensor my_tok = tok.rows(dp_rank * mine.tokens(), mine.tokens()).clone();
  Tensor my_tgt = tgt.rows(dp_rank * mine.tokens(), mine.tokens()).clone();
  RegularizerSpec reg;
  reg.kind = RegularizerSpec::Kind::entropy, reg.coef = 0.05;
  ForwardResult a = one.forward(tok, tgt, whole, reg, 0.5, true);
  one.backward(0.5);
  ForwardResult f = par.forward(my_tok, my_tgt, mine, reg, 0.5, true);
  par.backward(0.5);
  // What the trainer does after the micro-batches.
  tp_all_reduce_sequence_parallel_grads(*ctx.tp, par.params().all());
  sync.finish_grad_sync();
  const std::string at = cat(dtype_name(dt), " tp ", ctx.tp->size(), " dp ", dp, sequence ? " sequence" : "");
  // Each data-parallel rank's loss is a sum over its tokens, its regularizer a mean over them.
  const double lm = ctx.dp->sum(f.lm_loss_sum), reg_loss = ctx.dp->sum(f.reg_loss) / dp;
  EXPECT_NEAR(lm, a.lm_loss_sum, rtol * std::fabs(a.lm_loss_sum)) << at;
  EXPECT_NEAR(reg_loss, a.reg_loss, rtol * std::fabs(a.reg_loss) + 1e-15) << at;
  ASSERT_EQ(a.routing.size(), f.routing.size());
  for (size_t l = 0; l < a.routing.size(); ++l) {
    std::vector<int64_t> counts = f.routing[l].active_per_expert;
    ctx.dp->sum_in_place(counts);
    EXPECT_EQ(a.routing[l].active_per_expert, counts) << at << " layer " << l;
    EXPECT_GT(a.routing[l].active_pairs, 0);
    EXPECT_LT(a.routing[l].active_pairs, whole.tokens() * m.experts);
  }
  auto ps1 = one.params().all(), ps2 = par.params().all();
  ASSERT_EQ(ps1.size(), ps2.size());
  int split = 0, partial = 0;
  double worst = 0;
  std::string worst_name;
  for (size_t i = 0; i < ps1.size(); ++i) {
    ASSERT_EQ(ps1[i]->name, ps2[i]->name);
    split += ps2[i]->shard_dim >= 0;
    partial += ps2[i]->sequence_parallel;
    Tensor v = tp_gather_shards(*ctx.tp, ps2[i]->value, ps2[i]->shard_dim);
    Tensor g = tp_gather_shards(*ctx.tp, ps2[i]->grad, ps2[i]->shard_dim);
    ASSERT_EQ(v.shape(), ps1[i]->value.shape()) << ps1[i]->name;
    double scale = 0, err = 0, verr = 0;
    for (int64_t k = 0; k < v.numel(); ++k) {
      scale = std::max(scale, std::fabs(ps1[i]->grad.item(k)));
      err = std::max(err, std::fabs(ps1[i]->grad.item(k) - g.item(k)));
      verr = std::max(verr, std::fabs(ps1[i]->value.item(k) - v.item(k)));
    }
    EXPECT_EQ(verr, 0.0) << ps1[i]->name << ": the same initial weights";
    EXPECT_GT(scale, 0.0) << ps1[i]->name;
    EXPECT_LE(err, rtol * scale) << at << " " << ps1[i]->name << " (" << partition_name(ps1[i]->partition) << ")";
    if (scale > 0 && err / scale >= worst) worst = err / scale, worst_name = ps1[i]->name;
  }
  EXPECT_GE(split, 10);  // attention, FFN, experts, embedding and LM head are split
  EXPECT_EQ(partial, sequence ? 2 * m.layers + 1 : 0);  // the norms' weights
  // Transformer::logits (inference, evaluation) returns whole logits [T, V] on every layout.
  Tensor la = one.logits(my_tok, mine), lb = par.logits(my_tok, mine);
  ASSERT_EQ(la.shape(), lb.shape());
  double lscale = 0, lerr = 0;
  for (int64_t k = 0; k < la.numel(); ++k)
    lscale = std::max(lscale, std::fabs(la.item(k))), lerr = std::max(lerr, std::fabs(la.item(k) - lb.item(k)));
  EXPECT_LE(lerr, rtol * lscale) << at << " logits";
  if (ctx.world->rank() == 0)
    std::printf("%s: loss rel diff %.2e, largest gradient rel diff %.2e (%s)\n", at.c_str(),
                std::fabs(lm - a.lm_loss_sum) / std::fabs(a.lm_loss_sum), worst, worst_name.c_str());
}

// Tensor parallel on two ranks equals one rank: fp64 within 1e-10, fp32 within 1e-4.
TEST(MpiWorker, TensorParallelEqualsOneRank) {
  if (!std::getenv("DECOTRON_MPI_WORKER")) GTEST_SKIP() << "runs under mpirun (ParallelMpi.CollectivesOnTwoRanks)";
  ParallelConfig pc;
  pc.tensor = 2;
  auto ctx = make_parallel_context(pc, Device::cpu);
  expect_layout_equals_one_rank(*ctx, false, DType::f64, 1e-10);
  expect_layout_equals_one_rank(*ctx, false, DType::f32, 1e-4);
}

// The same with sequence parallelism: the residual stream and the norms on half the tokens.
TEST(MpiWorker, SequenceParallelEqualsOneRank) {
  if (!std::getenv("DECOTRON_MPI_WORKER")) GTEST_SKIP() << "runs under mpirun (ParallelMpi.CollectivesOnTwoRanks)";
  ParallelConfig pc;
  pc.tensor = 2, pc.sequence = true;
  auto ctx = make_parallel_context(pc, Device::cpu);
  expect_layout_equals_one_rank(*ctx, true, DType::f64, 1e-10);
  expect_layout_equals_one_rank(*ctx, true, DType::f32, 1e-4);
}

// The vocabulary-parallel cross-entropy on two ranks equals ops::cross_entropy on the whole
// logits, in fp64: the loss on every rank, and each rank's gradient columns.
TEST(MpiWorker, VocabParallelCrossEntropy) {
  if (!std::getenv("DECOTRON_MPI_WORKER")) GTEST_SKIP() << "runs under mpirun (ParallelMpi.CollectivesOnTwoRanks)";
  ParallelConfig pc;
  pc.tensor = 2;
  auto ctx = make_parallel_context(pc, Device::cpu);
  Communicator& tp = *ctx->tp;
  const int64_t T = 11, V = 30;
  Tensor logits = Tensor::empty({T, V}, DType::f64), targets = Tensor::empty({T}, DType::i32);
  for (int64_t i = 0; i < logits.numel(); ++i) logits.data<double>()[i] = 4.0 * rng::normal(3, 1, i);
  for (int64_t t = 0; t < T; ++t) targets.data<int32_t>()[t] = static_cast<int32_t>((t * 7) % V);
  Tensor want = logits.clone();
  const double loss_want = ops::cross_entropy(want, targets, 0.25);
  Tensor mine = tp_slice_columns(logits, tp.rank(), tp.size());
  const double loss = vocab_parallel_cross_entropy(tp, mine, targets, tp.rank() * (V / 2), 0.25);
  EXPECT_NEAR(loss, loss_want, 1e-12 * std::fabs(loss_want));
  Tensor got = tp_gather_columns(tp, mine);
  double err = 0;
  for (int64_t i = 0; i < got.numel(); ++i) err = std::max(err, std::fabs(got.item(i) - want.item(i)));
  EXPECT_LE(err, 1e-15);
  // A target outside the whole vocabulary is an error on every rank (before any collective).
  targets.data<int32_t>()[3] = static_cast<int32_t>(V);
  Tensor again = tp_slice_columns(logits, tp.rank(), tp.size());
  EXPECT_THROW(vocab_parallel_cross_entropy(tp, again, targets, tp.rank() * (V / 2), 0.0), Error);
}

// Data 2 x tensor 2 with sequence parallelism on four ranks equals one rank.
TEST(MpiWorker4, SequenceAndDataParallelEqualsOneRank) {
  if (!std::getenv("DECOTRON_MPI_WORKER")) GTEST_SKIP() << "runs under mpirun (ParallelMpi.FourRankLayouts)";
  ParallelConfig pc;
  pc.tensor = 2, pc.sequence = true;
  auto ctx = make_parallel_context(pc, Device::cpu);
  ASSERT_EQ(ctx->world->size(), 4);
  ASSERT_EQ(ctx->dp->size(), 2);
  expect_layout_equals_one_rank(*ctx, true, DType::f64, 1e-10);
  expect_layout_equals_one_rank(*ctx, true, DType::f32, 1e-4);
  pc.sequence = false;  // and without: tensor 2 x data 2
  auto ctx2 = make_parallel_context(pc, Device::cpu);
  expect_layout_equals_one_rank(*ctx2, false, DType::f64, 1e-10);
}

// Without a tensor-parallel group there are no tokens to split: an error, not ignored.
TEST(SequenceParallel, NeedsATensorParallelGroup) {
  ModelConfig m;
  m.vocab_size = 16, m.seq_len = 4, m.hidden = 8, m.layers = 1, m.heads = 2, m.ffn_hidden = 16;
  m.arch = "dense";
  try {
    Transformer t(m, DType::f32, Device::cpu, nullptr, nullptr, true);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.tensor > 1"), std::string::npos) << e.what();
  }
}

TEST(ParallelMpi, CollectivesOnTwoRanks) {
  const std::string dir = fresh_dir("collectives");
  char self[4096] = {0};
  ASSERT_GT(readlink("/proc/self/exe", self, sizeof self - 1), 0);
  int rc = run(std::string("DECOTRON_MPI_WORKER=1 ") + kMpirun + " -x DECOTRON_MPI_WORKER -np 2 " + self +
                   " --gtest_color=no --gtest_filter=MpiWorker.*",
               dir + "/log", 60);
  const std::string log = read_file(dir + "/log");
  EXPECT_EQ(rc, 0) << log;
  size_t passed = 0;
  for (size_t p = log.find("[  PASSED  ] 4 tests"); p != std::string::npos; p = log.find("[  PASSED  ] 4 tests", p + 1))
    ++passed;
  EXPECT_EQ(passed, 2u) << log;
  EXPECT_EQ(log.find("SKIPPED"), std::string::npos) << log;
  std::printf("%s", log.c_str());  // the workers' measured differences
}

// The four-rank workers: tensor 2 x data 2, with and without sequence parallelism.
TEST(ParallelMpi, FourRankLayouts) {
  const std::string dir = fresh_dir("four_ranks");
  char self[4096] = {0};
  ASSERT_GT(readlink("/proc/self/exe", self, sizeof self - 1), 0);
  int rc = run(std::string("DECOTRON_MPI_WORKER=1 ") + kMpirun + " -x DECOTRON_MPI_WORKER -np 4 " + self +
                   " --gtest_color=no --gtest_filter=MpiWorker4.*",
               dir + "/log", 120);
  const std::string log = read_file(dir + "/log");
  EXPECT_EQ(rc, 0) << log;
  size_t passed = 0;
  for (size_t p = log.find("[  PASSED  ] 1 test."); p != std::string::npos; p = log.find("[  PASSED  ] 1 test.", p + 1))
    ++passed;
  EXPECT_EQ(passed, 4u) << log;
  EXPECT_EQ(log.find("SKIPPED"), std::string::npos) << log;
  std::printf("%s", log.c_str());
}

// The benchmark checks every op's result on two ranks in the same run as it times them.
TEST(ParallelMpi, BenchCommChecksEveryOp) {
  const std::string dir = fresh_dir("bench");
  for (const char* op : {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}) {
    const int rc = run(std::string(kMpirun) + " -np 2 " + DECOTRON_BINARY + " bench-comm --op " + op +
                           " --min-bytes 1024 --max-bytes 65536 --iters 2",
                       dir + "/log", 60);
    const std::string log = read_file(dir + "/log");
    EXPECT_EQ(rc, 0) << op << ": " << log;
    EXPECT_NE(log.find(std::string(op) + " on 2 ranks"), std::string::npos) << log;
    size_t oks = 0;
    for (size_t p = log.find("  ok\n"); p != std::string::npos; p = log.find("  ok\n", p + 1)) ++oks;
    EXPECT_EQ(oks, 4u) << op << ": " << log;  // 1, 4, 16 and 64 KiB
    EXPECT_EQ(log.find("WRONG"), std::string::npos) << log;
  }
}

// ---- data-parallel training ------------------------------------------------------------------

// 20 steps in several layouts against one rank: data parallel on 2 and 4 ranks, tensor
// parallel on 2 (vocabulary-parallel cross-entropy), tensor 2 x data 2, and both tensor layouts
// with sequence parallelism. The same samples per step, so the same trajectory up to the order
// of floating-point sums; the checkpoints hold the same whole tensors.
TEST(ParallelMpi, LayoutsMatchSingleRank) {
  const std::string dir = fresh_dir("layouts");
  const std::string cfg = tiny_config(dir, 20, 8, 60);
  ASSERT_EQ(run(train_cmd(cfg, dir + "/one"), dir + "/one.log"), 0) << read_file(dir + "/one.log");
  const auto ref = train_records(dir + "/one/metrics.jsonl");
  ASSERT_EQ(ref.size(), 22u);  // 20 steps + 2 evaluations
  const auto ref_ckpt = CheckpointManager::read_newest_good(dir + "/one/checkpoints");
  struct Layout {
    std::string name;
    int np, tensor;
    bool sequence;
  };
  for (const Layout& l : {Layout{"dp2", 2, 1, false}, Layout{"dp4", 4, 1, false}, Layout{"tp2", 2, 2, false},
                          Layout{"tp2dp2", 4, 2, false}, Layout{"tp2sp", 2, 2, true}, Layout{"tp2dp2sp", 4, 2, true}}) {
    const std::string run_dir = dir + "/" + l.name, log_path = run_dir + ".log";
    ASSERT_EQ(run(std::string(kMpirun) + " -np " + std::to_string(l.np) + " " + train_cmd(cfg, run_dir) +
                      " --set parallel.tensor=" + std::to_string(l.tensor) +
                      (l.sequence ? " --set parallel.sequence=true" : ""),
                  log_path),
              0)
        << read_file(log_path);
    const std::string log = read_file(log_path);
    EXPECT_NE(log.find("tensor " + std::to_string(l.tensor) + " x data " + std::to_string(l.np / l.tensor)),
              std::string::npos)
        << log;  // the layout, printed once
    EXPECT_EQ(log.find("training:"), log.rfind("training:")) << "only rank 0 prints: " << log;
    const auto got = train_records(run_dir + "/metrics.jsonl");
    ASSERT_EQ(got.size(), ref.size()) << "only rank 0 writes metrics.jsonl";
    double loss_diff = 0, other_diff = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const std::string at = l.name + " record " + std::to_string(i);
      if (ref[i].contains("val_loss")) {
        loss_diff = std::max(loss_diff, expect_close(got[i]["val_loss"], ref[i]["val_loss"], 1e-5, at + " val_loss"));
        continue;
      }
      EXPECT_EQ(got[i]["iter"], ref[i]["iter"]);
      EXPECT_EQ(got[i]["consumed_samples"], ref[i]["consumed_samples"]) << at;
      for (const char* key : {"lm_loss", "reg_loss", "act_ratio", "entropy", "grad_norm", "reg_coef"}) {
        const double d = expect_close(got[i][key], ref[i][key], 1e-5, at + " " + key);
        double& worst = std::string(key) == "lm_loss" ? loss_diff : other_diff;
        worst = std::max(worst, d);
      }
    }
    ASSERT_EQ(CheckpointManager::latest(run_dir + "/checkpoints"), run_dir + "/checkpoints/iter_0000020.h5");
    const auto ckpt = CheckpointManager::read_newest_good(run_dir + "/checkpoints");
    ASSERT_EQ(ckpt.data.model.size(), ref_ckpt.data.model.size());
    double ckpt_diff = 0;
    for (size_t i = 0; i < ckpt.data.model.size(); ++i) {
      const auto &a = ckpt.data.model[i], &b = ref_ckpt.data.model[i];
      ASSERT_EQ(a.name, b.name);
      ASSERT_EQ(a.shape, b.shape) << l.name << " " << a.name << ": checkpoints hold whole tensors";
      double diff = 0, scale = 0;
      for (size_t k = 0; k < a.data.size(); ++k)
        diff = std::max(diff, std::fabs(double(a.data[k]) - b.data[k])), scale = std::max(scale, std::fabs(double(b.data[k])));
      // The router amplifies the layouts' other summation order (a logit near ReLU's kink flips a
      // pair): up to 1.2e-4 of its largest weight after 20 steps with OpenBLAS's AVX-512
      // kernels, 4e-5 with the AVX2 ones (test_distributed_optimizer.cpp); the rest stay ~1e-5.
      const bool router = a.name.find("w_router") != std::string::npos;
      EXPECT_LE(diff, (router ? 1e-3 : 1e-4) * scale) << l.name << " " << a.name;
      if (scale > 0) ckpt_diff = std::max(ckpt_diff, diff / scale);
    }
    std::printf("%s vs one rank, largest relative difference over 20 steps: loss %.2e, other metrics %.2e, "
                "checkpoint tensors %.2e\n", l.name.c_str(), loss_diff, other_diff, ckpt_diff);
  }
  // Resuming reads the whole tensors and cuts each rank's shard: 5 more steps on TP2 follow
  // the single-rank run's 5 more steps.
  const std::string more = " --set train.iters=25";
  ASSERT_EQ(run(train_cmd(cfg, dir + "/one") + more, dir + "/one2.log"), 0) << read_file(dir + "/one2.log");
  ASSERT_EQ(run(std::string(kMpirun) + " -np 2 " + train_cmd(cfg, dir + "/tp2") + " --set parallel.tensor=2" + more,
                dir + "/tp2b.log"),
            0)
      << read_file(dir + "/tp2b.log");
  EXPECT_NE(read_file(dir + "/tp2b.log").find("resumed from"), std::string::npos);
  const auto a = train_records(dir + "/one/metrics.jsonl"), b = train_records(dir + "/tp2/metrics.jsonl");
  ASSERT_EQ(a.size(), b.size());
  ASSERT_EQ(a.back()["iter"], 25);
  for (size_t i = 22; i < a.size(); ++i)
    if (!a[i].contains("val_loss")) expect_close(b[i]["lm_loss"], a[i]["lm_loss"], 1e-5, "resumed record " + std::to_string(i));
}

// The bytes each step sends, as counted by the communicators and written to metrics.jsonl,
// equal the volume formulas exactly: data parallel on 2 ranks (the gradient all-reduce and the
// statistics), tensor parallel on 2, and tensor 2 x data 2. scripts/perf_model.py's formulas
// agree with the same runs.
TEST(ParallelMpi, CommBytesPerStepMatchTheFormulas) {
  const std::string dir = fresh_dir("comm_bytes");
  const std::string cfg_path = tiny_config(dir, 7, 8, 60);  // warmup 2 + decay 5
  const Config cfg = load_config(cfg_path);
  struct Layout {
    std::string name;
    int np, tensor;
  };
  for (const Layout& l : {Layout{"dp2", 2, 1}, Layout{"tp2", 2, 2}, Layout{"tp2dp2", 4, 2}}) {
    const std::string run_dir = dir + "/" + l.name, log_path = run_dir + ".log";
    ASSERT_EQ(run(std::string(kMpirun) + " -np " + std::to_string(l.np) + " " + train_cmd(cfg_path, run_dir) +
                      " --set parallel.tensor=" + std::to_string(l.tensor),
                  log_path),
              0)
        << read_file(log_path);
    const GroupOpBytes want = expected_step_bytes(cfg, l.tensor, l.np / l.tensor);
    int steps = 0;
    for (const auto& rec : train_records(run_dir + "/metrics.jsonl")) {
      if (rec.contains("val_loss")) continue;
      ++steps;
      const std::string at = l.name + " iter " + rec["iter"].dump();
      ASSERT_TRUE(rec.contains("comm_bytes") && rec.contains("comm_bytes_by_op")) << at << ": " << rec.dump();
      GroupOpBytes got;
      for (const auto& [group, ops] : rec["comm_bytes_by_op"].items())
        for (const auto& [op, bytes] : ops.items()) got[group][op] = bytes.get<int64_t>();
      EXPECT_EQ(got, want) << at << ": " << rec["comm_bytes_by_op"].dump();
      for (const auto& [group, ops] : want) {
        int64_t sum = 0;
        for (const auto& [op, bytes] : ops) sum += bytes;
        EXPECT_EQ(rec["comm_bytes"][group].get<int64_t>(), sum) << at << " " << group;
      }
    }
    EXPECT_EQ(steps, 7) << l.name;
    EXPECT_NE(read_file(log_path).find("communication on rank 0 (whole run"), std::string::npos) << read_file(log_path);
    // The same formulas in Python (the performance model's `volumes` mode) against the same run.
    if (std::system("python3 --version > /dev/null 2>&1") == 0) {
      const std::string py_log = run_dir + ".py.log";
      EXPECT_EQ(run("python3 " DECOTRON_SOURCE_DIR "/scripts/perf_model.py volumes " + run_dir + " --np " +
                        std::to_string(l.np),
                    py_log),
                0)
          << read_file(py_log);
    }
  }
}

// Ranks launched with different settings are refused before training, and the job ends.
TEST(ParallelMpi, DifferentConfigsOnRanksAreRefused) {
  const std::string dir = fresh_dir("mismatch");
  const std::string cfg = tiny_config(dir, 20, 8, 30);
  const int rc = run(std::string(kMpirun) + " -np 1 " + train_cmd(cfg, dir + "/run") + " --set train.lr=1e-3 : -np 1 " +
                         train_cmd(cfg, dir + "/run") + " --set train.lr=2e-3",
                     dir + "/log", 60);
  const std::string log = read_file(dir + "/log");
  EXPECT_NE(rc, 0) << log;
  EXPECT_NE(rc, -1) << "hung: " << log;
  EXPECT_NE(log.find("the resolved config differs between ranks (rank(s) 1 vs rank 0)"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(dir + "/run/metrics.jsonl")) << "no step may have run";
}

// SIGTERM reaching one rank only: every rank stops after the same iteration, rank 0 saves it;
// the run resumed on two ranks follows the single-rank trajectory (constant learning rate, so
// that a shorter run is a prefix of a longer one).
TEST(ParallelMpi, SignalOnOneRankStopsAllAtTheSameStepAndResumes) {
  const std::string dir = fresh_dir("sigterm");
  const std::string cfg = tiny_config(dir, 2000, 8, 30, "constant");
  const std::string tag = "DECOTRON_TEST_TAG=sigterm" + std::to_string(getpid());
  pid_t job = spawn(tag + " " + kMpirun + " -x DECOTRON_TEST_TAG -np 2 " + train_cmd(cfg, dir + "/run"),
                    dir + "/log");
  const std::string metrics = dir + "/run/metrics.jsonl";
  auto t0 = std::chrono::steady_clock::now();
  pid_t rank1 = 0;
  while ((rank1 == 0 || last_iter(metrics) < 3) &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30)) {
    if (!rank1) rank1 = find_rank(tag, 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_GT(rank1, 0) << read_file(dir + "/log");
  kill(rank1, SIGTERM);
  const int rc = wait_exit(job, 60);
  const std::string log = read_file(dir + "/log");
  ASSERT_EQ(rc, 0) << log;
  const auto loaded = CheckpointManager::read_newest_good(dir + "/run/checkpoints");
  const int64_t stopped = loaded.data.state.iteration;
  EXPECT_GE(stopped, 3);
  EXPECT_LT(stopped, 2000);
  EXPECT_EQ(last_iter(metrics), stopped);
  EXPECT_NE(log.find("signal 15: stopping after iteration " + std::to_string(stopped)), std::string::npos) << log;
  EXPECT_NE(log.find("stop request: stopping after iteration " + std::to_string(stopped)), std::string::npos) << log;

  const std::string more = " --set train.iters=" + std::to_string(stopped + 3);
  ASSERT_EQ(run(std::string(kMpirun) + " -np 2 " + train_cmd(cfg, dir + "/run") + more, dir + "/resume.log"), 0)
      << read_file(dir + "/resume.log");
  ASSERT_EQ(run(train_cmd(cfg, dir + "/one") + more, dir + "/one.log"), 0) << read_file(dir + "/one.log");
  std::vector<nlohmann::json> got, ref;
  for (const auto& j : train_records(metrics))
    if (!j.contains("val_loss")) got.push_back(j);
  for (const auto& j : train_records(dir + "/one/metrics.jsonl"))
    if (!j.contains("val_loss")) ref.push_back(j);
  ASSERT_EQ(got.size(), static_cast<size_t>(stopped + 3));
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_EQ(got[i]["consumed_samples"], ref[i]["consumed_samples"]) << i;
    for (const char* key : {"lm_loss", "grad_norm", "reg_coef", "act_ratio"})
      expect_close(got[i][key], ref[i][key], 1e-5, "record " + std::to_string(i) + " " + key);
  }
}

// A rank that stops responding (SIGSTOP) makes the others' next collective time out: the job
// aborts within parallel.timeout_s with the watchdog's diagnostic instead of hanging.
TEST(ParallelMpi, WatchdogAbortsWhenARankHangs) {
  const std::string dir = fresh_dir("watchdog");
  const std::string cfg = tiny_config(dir, 100000, 8, 2);
  const std::string tag = "DECOTRON_TEST_TAG=watchdog" + std::to_string(getpid());
  pid_t job = spawn(tag + " " + kMpirun + " -x DECOTRON_TEST_TAG -np 2 " + train_cmd(cfg, dir + "/run"),
                    dir + "/log");
  const std::string metrics = dir + "/run/metrics.jsonl";
  auto t0 = std::chrono::steady_clock::now();
  pid_t rank1 = 0;
  while ((rank1 == 0 || last_iter(metrics) < 2) &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30)) {
    if (!rank1) rank1 = find_rank(tag, 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_GT(rank1, 0) << read_file(dir + "/log");
  kill(rank1, SIGSTOP);
  auto t1 = std::chrono::steady_clock::now();
  const int rc = wait_exit(job, 40);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  kill(rank1, SIGKILL);  // in case the launcher left it stopped
  const std::string log = read_file(dir + "/log");
  ASSERT_NE(rc, -1) << "the job hung: " << log;
  EXPECT_NE(rc, 0) << log;
  EXPECT_LT(took, 30) << log;
  EXPECT_NE(log.find("watchdog: rank 0: collective #"), std::string::npos) << log;
  EXPECT_NE(log.find("did not complete within"), std::string::npos) << log;
  EXPECT_NE(log.find("last collectives issued by rank 0"), std::string::npos) << log;
  EXPECT_NE(log.find("<- not completed"), std::string::npos) << log;
}

// parallel.backend: nccl moves GPU buffers only; asking for it on the CPU is a clear error.
TEST(ParallelBackend, NcclNeedsTheGpu) {
  const std::string dir = fresh_dir("backend");
  const std::string cfg = tiny_config(dir, 8, 4, 60);
  ASSERT_NE(run(train_cmd(cfg, dir + "/run") + " --set parallel.backend=nccl", dir + "/log"), 0);
  const std::string log = read_file(dir + "/log");
  EXPECT_NE(log.find("parallel.backend"), std::string::npos) << log;
  // mpi is accepted everywhere (the CPU's backend anyway).
  EXPECT_EQ(run(train_cmd(cfg, dir + "/run2") + " --set parallel.backend=mpi", dir + "/log2"), 0)
      << read_file(dir + "/log2");
}
