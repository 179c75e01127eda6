// decotron bench train: training throughput of a config (tokens/s, model TFLOP/s, MFU against
// a GEMM peak measured in the same run, peak memory) and the time split by op family, for the
// DECO sparse path, the DECO dense-masked path and the dense twin.
#include <algorithm>
#include <chrono>
#include <set>
#include <cstdio>

#include "cli/bench_ceilings.h"
#include "cli/commands.h"
#include "core/config.h"
#include "kernels/op_profile.h"
#include "kernels/ops.h"
#include "trainer/trainer.h"
#ifdef DECOTRON_WITH_CUDA
#include "kernels/cuda/flash_attention.h"
#endif

namespace decotron::cli {

namespace {

struct BenchArgs {
  std::string config;
  std::vector<std::string> overrides;
  int64_t steps = 5, warmup = 2, profile_steps = 2;
  bool all_variants = false;
  bool real_data = false;
  double act_ratio = -1;  // < 0: the config's train.target_ratio; 0: the model's own routing
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct VariantResult {
  std::string name;
  double tokens_per_s = 0, tflops = 0, act_ratio = 0, lm_loss = 0;
  size_t peak_bytes = 0;
  std::map<std::string, double> family_seconds;
  double profiled_seconds = 0;
};

VariantResult run_variant(const std::string& name, const Config& cfg, const BenchArgs& a) {
  VariantResult res;
  res.name = name;
  std::unique_ptr<TrainingData> data = a.real_data ? make_training_data(cfg, 0)
                                                   : make_synthetic_data(cfg.model.vocab_size, cfg.model.seq_len,
                                                                         cfg.train.seed, 0);
  Trainer trainer(cfg, std::move(data), "");
  // A fresh router activates about half of the pairs, a trained one the target ratio: measure
  // the sparse path where training spends its time (both DECO variants route alike).
  const double ratio = a.act_ratio < 0 ? cfg.train.target_ratio : a.act_ratio;
  if (ratio > 0) trainer.model().calibrate_routing(ratio);
  for (int64_t i = 0; i < a.warmup; ++i) trainer.train_step();
  auto t0 = std::chrono::steady_clock::now();
  int64_t tokens = 0;
  double act = 0;
  for (int64_t i = 0; i < a.steps; ++i) {
    StepResult r = trainer.train_step();
    tokens += r.tokens;
    act += r.act_ratio / a.steps;
    res.lm_loss = r.lm_loss;
  }
  if (cfg.train.device == "cuda") trainer.model().params().find("lm_head.weight").value.item(0);  // drain the stream
  double secs = seconds_since(t0);
  res.tokens_per_s = tokens / secs;
  res.act_ratio = act;
  res.tflops = trainer.model().train_flops_per_token(trainer.model().num_deco_layers() ? act : 0.0) *
               res.tokens_per_s / 1e12;
  res.peak_bytes = allocator_for(trainer.model().params().device()).peak_bytes();
  auto& prof = ops::OpProfile::instance();
  prof.reset();
  prof.enable(true);
  auto p0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < a.profile_steps; ++i) trainer.train_step();
  res.profiled_seconds = seconds_since(p0);
  prof.enable(false);
  for (const auto& [op, s] : prof.totals()) res.family_seconds[ops::op_family(op)] += s;
  prof.reset();
  return res;
}

void run_bench_train(const BenchArgs& a) {
  Config base = load_config(a.config, a.overrides);
  std::vector<std::pair<std::string, Config>> variants;
  if (a.all_variants && base.model.arch == "deco") {
    Config sparse = base, masked = base, dense = base;
    sparse.model.expert_compute = "sparse";
    masked.model.expert_compute = "dense";
    dense.model.arch = "dense";
    dense.train.sparsity_reg = "none";
    variants = {{"deco-sparse", sparse}, {"deco-dense-masked", masked}, {"dense", dense}};
  } else {
    variants = {{base.model.arch == "deco" ? "deco-" + base.model.expert_compute : "dense", base}};
  }
  const Device dev = base.train.device == "cuda" ? Device::cuda : Device::cpu;
  const double peak = measure_gemm_tflops(dev);
  std::printf("bench train: %s, %s, %s, micro_batch %lld x seq %lld, global batch %lld, %lld timed steps after %lld warmup\n",
              a.config.c_str(), device_name(dev), base.train.dtype.c_str(), static_cast<long long>(base.train.micro_batch),
              static_cast<long long>(base.model.seq_len), static_cast<long long>(base.train.global_batch),
              static_cast<long long>(a.steps), static_cast<long long>(a.warmup));
  std::printf("measured dense GEMM peak on this device: %.3f TFLOP/s (%s)\n", peak,
              dev == Device::cuda ? "bf16 8192^3" : "fp32 1024^3, OpenBLAS");
  const double ratio = a.act_ratio < 0 ? base.train.target_ratio : a.act_ratio;
  if (base.model.arch == "deco" && ratio > 0)
    std::printf("DECO routing: each expert's router logits shifted at the first step so that %.3g of the tokens "
                "activate it (a trained model's ratio; --act-ratio 0 for the fresh router's own)\n",
                ratio);
  std::printf("\n");
  std::vector<VariantResult> results;
  for (const auto& [name, cfg] : variants) results.push_back(run_variant(name, cfg, a));
#ifdef DECOTRON_WITH_CUDA
  if (dev == Device::cuda) {
    const cuda::AttentionPath p = cuda::last_attention_path();
    std::printf("attention kernels: %s\n\n", p == cuda::AttentionPath::cudnn   ? "cuDNN fused SDPA"
                                              : p == cuda::AttentionPath::flash ? "flash (WMMA)"
                                                                                : "reference");
  }
#endif
  std::printf("| variant | tokens/s | model TFLOP/s | MFU | act ratio | peak memory | lm_loss |\n|---|---|---|---|---|---|---|\n");
  for (const auto& r : results)
    std::printf("| %s | %.0f | %.4f | %.1f%% | %.3f | %.1f MiB | %.4f |\n", r.name.c_str(), r.tokens_per_s, r.tflops,
                100 * r.tflops / peak, r.act_ratio, r.peak_bytes / 1048576.0, r.lm_loss);
  std::printf("\ntime split by op family (%lld profiled steps; share of op time):\n| family |", static_cast<long long>(a.profile_steps));
  for (const auto& r : results) std::printf(" %s |", r.name.c_str());
  std::printf("\n|---|");
  for (size_t i = 0; i < results.size(); ++i) std::printf("---|");
  std::printf("\n");
  std::set<std::string> families;
  for (const auto& r : results)
    for (const auto& [f, s] : r.family_seconds) families.insert(f);
  for (const auto& f : families) {
    std::printf("| %s |", f.c_str());
    for (const auto& r : results) {
      double total = 0;
      for (const auto& [g, s] : r.family_seconds) total += s;
      auto it = r.family_seconds.find(f);
      double s = it == r.family_seconds.end() ? 0 : it->second;
      std::printf(" %.1f ms/step (%.0f%%) |", 1e3 * s / a.profile_steps, total > 0 ? 100 * s / total : 0.0);
    }
    std::printf("\n");
  }
}

}  // namespace

void register_bench_train(CLI::App& bench) {
  auto a = std::make_shared<BenchArgs>();
  auto* cmd = bench.add_subcommand("train", "Training throughput, MFU, peak memory and time per op family");
  cmd->add_option("--config", a->config, "YAML config (e.g. configs/deco-0.1b.yaml)")->required();
  cmd->add_option("--set", a->overrides, "Override a config key: --set section.key=value (repeatable)");
  cmd->add_option("--steps", a->steps, "Timed steps")->check(CLI::PositiveNumber);
  cmd->add_option("--warmup", a->warmup, "Untimed steps first")->check(CLI::NonNegativeNumber);
  cmd->add_option("--profile-steps", a->profile_steps, "Steps timed op by op for the split")->check(CLI::PositiveNumber);
  cmd->add_flag("--all-variants", a->all_variants,
                "For a DECO config: DECO sparse, DECO dense-masked and the dense twin, one after another");
  cmd->add_flag("--real-data", a->real_data, "Read data.prefixes instead of synthetic tokens");
  cmd->add_option("--act-ratio", a->act_ratio,
                  "DECO: route this share of the tokens to each expert (router logits shifted per expert at the "
                  "first step, as a trained router does; default train.target_ratio; 0: the fresh router's own)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->callback([a] { run_bench_train(*a); });
}

}  // namespace decotron::cli
