#include "trainer/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>

#include "kernels/ops.h"
#include "parallel/tensor_parallel.h"
#include "trainer/lr_schedule.h"

namespace decotron {

namespace fs = std::filesystem;

namespace {

constexpr size_t kGradNormWindow = 20;  // good steps remembered by the outlier rule

Device device_of(const std::string& d) { return d == "cuda" ? Device::cuda : Device::cpu; }

// Splits [B, S+1] samples into inputs [B*S] and targets [B*S] on `device`.
void split_batch(const std::vector<int32_t>& batch, int64_t B, int64_t S, Device device, Tensor& tokens,
                 Tensor& targets) {
  DT_ASSERT(static_cast<int64_t>(batch.size()) == B * (S + 1), "batch of ", batch.size(), " tokens, expected ",
            B * (S + 1));
  Tensor tok = Tensor::empty({B * S}, DType::i32), tgt = Tensor::empty({B * S}, DType::i32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      tok.data<int32_t>()[b * S + s] = batch[b * (S + 1) + s];
      tgt.data<int32_t>()[b * S + s] = batch[b * (S + 1) + s + 1];
    }
  tokens = device == Device::cpu ? tok : tok.to(device);
  targets = device == Device::cpu ? tgt : tgt.to(device);
}

std::string human_bytes(size_t b) {
  char buf[32];
  if (b >= (1ull << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", b / double(1ull << 30));
  else std::snprintf(buf, sizeof buf, "%.1f MiB", b / double(1ull << 20));
  return buf;
}

}  // namespace

Trainer::Trainer(const Config& cfg, std::unique_ptr<TrainingData> data, const std::string& run_dir,
                 std::shared_ptr<ParallelContext> par)
    : cfg_(cfg),
      par_(par ? std::move(par) : make_parallel_context(cfg.parallel, device_of(cfg.train.device))),
      data_(std::move(data)),
      run_dir_(run_dir),
      controller_(cfg.train.target_ratio, cfg.train.reg_lambda0, cfg.train.reg_multiplier) {
  if (cfg.train.device == "cuda" && !cuda_available())
    fail(cfg.where("train.device"), " = cuda, but no GPU is usable here (",
#ifdef DECOTRON_WITH_CUDA
         "no device visible"
#else
         "this decotron was built without CUDA"
#endif
         "); set train.device: cpu");
  const ParallelLayout& lay = par_->layout;
  if (cfg.model.arch == "deco" && cfg.model.experts < lay.tp_size * lay.ep_size)
    fail(cfg.where("parallel.expert"), " = ", lay.ep_size, ": model.experts = ", cfg.model.experts,
         " cannot give every one of parallel.tensor x parallel.expert = ", lay.tp_size * lay.ep_size,
         " ranks a whole expert; lower parallel.expert or parallel.tensor");
  if (cfg.train.global_batch % (cfg.train.micro_batch * lay.dp_size) != 0)
    fail(cfg.where("train.global_batch"), " = ", cfg.train.global_batch, " is not a multiple of train.micro_batch x "
         "data-parallel size = ", cfg.train.micro_batch, " x ", lay.dp_size);
  model_ = std::make_unique<Transformer>(cfg.model, DType::f32, device_of(cfg.train.device), par_->tp.get(),
                                         par_->ep.get(), cfg.parallel.sequence);
  if (cfg.train.device == "cuda" && cfg.model.arch == "deco" && cfg.model.expert_compute == "sparse" &&
      par_->is_main())
    std::fprintf(stderr, "warning: %s = sparse on cuda: the CUDA grouped expert kernels have passed their tests only "
                 "in the host emulator (tools/cuda_emu), not yet on a GPU; model.expert_compute: dense is the "
                 "GPU-tested reference\n", cfg.where("model.expert_compute").c_str());
  // Mixed precision (train.dtype: bf16): fp32 master weights, gradients and optimizer state;
  // bf16 weight copies and activations; the router in fp32 (docs/training.md).
  if (cfg.train.dtype == "bf16") {
    model_->params().set_compute_dtype(DType::bf16);
    if (cfg.train.device == "cpu" && par_->is_main())
      std::fprintf(stderr, "note: %s = bf16 on the CPU: bf16 is emulated there (fp32 kernels, results rounded to "
                   "bf16), slower than fp32; it is for checking the GPU's mixed-precision path\n",
                   cfg.where("train.dtype").c_str());
  }
  model_->set_loss_chunk_tokens(cfg.train.loss_chunk_tokens);
  model_->set_recompute(cfg.train.recompute);
  model_->params().initialize(cfg.train.seed);  // the same weights on every rank (keyed by seed and name)
  // The sync moves the gradients (and, distributed, the parameters) into its buffers before the
  // optimizer takes views of them.
  GradientSync::Options sync;
  sync.bucket_bytes = static_cast<size_t>(cfg.parallel.grad_bucket_mb * (1 << 20));
  sync.distributed_optimizer = cfg.parallel.distributed_optimizer;
  sync.overlap_param_gather = cfg.parallel.overlap_param_gather;
  grad_sync_ = std::make_unique<GradientSync>(model_->params().all(), *par_, sync);
  // The distributed optimizer's overlapped parameter all-gathers: the forward waits for each
  // bucket as it reaches its parameters.
  if (grad_sync_->distributed())
    model_->on_params_needed = [this](size_t end) { grad_sync_->params_needed(end); };
  optimizer_ = std::make_unique<AdamW>(model_->params(), cfg.train, grad_sync_.get());
  optimizer_->set_tensor_parallel(par_->tp.get());
  optimizer_->set_expert_parallel(par_->ep.get());
  if (cfg.parallel.distributed_optimizer && !optimizer_->distributed() && par_->is_main())
    std::fprintf(stderr, "note: %s: the data-parallel size is 1, nothing to shard (the optimizer state stays whole)\n",
                 cfg.where("parallel.distributed_optimizer").c_str());
  last_active_.assign(model_->num_deco_layers(), std::vector<int64_t>(cfg.model.experts, 0));
  warned_.assign(model_->num_deco_layers(), std::vector<bool>(cfg.model.experts, false));
  if (!run_dir_.empty() && par_->is_main()) {
    fs::create_directories(run_dir_);
    std::string path = run_dir_ + "/metrics.jsonl";
    metrics_ = std::fopen(path.c_str(), "a");
    if (!metrics_) fail("cannot open ", path, " for writing: check the permissions of the run directory");
  }
}

Trainer::~Trainer() {
  if (metrics_) std::fclose(metrics_);
}

StepResult Trainer::train_step() {
  const TrainConfig& t = cfg_.train;
  const int64_t B = t.micro_batch, S = cfg_.model.seq_len;
  const int dp = par_->layout.dp_size;
  const int64_t n_micro = t.global_batch / (t.micro_batch * dp);  // this rank's micro-steps
  const double loss_scale = 1.0 / n_micro;
  const int L = cfg_.model.layers, D = model_->num_deco_layers();
  StepResult res;
  const CommTraffic comm_before = par_->log->traffic();
  res.lr = learning_rate(t, state_.iteration);
  res.reg_coef = controller_.lambda();

  RegularizerSpec reg;
  if (D > 0 && t.sparsity_reg != "none") {
    reg.kind = t.sparsity_reg == "l1" ? RegularizerSpec::Kind::l1 : RegularizerSpec::Kind::entropy;
    reg.coef = controller_.lambda() / L;
    reg.target = t.target_ratio;
  }

  model_->params().zero_grad();
  // Sequence parallel: the norm weights' gradients are partial sums over the tensor-parallel
  // ranks' tokens; they are summed over the group once per step, before the data-parallel
  // reduction reads them. Parameters [sp_summed, end) are done.
  const std::vector<Parameter*> params = model_->params().all();
  size_t sp_summed = params.size();
  auto sequence_parallel_grads_from = [&](size_t first) {
    if (!cfg_.parallel.sequence || first >= sp_summed) return;
    tp_all_reduce_sequence_parallel_grads(*par_->tp, {params.begin() + first, params.begin() + sp_summed});
    sp_summed = first;
  };
  double lm_sum = 0, reg_sum = 0, entropy_sum = 0;
  int64_t tokens = 0, no_expert = 0, pairs_computed = 0;
  std::vector<int64_t> layer_active(D, 0);
  std::vector<std::vector<int64_t>> per_expert(D, std::vector<int64_t>(cfg_.model.experts, 0));
  for (int64_t m = 0; m < n_micro; ++m) {
    std::vector<int32_t> batch = data_->next_train(B);
    state_.consumed_samples += B * dp;
    Tensor tok, tgt;
    split_batch(batch, B, S, model_->params().device(), tok, tgt);
    ForwardResult f = model_->forward(tok, tgt, {B, S}, reg, loss_scale, true);
    // During the last micro-batch's backward, as soon as a block's gradients are complete
    // (earlier micro-batches still add to them): sequence parallelism sums its norm weights'
    // partial gradients over the tensor-parallel ranks, then (overlap) the data-parallel
    // reduction of every bucket that is complete starts.
    if (m + 1 == n_micro)
      model_->on_grads_final = [&](size_t first) {
        sequence_parallel_grads_from(first);
        if (cfg_.parallel.overlap_grad_reduce) grad_sync_->grads_final(first);
      };
    model_->backward(loss_scale);
    model_->on_grads_final = nullptr;
    lm_sum += f.lm_loss_sum;
    tokens += f.tokens;
    reg_sum += f.reg_loss * loss_scale;
    for (int l = 0; l < D; ++l) {
      layer_active[l] += f.routing[l].active_pairs;
      no_expert += f.routing[l].tokens_without_expert;
      pairs_computed += f.routing[l].pairs_computed;
      entropy_sum += f.routing[l].entropy_sum;
      for (int64_t e = 0; e < cfg_.model.experts; ++e) per_expert[l][e] += f.routing[l].active_per_expert[e];
    }
  }
  // Data parallel: average the gradients (distributed optimizer: each rank's shard of them), and
  // sum the statistics over the ranks (every rank then computes the same losses, rho, lambda,
  // norm and skip decision).
  sequence_parallel_grads_from(0);
  grad_sync_->finish_grad_sync();
  {
    std::vector<double> sums = {lm_sum, reg_sum, entropy_sum};
    par_->dp->sum_in_place(sums);
    lm_sum = sums[0], reg_sum = sums[1] / dp, entropy_sum = sums[2];  // reg: each rank's is a mean over its micro-steps
    std::vector<int64_t> counts = {tokens, no_expert};
    counts.insert(counts.end(), layer_active.begin(), layer_active.end());
    for (const auto& pe : per_expert) counts.insert(counts.end(), pe.begin(), pe.end());
    par_->dp->sum_in_place(counts);
    size_t i = 0;
    tokens = counts[i++], no_expert = counts[i++];
    for (auto& a : layer_active) a = counts[i++];
    for (auto& pe : per_expert)
      for (auto& c : pe) c = counts[i++];
  }
  res.tokens = tokens;
  res.lm_loss = lm_sum / tokens;
  res.reg_loss = reg_sum;
  if (D > 0) {
    const double pairs_per_layer = static_cast<double>(tokens) * cfg_.model.experts;
    int64_t active = std::accumulate(layer_active.begin(), layer_active.end(), int64_t{0});
    res.act_ratio = active / (pairs_per_layer * D);
    for (int l = 0; l < D; ++l) res.act_ratio_per_layer.push_back(layer_active[l] / pairs_per_layer);
    res.no_expert_frac = static_cast<double>(no_expert) / (static_cast<double>(tokens) * D);
    res.entropy = entropy_sum / (static_cast<double>(tokens) * D);
    for (const auto& pe : per_expert) {
      const double mean = std::accumulate(pe.begin(), pe.end(), 0.0) / pe.size();
      if (mean > 0)
        res.expert_load_max_over_mean =
            std::max(res.expert_load_max_over_mean, *std::max_element(pe.begin(), pe.end()) / mean);
    }
    // Every rank's experts' pairs (tensor- and expert-parallel ranks hold different experts).
    // (A sum of one-hot vectors: the host helpers stage through device memory on NCCL.)
    std::vector<int64_t> per_rank(par_->world->size(), 0);
    per_rank[par_->world->rank()] = pairs_computed;
    par_->world->sum_in_place(per_rank);
    const double mean = std::accumulate(per_rank.begin(), per_rank.end(), 0.0) / per_rank.size();
    if (mean > 0) res.rank_load_max_over_mean = *std::max_element(per_rank.begin(), per_rank.end()) / mean;
  }

  // Skip rule: a non-finite loss or gradient, or an outlier gradient norm, makes no update and
  // does not move the controller.
  res.grad_norm = optimizer_->grad_norm();
  if (!std::isfinite(res.lm_loss) || !std::isfinite(res.reg_loss)) {
    res.skipped = true, res.skip_reason = "non-finite loss";
  } else if (!std::isfinite(res.grad_norm)) {
    res.skipped = true, res.skip_reason = "non-finite gradient";
  } else if (t.skip_grad_norm_factor > 0 && state_.recent_grad_norms.size() >= kGradNormWindow / 2) {
    double mean = std::accumulate(state_.recent_grad_norms.begin(), state_.recent_grad_norms.end(), 0.0) /
                  state_.recent_grad_norms.size();
    if (res.grad_norm > t.skip_grad_norm_factor * mean)
      res.skipped = true,
      res.skip_reason = cat("gradient norm ", res.grad_norm, " > ", t.skip_grad_norm_factor, " x recent mean ", mean);
  }
  if (res.skipped) {
    ++state_.skipped_total;
    ++state_.consecutive_skips;
    if (par_->is_main())
      std::fprintf(stderr, "warning: iteration %lld skipped: %s\n", static_cast<long long>(state_.iteration + 1),
                   res.skip_reason.c_str());
    if (state_.consecutive_skips >= t.max_skipped_steps)
      fail("stopped: ", state_.consecutive_skips, " consecutive steps skipped (last: ", res.skip_reason,
           ") at iteration ", state_.iteration + 1,
           ". Lower train.lr, raise train.warmup_iters, check the data, or resume from an earlier checkpoint");
  } else {
    state_.consecutive_skips = 0;
    state_.recent_grad_norms.push_back(res.grad_norm);
    if (state_.recent_grad_norms.size() > kGradNormWindow)
      state_.recent_grad_norms.erase(state_.recent_grad_norms.begin());
    double clip = (t.clip_grad > 0 && res.grad_norm > t.clip_grad) ? t.clip_grad / res.grad_norm : 1.0;
    optimizer_->update(res.lr, clip);
    model_->params().mark_master_changed();  // the bf16 compute copies follow at the next forward
    if (D > 0 && t.sparsity_reg != "none") controller_.step(res.act_ratio);
  }
  ++state_.iteration;
  check_inactive(per_expert);
  res.comm = par_->log->traffic().since(comm_before);
  return res;
}

void Trainer::check_inactive(const std::vector<std::vector<int64_t>>& per_expert) {
  const int64_t alarm = cfg_.train.inactive_alarm_iters, it = state_.iteration;
  if (alarm <= 0 || !par_->is_main()) return;  // the counts are global: one rank warns
  const auto& ids = model_->deco_layer_ids();
  for (size_t l = 0; l < per_expert.size(); ++l) {
    bool layer_any = false;
    for (size_t e = 0; e < per_expert[l].size(); ++e) {
      if (per_expert[l][e] > 0) {
        last_active_[l][e] = it, warned_[l][e] = false, layer_any = true;
      } else if (it - last_active_[l][e] >= alarm && !warned_[l][e]) {
        warned_[l][e] = true;
        std::fprintf(stderr, "warning: layer %d expert %zu has had no active token for %lld steps (dead expert)\n",
                     ids[l], e, static_cast<long long>(it - last_active_[l][e]));
      }
    }
    if (!layer_any && it % alarm == 0)
      std::fprintf(stderr, "warning: layer %d routed no token to any expert in iteration %lld\n", ids[l],
                   static_cast<long long>(it));
  }
}

double Trainer::evaluate() {
  if (!data_->has_valid()) return NAN;
  const int64_t B = cfg_.train.micro_batch, S = cfg_.model.seq_len;
  double sum = 0;
  int64_t n = 0;
  // Data parallel: the ranks share the eval_iters micro-batches and sum their results. Under
  // expert parallelism every forward is collective over the expert-parallel group, so every
  // rank runs the same number of rounds: a rank without a micro-batch in the last round (or
  // past the end of the validation data) runs a stand-in one and does not count it.
  const ParallelLayout& lay = par_->layout;
  const int64_t rounds = (cfg_.train.eval_iters + lay.dp_size - 1) / lay.dp_size;
  bool data_left = true;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t k = round * lay.dp_size + lay.dp_rank;
    std::vector<int32_t> batch;
    if (data_left && k < cfg_.train.eval_iters) batch = data_->valid_batch(k, B);
    data_left = data_left && !(k < cfg_.train.eval_iters && batch.empty());
    const bool counted = !batch.empty();
    if (!counted && lay.ep_size == 1) continue;
    if (!counted) batch.assign(static_cast<size_t>(B * (S + 1)), 0);  // stand-in: token 0 everywhere
    Tensor tok, tgt;
    split_batch(batch, B, S, model_->params().device(), tok, tgt);
    ForwardResult f = model_->forward(tok, tgt, {B, S}, {}, 1.0, false);
    if (!counted) continue;
    sum += f.lm_loss_sum;
    n += f.tokens;
  }
  sum = par_->dp->sum(sum);
  n = par_->dp->sum(n);
  return n ? sum / n : NAN;
}

void Trainer::write_metrics(const std::string& line) {
  if (!metrics_) return;
  std::fputs(line.c_str(), metrics_);
  std::fputc('\n', metrics_);
  std::fflush(metrics_);
}

void Trainer::log_interval(const StepResult& last, double seconds) {
  if (!par_->is_main()) return;  // every rank holds the same numbers: one prints and writes them
  // Averages over the interval's steps; lr, lambda and grad norm are the last step's.
  double lm = 0, reg = 0, act = 0, noexp = 0, ent = 0, eload = 0, rload = 0;
  int64_t tokens = 0, skipped = 0;
  std::vector<double> per_layer(last.act_ratio_per_layer.size(), 0.0);
  for (const StepResult& r : interval_) {
    lm += r.lm_loss, reg += r.reg_loss, act += r.act_ratio, noexp += r.no_expert_frac, ent += r.entropy;
    tokens += r.tokens, skipped += r.skipped;
    eload = std::max(eload, r.expert_load_max_over_mean), rload = std::max(rload, r.rank_load_max_over_mean);
    for (size_t l = 0; l < per_layer.size(); ++l) per_layer[l] += r.act_ratio_per_layer[l];
  }
  const double n = interval_.size();
  lm /= n, reg /= n, act /= n, noexp /= n, ent /= n;
  for (double& v : per_layer) v /= n;
  const double tok_s = tokens / std::max(seconds, 1e-9);
  const double tflops = model_->train_flops_per_token(model_->num_deco_layers() ? act : 0.0) * tok_s / 1e12;
  const size_t mem = allocator_for(model_->params().device()).peak_bytes();
  const bool deco = model_->num_deco_layers() > 0;

  std::printf("iter %6lld/%lld | tokens %10lld | lm_loss %.4f", static_cast<long long>(state_.iteration),
              static_cast<long long>(cfg_.train.iters), static_cast<long long>(state_.consumed_samples * cfg_.model.seq_len), lm);
  if (deco) std::printf(" | reg %.3e | act %.4f | lambda %.3e", reg, act, controller_.lambda());
  std::printf(" | lr %.3e | gnorm %.3f | %.0f tok/s | %.4f TFLOP/s | mem %s%s\n", last.lr, last.grad_norm, tok_s,
              tflops, human_bytes(mem).c_str(), skipped ? cat(" | skipped ", skipped).c_str() : "");
  std::fflush(stdout);

  nlohmann::json j;
  j["iter"] = state_.iteration;
  j["tokens"] = state_.consumed_samples * cfg_.model.seq_len;
  j["consumed_samples"] = state_.consumed_samples;
  j["lm_loss"] = lm;
  j["reg_loss"] = reg;
  j["act_ratio"] = act;
  j["act_ratio_per_layer"] = per_layer;
  j["no_expert_frac"] = noexp;
  j["entropy"] = ent;
  if (deco) {
    j["expert_load_max_over_mean"] = eload;
    j["rank_load_max_over_mean"] = rload;
  }
  j["reg_coef"] = controller_.lambda();
  j["lr"] = last.lr;
  j["grad_norm"] = last.grad_norm;
  j["skipped"] = skipped;
  j["tokens_per_s"] = tok_s;
  j["tflops"] = tflops;
  j["peak_memory_bytes"] = mem;
  // The last step's communication on this rank (rank 0), per group and per group and op.
  j["comm_bytes"] = nlohmann::json::object();
  j["comm_bytes_by_op"] = nlohmann::json::object();
  for (const auto& [group, ops] : last.comm.groups) {
    j["comm_bytes"][group] = last.comm.bytes(group);
    for (const auto& [op, c] : ops) j["comm_bytes_by_op"][group][op] = c.bytes;
  }
  write_metrics(j.dump());
}

void Trainer::train() {
  const TrainConfig& t = cfg_.train;
  if (par_->is_main())
    std::printf("training: %s, %lld parameters (%lld non-embedding), %d DECO layers, data: %s\n",
                cfg_.model.arch.c_str(), static_cast<long long>(model_->params().count()),
                static_cast<long long>(model_->params().count() - 2 * cfg_.model.vocab_size * cfg_.model.hidden),
                model_->num_deco_layers(), data_->describe().c_str());
  std::fflush(stdout);
  auto t0 = std::chrono::steady_clock::now();
  while (state_.iteration < t.iters && !stop_requested_) {
    StepResult r = train_step();
    interval_.push_back(r);
    if (state_.iteration % cfg_.log.interval == 0 || state_.iteration == t.iters) {
      auto t1 = std::chrono::steady_clock::now();
      log_interval(r, std::chrono::duration<double>(t1 - t0).count());
      interval_.clear();
      t0 = std::chrono::steady_clock::now();
    }
    if (t.eval_interval > 0 && (state_.iteration % t.eval_interval == 0 || state_.iteration == t.iters)) {
      double v = evaluate();
      if (std::isfinite(v) && par_->is_main()) {
        std::printf("eval   %6lld | val_loss %.4f | val_ppl %.2f\n", static_cast<long long>(state_.iteration), v,
                    std::exp(v));
        nlohmann::json j;
        j["iter"] = state_.iteration;
        j["val_loss"] = v;
        j["val_ppl"] = std::exp(v);
        write_metrics(j.dump());
      }
      t0 = std::chrono::steady_clock::now();  // evaluation time is not training throughput
    }
    if (after_iteration) after_iteration(*this);
  }
}

}  // namespace decotron
