// Data-parallel gradient buckets and the distributed optimizer: the buffer layout arithmetic
// (padding, shards, pieces) for odd sizes; on 2 and 3 ranks through mpirun, the bucket
// collectives, the sharded AdamW against the replicated one and the overlapped launch against
// the plain one; and `decotron train` on 2 and 4 ranks with parallel.distributed_optimizer
// against one rank, overlap on against off bit for bit, and checkpoints crossing layouts.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint.h"
#include "checkpoint/manager.h"
#include "model/transformer.h"
#include "mpi_test_util.h"
#include "parallel/grad_buffer.h"
#include "parallel/grad_sync.h"
#include "parallel/process_groups.h"
#include "trainer/optimizer.h"

namespace fs = std::filesystem;
using namespace decotron;
using namespace decotron::mpi_test;

// ---- the layout ------------------------------------------------------------------------------

TEST(GradBufferLayout, PadsBucketsAndShardsOddSizes) {
  // Buckets of at most 12 elements over 4 shards: [7, 3] (10, padded to 12), [10, 1] (11 -> 12),
  // [5] (5 -> 8).
  BufferLayout l = make_buffer_layout({7, 3, 10, 1, 5}, 12, 4);
  ASSERT_EQ(l.buckets.size(), 3u);
  EXPECT_EQ(l.buckets[0].range, (Range{0, 12}));
  EXPECT_EQ(l.buckets[1].range, (Range{12, 24}));
  EXPECT_EQ(l.buckets[2].range, (Range{24, 32}));
  EXPECT_EQ(l.buckets[1].first, 2u);
  EXPECT_EQ(l.buckets[1].last, 4u);
  EXPECT_EQ(l.numel, 32);
  EXPECT_EQ(l.local_numel(), 8);
  EXPECT_EQ(l.params[2], (Range{12, 22}));
  EXPECT_EQ(l.params[4], (Range{24, 29}));
  EXPECT_EQ(l.shard(0, 3), (Range{9, 12}));
  EXPECT_EQ(l.shard(2, 1), (Range{26, 28}));
  EXPECT_EQ(l.local(1), (Range{3, 6}));
  EXPECT_EQ(l.local(2), (Range{6, 8}));
  // Rank 3: the last element of parameter 1, the last of 2 and all of 3; its shard of bucket 2
  // is padding only.
  auto p3 = l.pieces(3);
  ASSERT_EQ(p3.size(), 3u);
  EXPECT_EQ(p3[0].param, 1u);
  EXPECT_EQ(p3[0].in_param, (Range{2, 3}));
  EXPECT_EQ(p3[0].in_local, (Range{0, 1}));
  EXPECT_EQ(p3[1].param, 2u);
  EXPECT_EQ(p3[1].in_param, (Range{9, 10}));
  EXPECT_EQ(p3[1].in_local, (Range{3, 4}));
  EXPECT_EQ(p3[2].param, 3u);
  EXPECT_EQ(p3[2].in_local, (Range{4, 5}));

  // Any sizes: the ranks' pieces cover every parameter element exactly once, at the place its
  // bucket's shard puts it; shards of one rank never overlap.
  for (int shards : {1, 2, 3, 5, 8}) {
    const std::vector<int64_t> numels = {1, 13, 2, 64, 7, 7, 1, 30};
    BufferLayout m = make_buffer_layout(numels, 16, shards);
    int64_t sum = 0;
    for (int64_t n : numels) sum += n;
    if (shards == 1) EXPECT_EQ(m.numel, sum) << "no padding without shards";
    std::vector<std::vector<int>> seen(numels.size());
    for (size_t i = 0; i < numels.size(); ++i) seen[i].assign(numels[i], 0);
    for (const auto& b : m.buckets) {
      EXPECT_EQ(b.range.size() % shards, 0);
      EXPECT_LT(b.range.size() - (m.params[b.last - 1].end - b.range.begin), shards) << "padding below one row";
      if (b.last - b.first > 1) EXPECT_LE(m.params[b.last - 1].end - b.range.begin, 16) << "bucket over its size";
    }
    for (int r = 0; r < shards; ++r) {
      for (const auto& pc : m.pieces(r)) {
        ASSERT_EQ(pc.in_param.size(), pc.in_local.size());
        // The local position maps back to the flat position of the same element.
        size_t b = 0;
        while (!(m.local(b).begin <= pc.in_local.begin && pc.in_local.end <= m.local(b).end)) ++b;
        EXPECT_EQ(m.shard(b, r).begin + (pc.in_local.begin - m.local(b).begin),
                  m.params[pc.param].begin + pc.in_param.begin);
        for (int64_t k = pc.in_param.begin; k < pc.in_param.end; ++k) ++seen[pc.param][k];
      }
    }
    for (size_t i = 0; i < numels.size(); ++i)
      for (int64_t k = 0; k < numels[i]; ++k) ASSERT_EQ(seen[i][k], 1) << shards << " shards, param " << i << "[" << k << "]";
  }
  // A parameter larger than a bucket gets one of its own.
  BufferLayout big = make_buffer_layout({3, 40, 3}, 12, 4);
  ASSERT_EQ(big.buckets.size(), 3u);
  EXPECT_EQ(big.buckets[1].range, (Range{4, 44}));
}

// ---- on 2 and 3 ranks: the sync and the sharded optimizer ---------------------------------------

namespace {

// Another layout sums the gradients in another order, and the router amplifies the rounding:
// a logit near ReLU's kink activates a pair in one run and not the other, and Adam's moments of
// the router's small gradient entries move by much more than the weights. How much depends on
// OpenBLAS's kernels, chosen per CPU: after 20 steps of the tiny DECO the router weights differ
// by up to 4e-5 (relative to the tensor's largest entry) and their moments by 1.7e-4 with the
// AVX2 kernels (OPENBLAS_CORETYPE=Haswell), by 1.2e-4 and 5.7e-3 with the AVX-512 ones
// (SkylakeX). A wrong reduction or a lost shard moves them by 1e-2 to 1.
constexpr double kLayoutWeightTol = 5e-4, kLayoutMomentTol = 2e-2;

// A parameter set with odd sizes (one non-trainable, mixed weight decay), its gradient sync and
// its AdamW; tiny buckets, so that several exist and a rank's shard of one may be padding only.
struct Replica {
  ParameterSet ps{DType::f32, Device::cpu};
  std::unique_ptr<GradientSync> sync;
  std::unique_ptr<AdamW> opt;

  Replica(const ParallelContext& ctx, bool distributed, bool overlap_param_gather = false) {
    ps.add("embedding", {5, 3}, Partition::vocab, Init::normal, 0.5, true);
    ps.add("norm", {3}, Partition::replicated, Init::ones, 0, false);
    ps.add("w_up", {7, 3}, Partition::expert_rows, Init::normal, 0.5, true, 7);
    ps.add("g", {1}, Partition::expert_entries, Init::constant, 0.1, false);
    ps.add("b", {4}, Partition::replicated, Init::normal, 0.5, true);
    ps.add("fixed", {2}, Partition::replicated, Init::constant, 0.3, false).trainable = false;
    ps.add("head", {13}, Partition::column, Init::normal, 0.5, true);
    ps.initialize(7);
    GradientSync::Options o;
    o.bucket_bytes = 10 * sizeof(float);
    o.distributed_optimizer = distributed;
    o.overlap_param_gather = overlap_param_gather;
    sync = std::make_unique<GradientSync>(ps.all(), ctx, o);
    TrainConfig tc;
    tc.lr = 1e-2;
    opt = std::make_unique<AdamW>(ps, tc, sync.get());
  }
  // Each rank's own gradient, different per step.
  void fill_grads(int rank, int step) {
    int k = 0;
    for (Parameter* p : ps.all()) {
      ++k;
      for (int64_t i = 0; i < p->grad.numel(); ++i)
        p->grad.data<float>()[i] = static_cast<float>(std::sin(1.0 + i + 10.0 * rank + 100.0 * step + 1000.0 * k));
    }
  }
};

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

double max_diff(const Tensor& a, const Tensor& b) {
  double d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::fabs(a.item(i) - b.item(i)));
  return d;
}

}  // namespace

TEST(DistOptWorker, ShardedAdamWEqualsReplicatedAndOverlapIsBitIdentical) {
  if (!std::getenv("DECOTRON_MPI_WORKER")) GTEST_SKIP() << "runs under mpirun (DistributedOptimizer.OnTwoAndThreeRanks)";
  auto ctx = make_parallel_context(ParallelConfig{}, Device::cpu);
  const int n = ctx->dp->size(), rank = ctx->dp->rank();
  ASSERT_GE(n, 2);
  Replica plain(*ctx, false), overlap(*ctx, false), dist(*ctx, true), dist_overlap(*ctx, true, true);
  EXPECT_FALSE(plain.opt->distributed());
  EXPECT_TRUE(dist.opt->distributed());
  ASSERT_EQ(dist.sync->num_buckets(), 5u);  // [head] [b, g] [w_up] [norm] [embedding]
  const size_t num_params = plain.ps.all().size();
  for (int step = 0; step < 3; ++step) {
    for (Replica* r : {&plain, &overlap, &dist, &dist_overlap}) r->fill_grads(rank, step);
    plain.sync->finish_grad_sync();
    dist.sync->finish_grad_sync();
    // Overlapped: the buckets launch as the suffixes complete, as the backward pass reports them.
    for (Replica* r : {&overlap, &dist_overlap}) {
      for (size_t first = num_params; first-- > 0;) r->sync->grads_final(first);
      r->sync->finish_grad_sync();
    }
    for (size_t b = 0; b < dist.sync->buffers().size(); ++b)
      EXPECT_TRUE(same_bits(dist.sync->buffers()[b]->grad_shard(), dist_overlap.sync->buffers()[b]->grad_shard()));
    auto pp = plain.ps.all(), po = overlap.ps.all();
    for (size_t i = 0; i < num_params; ++i) {
      EXPECT_TRUE(same_bits(pp[i]->grad, po[i]->grad)) << pp[i]->name << ": overlapped reduction differs";
      if (!pp[i]->trainable) continue;
      // The mean over the ranks of sin(1 + i + 10 rank + ...).
      for (int64_t e = 0; e < pp[i]->grad.numel(); ++e) {
        double mean = 0;
        for (int q = 0; q < n; ++q) mean += std::sin(1.0 + e + 10.0 * q + 100.0 * step + 1000.0 * (i + 1)) / n;
        ASSERT_NEAR(pp[i]->grad.data<float>()[e], mean, 1e-6) << pp[i]->name;
      }
    }
    const double norm = plain.opt->grad_norm(), dnorm = dist.opt->grad_norm();
    EXPECT_NEAR(dnorm, norm, 1e-12 * norm) << "the norm over the shards, summed over the ranks";
    EXPECT_EQ(dist_overlap.opt->grad_norm(), dnorm);
    for (Replica* r : {&plain, &overlap, &dist, &dist_overlap}) r->opt->update(1e-2, std::min(1.0, 2.0 / norm));
    // Overlapped parameter gathers: all launched by the update; the forward's first need (the
    // embedding, parameter 0, in the last bucket) waits for that bucket only; the rest follow.
    const GradBuffer& ob = *dist_overlap.sync->buffers()[0];
    for (size_t b = 0; b < ob.num_buckets(); ++b) EXPECT_TRUE(ob.param_sync_in_flight(b)) << "bucket " << b;
    dist_overlap.sync->params_needed(1);
    EXPECT_FALSE(ob.param_sync_in_flight(4)) << "the embedding's bucket was not waited for";
    EXPECT_TRUE(ob.param_sync_in_flight(0)) << "the head's bucket was waited for too early";
    dist_overlap.sync->params_needed(num_params);
    for (size_t b = 0; b < ob.num_buckets(); ++b) EXPECT_FALSE(ob.param_sync_in_flight(b)) << "bucket " << b;
    auto pd = dist.ps.all(), pdo = dist_overlap.ps.all();
    for (size_t i = 0; i < num_params; ++i) {
      // Two ranks add a + b in both collectives: the same bits; three may add in another order.
      if (n == 2) EXPECT_TRUE(same_bits(pp[i]->value, pd[i]->value)) << pp[i]->name << " step " << step;
      EXPECT_LE(max_diff(pp[i]->value, pd[i]->value), 1e-6) << pp[i]->name << " step " << step;
      EXPECT_TRUE(same_bits(pd[i]->value, pdo[i]->value)) << pd[i]->name;
      EXPECT_TRUE(same_bits(pp[i]->value, po[i]->value)) << pp[i]->name;
    }
  }
  // The moments, gathered into whole tensors, equal the replicated ones; setting them on a fresh
  // distributed optimizer and gathering again gives them back bit for bit.
  auto mp = plain.opt->moments(), md = dist.opt->moments();
  Replica fresh(*ctx, true);
  for (size_t i = 0; i < num_params; ++i) {
    ASSERT_EQ(md[i].exp_avg.shape(), plain.ps.all()[i]->value.shape());
    EXPECT_LE(max_diff(mp[i].exp_avg, md[i].exp_avg), 1e-6) << plain.ps.all()[i]->name;
    EXPECT_LE(max_diff(mp[i].exp_avg_sq, md[i].exp_avg_sq), 1e-6) << plain.ps.all()[i]->name;
    fresh.opt->set_moments(i, mp[i].exp_avg, mp[i].exp_avg_sq);
  }
  EXPECT_GT(max_diff(mp[0].exp_avg, Tensor::zeros(mp[0].exp_avg.shape(), DType::f32)), 0.0) << "moments moved";
  auto mf = fresh.opt->moments();
  for (size_t i = 0; i < num_params; ++i) {
    EXPECT_TRUE(same_bits(mf[i].exp_avg, mp[i].exp_avg)) << plain.ps.all()[i]->name;
    EXPECT_TRUE(same_bits(mf[i].exp_avg_sq, mp[i].exp_avg_sq)) << plain.ps.all()[i]->name;
  }
}

TEST(DistributedOptimizer, OnTwoAndThreeRanks) {
  const std::string dir = fresh_dir("distopt_units");
  for (int np : {2, 3}) {
    const std::string log_path = dir + "/log" + std::to_string(np);
    const int rc = run(std::string("DECOTRON_MPI_WORKER=1 ") + kMpirun + " -x DECOTRON_MPI_WORKER -np " +
                           std::to_string(np) + " " + self_exe() + " --gtest_color=no --gtest_filter=DistOptWorker.*",
                       log_path, 60);
    const std::string log = read_file(log_path);
    EXPECT_EQ(rc, 0) << log;
    size_t passed = 0;
    for (size_t p = log.find("[  PASSED  ] 1 test"); p != std::string::npos; p = log.find("[  PASSED  ] 1 test", p + 1))
      ++passed;
    EXPECT_EQ(passed, static_cast<size_t>(np)) << log;
    EXPECT_EQ(log.find("SKIPPED"), std::string::npos) << log;
  }
}

// ---- decotron train ----------------------------------------------------------------------------

namespace {

// Small buckets (10 KiB: about ten for the tiny DECO), so that several overlap the backward.
const std::string kSmallBuckets = " --set parallel.grad_bucket_mb=0.01";
const std::string kDistOpt = " --set parallel.distributed_optimizer=true";
const std::string kNoOverlap = " --set parallel.overlap_grad_reduce=false --set parallel.overlap_param_gather=false";

// Runs shared by the tests of this suite (each test process makes its own): one rank, and two
// data-parallel ranks with and without the distributed optimizer; 20 steps, checkpoints at 10
// and 20.
class DistributedOptimizerRuns : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fresh_dir("distopt_runs_" + std::to_string(getpid()));
    cfg_ = tiny_config(dir_, 20, 8, 60, "wsd", 10);
    ASSERT_EQ(run(train_cmd(cfg_, dir_ + "/one"), dir_ + "/one.log"), 0) << read_file(dir_ + "/one.log");
    for (const auto& [name, extra] : {std::pair<std::string, std::string>{"dp2", ""}, {"dp2_distopt", kDistOpt}})
      ASSERT_EQ(run(mpirun(2) + train_cmd(cfg_, dir_ + "/" + name) + kSmallBuckets + extra, dir_ + "/" + name + ".log"),
                0)
          << read_file(dir_ + "/" + name + ".log");
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  static std::string dir_, cfg_;
};
std::string DistributedOptimizerRuns::dir_, DistributedOptimizerRuns::cfg_;

const char* kCompared[] = {"lm_loss", "reg_loss", "act_ratio", "entropy", "grad_norm", "reg_coef"};

// Largest |a - b| of the checkpoints' tensors, relative to the largest |b| of each tensor: of
// the weights, of exp_avg and of exp_avg_sq, each with the name of the worst tensor.
struct CheckpointDiff {
  double model = 0, exp_avg = 0, exp_avg_sq = 0;
  std::string worst_model, worst_exp_avg, worst_exp_avg_sq;
  double max() const { return std::max({model, exp_avg, exp_avg_sq}); }
  std::string str() const {
    char buf[256];
    std::snprintf(buf, sizeof buf, "weights %.2e (%s), exp_avg %.2e (%s), exp_avg_sq %.2e (%s)", model,
                  worst_model.c_str(), exp_avg, worst_exp_avg.c_str(), exp_avg_sq, worst_exp_avg_sq.c_str());
    return buf;
  }
};

CheckpointDiff checkpoint_diff(const CheckpointData& a, const CheckpointData& b) {
  auto cmp = [&](const std::vector<CheckpointTensor>& x, const std::vector<CheckpointTensor>& y, double& worst,
                 std::string& what) {
    EXPECT_EQ(x.size(), y.size());
    for (size_t i = 0; i < std::min(x.size(), y.size()); ++i) {
      EXPECT_EQ(x[i].name, y[i].name);
      EXPECT_EQ(x[i].shape, y[i].shape) << x[i].name << ": checkpoints hold whole tensors";
      double diff = 0, scale = 0;
      for (size_t k = 0; k < std::min(x[i].data.size(), y[i].data.size()); ++k)
        diff = std::max(diff, std::fabs(double(x[i].data[k]) - y[i].data[k])),
        scale = std::max(scale, std::fabs(double(y[i].data[k])));
      const double rel = scale > 0 ? diff / scale : diff;
      if (rel > worst || what.empty()) worst = std::max(worst, rel), what = x[i].name;
    }
  };
  CheckpointDiff d;
  cmp(a.model, b.model, d.model, d.worst_model);
  cmp(a.exp_avg, b.exp_avg, d.exp_avg, d.worst_exp_avg);
  cmp(a.exp_avg_sq, b.exp_avg_sq, d.exp_avg_sq, d.worst_exp_avg_sq);
  return d;
}

CheckpointData checkpoint_at(const std::string& run_dir, int iteration) {
  char name[32];
  std::snprintf(name, sizeof name, "iter_%07d.h5", iteration);
  return read_checkpoint(run_dir + "/checkpoints/" + name);
}

// A checkpoint directory holding only run_dir's checkpoint of `iteration`, as `latest`.
std::string checkpoint_dir_with(const std::string& run_dir, int iteration, const std::string& into) {
  char name[32];
  std::snprintf(name, sizeof name, "iter_%07d.h5", iteration);
  fs::create_directories(into);
  fs::copy_file(run_dir + "/checkpoints/" + name, into + "/" + name, fs::copy_options::overwrite_existing);
  std::ofstream(into + "/latest") << name << "\n";
  return into;
}

}  // namespace

// Two and four data-parallel ranks with the distributed optimizer, and tensor 2 x data 2 with
// it, follow one rank: metrics within 1e-5 relative, the checkpoints' weights and moments too.
TEST_F(DistributedOptimizerRuns, MatchesSingleRank) {
  const auto ref = train_records(dir_ + "/one/metrics.jsonl");
  ASSERT_EQ(ref.size(), 22u);  // 20 steps + 2 evaluations
  const CheckpointData ref_ckpt = checkpoint_at(dir_ + "/one", 20);
  ASSERT_EQ(run(mpirun(4) + train_cmd(cfg_, dir_ + "/dp4_distopt") + kSmallBuckets + kDistOpt, dir_ + "/dp4.log"), 0)
      << read_file(dir_ + "/dp4.log");
  ASSERT_EQ(run(mpirun(4) + train_cmd(cfg_, dir_ + "/tp2dp2_distopt") + kSmallBuckets + kDistOpt +
                    " --set parallel.tensor=2",
                dir_ + "/tp2dp2.log"),
            0)
      << read_file(dir_ + "/tp2dp2.log");
  ASSERT_EQ(run(mpirun(4) + train_cmd(cfg_, dir_ + "/dp4") + kSmallBuckets, dir_ + "/dp4_plain.log"), 0)
      << read_file(dir_ + "/dp4_plain.log");
  {
    const CheckpointDiff d = checkpoint_diff(checkpoint_at(dir_ + "/dp4_distopt", 20), checkpoint_at(dir_ + "/dp4", 20));
    EXPECT_LE(d.model, 1e-5) << d.str();
    std::printf("DP4 after 20 steps, distributed-optimizer checkpoint vs replicated: %s\n", d.str().c_str());
  }
  for (const std::string name : {"dp2_distopt", "dp4_distopt", "tp2dp2_distopt"}) {
    const auto got = train_records(dir_ + "/" + name + "/metrics.jsonl");
    ASSERT_EQ(got.size(), ref.size()) << name;
    double worst = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const std::string at = name + " record " + std::to_string(i);
      if (ref[i].contains("val_loss")) {
        expect_close(got[i]["val_loss"], ref[i]["val_loss"], 1e-5, at + " val_loss");
        continue;
      }
      EXPECT_EQ(got[i]["consumed_samples"], ref[i]["consumed_samples"]) << at;
      for (const char* key : kCompared) {
        expect_close(got[i][key], ref[i][key], 1e-5, at + " " + key);
        const double a = got[i][key], b = ref[i][key];
        if (b != 0) worst = std::max(worst, std::fabs(a - b) / std::fabs(b));
      }
    }
    // Data parallelism itself sums the gradients in another order than one rank (the replicated
    // optimizer at DP2 gives the same bits as the distributed one, see CheckpointsCrossLayouts).
    const CheckpointDiff d = checkpoint_diff(checkpoint_at(dir_ + "/" + name, 20), ref_ckpt);
    EXPECT_LE(d.model, kLayoutWeightTol) << name << ": " << d.str();
    EXPECT_LE(d.max(), kLayoutMomentTol) << name << ": " << d.str();
    std::printf("%s vs one rank after 20 steps: metrics within %.2e relative; %s\n", name.c_str(), worst,
                d.str().c_str());
  }
}

// Overlapping the bucket reductions with the backward pass changes when they start, not what
// they compute: the same metrics and checkpoints, bit for bit, with and without the
// distributed optimizer.
TEST_F(DistributedOptimizerRuns, OverlapIsBitIdentical) {
  for (const auto& [name, extra] : {std::pair<std::string, std::string>{"dp2", ""}, {"dp2_distopt", kDistOpt}}) {
    const std::string off = dir_ + "/" + name + "_no_overlap";
    ASSERT_EQ(run(mpirun(2) + train_cmd(cfg_, off) + kSmallBuckets + extra + kNoOverlap, off + ".log"), 0)
        << read_file(off + ".log");
    const auto a = train_records(dir_ + "/" + name + "/metrics.jsonl"), b = train_records(off + "/metrics.jsonl");
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i)
      for (const auto& [key, value] : a[i].items()) {
        if (key == "tokens_per_s" || key == "tflops" || key == "peak_memory_bytes") continue;  // the process's
        EXPECT_EQ(value, b[i][key]) << name << " record " << i << " " << key;
      }
    const CheckpointDiff d = checkpoint_diff(checkpoint_at(off, 20), checkpoint_at(dir_ + "/" + name, 20));
    EXPECT_EQ(d.max(), 0.0) << name << ": " << d.str();
  }
}

// Checkpoints stay whole tensors: the distributed optimizer's equals the replicated one's, and a
// run crosses layouts in both directions (two ranks with it -> one rank without it, and back)
// following the uninterrupted single-rank run.
TEST_F(DistributedOptimizerRuns, CheckpointsCrossLayouts) {
  // Two ranks add a + b in the reduce-scatter as in the all-reduce (measured: the same bits; the
  // grad norm sums its squares in another order, which may move the clip factor by an ulp).
  for (int it : {10, 20}) {
    const CheckpointDiff d = checkpoint_diff(checkpoint_at(dir_ + "/dp2_distopt", it), checkpoint_at(dir_ + "/dp2", it));
    EXPECT_LE(d.model, 1e-6) << "iteration " << it << ": " << d.str();
    EXPECT_LE(d.max(), 1e-4) << "iteration " << it << ": " << d.str();
    std::printf("DP2 at iteration %d, distributed-optimizer checkpoint vs replicated: %s\n", it, d.str().c_str());
  }
  const auto ref = train_records(dir_ + "/one/metrics.jsonl");
  struct Case {
    std::string name, from, launch, extra;
  };
  for (const Case& c : {Case{"dp2_distopt_to_one", "dp2_distopt", "", ""},
                        Case{"one_to_dp2_distopt", "one", mpirun(2), kSmallBuckets + kDistOpt}}) {
    const std::string src = checkpoint_dir_with(dir_ + "/" + c.from, 10, dir_ + "/" + c.name + "_from");
    const std::string run_dir = dir_ + "/" + c.name;
    ASSERT_EQ(run(c.launch + train_cmd(cfg_, run_dir) + " --resume " + src + c.extra, run_dir + ".log"), 0)
        << read_file(run_dir + ".log");
    EXPECT_NE(read_file(run_dir + ".log").find("resumed from"), std::string::npos);
    const auto got = train_records(run_dir + "/metrics.jsonl");
    ASSERT_EQ(got.size(), 11u) << c.name << ": iterations 11 to 20 and the evaluation at 20";
    for (size_t i = 0; i < got.size(); ++i) {
      const auto& want = ref[11 + i];  // ref: 10 steps, an evaluation, then these
      if (want.contains("val_loss")) {
        expect_close(got[i]["val_loss"], want["val_loss"], 1e-5, c.name + " val_loss");
        continue;
      }
      EXPECT_EQ(got[i]["iter"], want["iter"]);
      for (const char* key : kCompared) expect_close(got[i][key], want[key], 1e-5, c.name + " " + key);
    }
    const CheckpointDiff d = checkpoint_diff(checkpoint_at(run_dir, 20), checkpoint_at(dir_ + "/one", 20));
    EXPECT_LE(d.model, kLayoutWeightTol) << c.name << ": " << d.str();
    EXPECT_LE(d.max(), kLayoutMomentTol) << c.name << ": " << d.str();
    std::printf("%s: resumed at 10; at 20 vs the uninterrupted single rank: %s\n", c.name.c_str(), d.str().c_str());
  }
}

// ---- the model's hook ----------------------------------------------------------------------------

// Transformer::on_grads_final reports suffixes of the parameters in backward order, and a
// parameter it has reported is never written again by that backward pass: what makes launching
// its bucket's reduction right then safe.
TEST(TransformerGradsFinal, ReportsSuffixesThatStayUnchanged) {
  ModelConfig m;
  m.vocab_size = 64, m.seq_len = 8, m.hidden = 32, m.layers = 3, m.heads = 4, m.ffn_hidden = 64, m.experts = 8;
  m.expert_width = 8, m.shared_expert_width = 16, m.dense_layers = 1, m.parameter_parity = false, m.init_std = 0.2;
  Transformer model(m, DType::f32, Device::cpu);
  model.params().initialize(3);
  const std::vector<Parameter*> params = model.params().all();
  const BatchShape bs{2, m.seq_len};
  Tensor tok = Tensor::empty({bs.tokens()}, DType::i32), tgt = Tensor::empty({bs.tokens()}, DType::i32);
  for (int64_t i = 0; i < bs.tokens(); ++i) {
    tok.data<int32_t>()[i] = static_cast<int32_t>((7 * i + 3) % m.vocab_size);
    tgt.data<int32_t>()[i] = static_cast<int32_t>((5 * i + 1) % m.vocab_size);
  }
  std::vector<size_t> reported;
  std::vector<Tensor> snapshot(params.size());  // each parameter's gradient when reported
  model.on_grads_final = [&](size_t first) {
    reported.push_back(first);
    for (size_t i = first; i < params.size(); ++i)
      if (!snapshot[i].defined()) snapshot[i] = params[i]->grad.clone();
  };
  RegularizerSpec reg;
  reg.kind = RegularizerSpec::Kind::entropy, reg.coef = 0.05;
  model.params().zero_grad();
  model.forward(tok, tgt, bs, reg, 1.0, true);
  model.backward(1.0);
  // LM head, final norm, three blocks, embedding.
  ASSERT_EQ(reported.size(), 6u);
  EXPECT_EQ(reported.front(), params.size() - 1);
  EXPECT_EQ(reported.back(), 0u);
  for (size_t k = 1; k < reported.size(); ++k) EXPECT_LT(reported[k], reported[k - 1]);
  for (size_t i = 0; i < params.size(); ++i) {
    ASSERT_TRUE(snapshot[i].defined()) << params[i]->name;
    EXPECT_TRUE(same_bits(snapshot[i], params[i]->grad)) << params[i]->name << " changed after it was reported final";
  }
}
