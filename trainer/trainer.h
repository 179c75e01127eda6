// The training loop: micro-batch accumulation, the sparsity regularizer and its controller,
// AdamW with clipping, step skipping on non-finite or outlier gradients, evaluation, and the
// log line + metrics.jsonl record per interval.
#pragma once
#include <atomic>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "model/transformer.h"
#include "parallel/grad_sync.h"
#include "parallel/process_groups.h"
#include "trainer/optimizer.h"
#include "trainer/sparsity_controller.h"
#include "trainer/training_data.h"

namespace decotron {

// Everything besides weights and optimizer moments that a resumed run needs.
struct TrainState {
  int64_t iteration = 0;          // completed iterations (skipped ones included)
  int64_t consumed_samples = 0;   // training samples read so far
  int64_t skipped_total = 0;
  int64_t consecutive_skips = 0;
  std::vector<double> recent_grad_norms;  // of the last good steps, for the outlier rule
};

// What one optimizer step measured.
struct StepResult {
  double lm_loss = 0, reg_loss = 0, entropy = 0;
  double act_ratio = 0, no_expert_frac = 0;
  std::vector<double> act_ratio_per_layer;
  // Load balance of the step: the largest per-expert pair count over the mean (worst DECO
  // layer, global batch), and the largest number of pairs one rank's experts computed over the
  // mean over the ranks (what expert parallelism waits for).
  double expert_load_max_over_mean = 0, rank_load_max_over_mean = 0;
  double grad_norm = 0, lr = 0, reg_coef = 0;
  bool skipped = false;
  std::string skip_reason;
  int64_t tokens = 0;
  // What this rank sent or contributed to collectives during the step (forward, backward,
  // gradient averaging, statistics, gradient norm), per group and op.
  CommTraffic comm;
};

// Under data parallelism every rank runs a Trainer on its slice of each step's samples; the
// gradients are averaged over the data-parallel group before the update, and the step's
// statistics (losses, activation counts, hence the controller's rho and lambda) are summed over
// it, so every rank holds the same weights, lambda and numbers. Only the main rank (world rank
// 0) prints and writes metrics.jsonl.
class Trainer {
 public:
  // `par`: the process groups (nullptr: built here from cfg.parallel; one process = world of one).
  Trainer(const Config& cfg, std::unique_ptr<TrainingData> data, const std::string& run_dir,
          std::shared_ptr<ParallelContext> par = nullptr);
  ~Trainer();

  // Trains until cfg.train.iters or a stop request; returns normally in both cases.
  void train();
  StepResult train_step();
  // Mean validation cross-entropy over eval_iters micro-batches (NaN if there is no valid split).
  double evaluate();

  void request_stop() { stop_requested_ = true; }
  bool stop_requested() const { return stop_requested_; }

  // The model and the optimizer for readers outside the training step (checkpoints, export,
  // benchmarks): the distributed optimizer's parameter all-gathers still in flight are waited
  // for first, so that no one reads a half-gathered parameter.
  Transformer& model() {
    grad_sync_->finish_param_sync();
    return *model_;
  }
  AdamW& optimizer() {
    grad_sync_->finish_param_sync();
    return *optimizer_;
  }
  SparsityController& controller() { return controller_; }
  TrainState& state() { return state_; }
  const Config& config() const { return cfg_; }
  const std::string& run_dir() const { return run_dir_; }
  const ParallelContext& parallel() const { return *par_; }
  // Whether capturing a checkpoint is collective (every rank must take part, rank 0 writes):
  // the main rank's tensor- and expert-parallel grid gathers the split tensors; with the
  // distributed optimizer every rank takes part (its state shards are gathered).
  bool checkpoint_is_collective() const {
    const ParallelLayout& l = par_->layout;
    return optimizer_->distributed() || ((l.tp_size > 1 || l.ep_size > 1) && l.edp_rank == 0);
  }
  // Replaces the data source (after a resume restores consumed_samples).
  void set_data(std::unique_ptr<TrainingData> data) { data_ = std::move(data); }

  // Called after each completed iteration (checkpointing hooks in here).
  std::function<void(Trainer&)> after_iteration;

 private:
  void log_interval(const StepResult& last, double seconds);
  void check_inactive(const std::vector<std::vector<int64_t>>& per_expert);
  void write_metrics(const std::string& json_line);

  Config cfg_;
  std::shared_ptr<ParallelContext> par_;
  std::unique_ptr<TrainingData> data_;
  std::string run_dir_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<GradientSync> grad_sync_;  // after the model (its buffers hold the model's gradients)
  std::unique_ptr<AdamW> optimizer_;         // after the sync (it takes views of the sync's shards)
  SparsityController controller_;
  TrainState state_;
  std::atomic<bool> stop_requested_{false};
  std::FILE* metrics_ = nullptr;
  // interval accumulators
  std::vector<StepResult> interval_;
  // inactive-expert alarm: iteration each (layer, expert) was last active, and whether warned
  std::vector<std::vector<int64_t>> last_active_;
  std::vector<std::vector<bool>> warned_;
};

}  // namespace decotron
