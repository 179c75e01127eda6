// Configuration: one typed struct per subsystem, each field registered once (name, value,
// one-line doc) so that the YAML loader, `--set section.key=value`, the resolved-config dump and
// docs/config.md all come from the same table. YAML is the truth; unknown keys, wrong types and
// impossible shapes are errors naming the file, the line and the key, raised before any work.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace decotron {

// A field visitor gets: name, reference to the value, doc, and (for strings) allowed choices.
struct ModelConfig {
  std::string arch = "deco";
  int64_t vocab_size = 73448;
  int64_t seq_len = 4096;
  int64_t hidden = 768;
  int64_t layers = 16;
  int64_t heads = 6;
  int64_t kv_heads = 0;
  int64_t ffn_hidden = 1920;
  int64_t experts = 42;
  int64_t expert_width = 64;
  int64_t shared_expert_width = 128;
  int64_t dense_layers = 1;
  std::string expert_scaling = "expert";
  std::string normsilu = "full";
  bool gated_experts = false;
  std::string expert_compute = "sparse";
  bool parameter_parity = true;
  double rope_base = 10000.0;
  double norm_eps = 1e-5;
  double init_std = 0.01;
  double router_scale_init = 0.1;

  template <class V> void fields(V& v) {
    v("arch", arch, "Model family: deco (DECO FFN after the leading dense layers) or dense (SwiGLU everywhere)",
      {"deco", "dense"});
    v("vocab_size", vocab_size, "Vocabulary size (must cover every token id of the data; the tokenizer's size)");
    v("seq_len", seq_len, "Sequence length in tokens (samples are seq_len + 1 tokens)");
    v("hidden", hidden, "Hidden size h");
    v("layers", layers, "Number of transformer layers L");
    v("heads", heads, "Attention heads; head_dim = hidden / heads");
    v("kv_heads", kv_heads, "Key/value heads for grouped-query attention; 0 means as many as heads");
    v("ffn_hidden", ffn_hidden, "Width F of the dense SwiGLU FFN (dense model and DECO's leading dense layers)");
    v("experts", experts, "Routed experts E per DECO layer");
    v("expert_width", expert_width, "Width d of each routed expert (the paper uses 64)");
    v("shared_expert_width", shared_expert_width, "Intermediate size of the always-on shared SwiGLU expert; 0 disables it");
    v("dense_layers", dense_layers, "Leading layers of a DECO model that keep a dense SwiGLU FFN");
    v("expert_scaling", expert_scaling,
      "Router score scaling s = ReLU(r) * g: expert (g learned per expert), scalar (one learned g), fixed (g = "
      "router_scale_init, not learned), none (g = 1, ReMoE style)",
      {"expert", "scalar", "fixed", "none"});
    v("normsilu", normsilu,
      "Expert activation: full (mean, then per-expert RMS, then SiLU), no_mean, no_rms (SiLU(u - mean)), silu",
      {"full", "no_mean", "no_rms", "silu"});
    v("gated_experts", gated_experts, "Gated experts: z = NormSiLU(W_gate x) * (W_up x) (the paper's ablation)");
    v("expert_compute", expert_compute,
      "How the routed experts are computed (the same math): sparse (only active token-expert pairs, cost ~ the "
      "activation ratio) or dense (every expert, then masked by the router; the reference)",
      {"sparse", "dense"});
    v("parameter_parity", parameter_parity,
      "Require 2*E*d + 3*shared = 3*F (DECO has the dense twin's parameter count); gated experts count 3*E*d");
    v("rope_base", rope_base, "Rotary embedding base");
    v("norm_eps", norm_eps, "Epsilon of RMSNorm and NormSiLU");
    v("init_std", init_std, "Standard deviation of the normal init of every matrix");
    v("router_scale_init", router_scale_init, "Initial value of the expert-wise scaling g");
  }
};

struct TrainConfig {
  int64_t iters = 15000;
  int64_t micro_batch = 8;
  int64_t global_batch = 64;
  uint64_t seed = 1234;
  std::string device = "cpu";
  std::string dtype = "fp32";
  double lr = 1.1175e-3;
  double min_lr = 0.0;
  int64_t warmup_iters = 100;
  std::string lr_schedule = "wsd";
  int64_t decay_iters = 1000;
  double weight_decay = 0.1;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.95;
  double adam_eps = 1e-8;
  double clip_grad = 1.0;
  std::string sparsity_reg = "entropy";
  double target_ratio = 0.2;
  double reg_lambda0 = 1e-8;
  double reg_multiplier = 1.002;
  double skip_grad_norm_factor = 0.0;
  int64_t max_skipped_steps = 10;
  int64_t loss_chunk_tokens = 8192;
  bool recompute = false;
  int64_t inactive_alarm_iters = 200;
  int64_t eval_interval = 0;
  int64_t eval_iters = 10;

  template <class V> void fields(V& v) {
    v("iters", iters, "Optimizer steps to train");
    v("micro_batch", micro_batch, "Samples per forward/backward (per data-parallel rank)");
    v("global_batch", global_batch,
      "Samples per optimizer step over all data-parallel ranks; a multiple of micro_batch x data-parallel size "
      "(the quotient is the number of gradient-accumulation micro-steps)");
    v("seed", seed, "Seed of parameter init and of the data order");
    v("device", device, "Where training runs", {"cpu", "cuda"});
    v("dtype", dtype, "Compute dtype. bf16: mixed precision (bf16 weight copies and activations; fp32 master weights, gradients, optimizer state and router); on the CPU bf16 is emulated, for checking only", {"fp32", "bf16"});
    v("lr", lr, "Peak learning rate");
    v("min_lr", min_lr, "Learning rate at the end of the decay");
    v("warmup_iters", warmup_iters, "Linear warmup from 0 to lr over this many steps");
    v("lr_schedule", lr_schedule,
      "After warmup: wsd (constant, then exponential decay to min_lr over the last decay_iters steps), cosine "
      "(to min_lr at iters), constant",
      {"wsd", "cosine", "constant"});
    v("decay_iters", decay_iters, "WSD: length of the final decay phase");
    v("weight_decay", weight_decay,
      "AdamW decoupled weight decay of matrices; norms' weights, the expert scaling g and NormSiLU's gamma are "
      "exempt");
    v("adam_beta1", adam_beta1, "AdamW beta1");
    v("adam_beta2", adam_beta2, "AdamW beta2");
    v("adam_eps", adam_eps, "AdamW epsilon");
    v("clip_grad", clip_grad, "Clip the global gradient norm to this value; 0 disables clipping");
    v("sparsity_reg", sparsity_reg, "Sparsity regularizer on the routers: entropy (DECO), l1 (ReMoE), none",
      {"entropy", "l1", "none"});
    v("target_ratio", target_ratio, "Target activation ratio of the routed experts");
    v("reg_lambda0", reg_lambda0, "Initial and minimum regularization coefficient lambda");
    v("reg_multiplier", reg_multiplier, "Controller step m: lambda *= m above target, lambda /= m below");
    v("skip_grad_norm_factor", skip_grad_norm_factor,
      "Skip a step whose gradient norm exceeds this factor times the mean of the last 20 good steps; 0 disables");
    v("max_skipped_steps", max_skipped_steps, "Stop the run after this many consecutive skipped steps");
    v("loss_chunk_tokens", loss_chunk_tokens,
      "Tokens per chunk of the LM head + cross-entropy: the logits exist as [chunk, vocab] (becoming their own "
      "gradient in place) instead of [micro_batch x seq_len, vocab]; 0: the whole micro-batch at once");
    v("recompute", recompute,
      "Activation recomputation (Megatron's full granularity, every layer): forward keeps only each transformer "
      "block's input and backward runs the block's forward again; about one extra forward pass for most of the "
      "activation memory");
    v("inactive_alarm_iters", inactive_alarm_iters,
      "Warn when a layer or an expert has had no active token for this many steps; 0 disables");
    v("eval_interval", eval_interval, "Evaluate validation loss every N steps (and at the end); 0 disables");
    v("eval_iters", eval_iters, "Micro-batches per validation evaluation");
  }
};

struct DataConfig {
  std::vector<std::string> prefixes;
  std::vector<double> weights;
  std::string split = "969,30,1";
  std::string tokenizer_model;
  std::string cache_dir;

  template <class V> void fields(V& v) {
    v("prefixes", prefixes,
      "Megatron indexed datasets (path prefixes of .bin/.idx pairs); relative paths are relative to the working "
      "directory");
    v("weights", weights, "Blend weights, one per prefix (empty: proportional to size)");
    v("split", split, "train,valid,test proportions over sequences, as Megatron's --split");
    v("tokenizer_model", tokenizer_model, "SentencePiece model (for decoding in logs, inspect and export)");
    v("cache_dir", cache_dir, "Where sample-index files are cached (empty: next to the data)");
  }
};

struct CheckpointConfig {
  std::string dir;
  int64_t interval = 0;
  int64_t keep = 3;
  bool async = false;

  template <class V> void fields(V& v) {
    v("dir", dir, "Checkpoint directory (empty: <run-dir>/checkpoints; relative paths are relative to the working "
                  "directory)");
    v("interval", interval,
      "Save every N steps, a multiple of log.interval (0: only at the end and on SIGTERM/SIGINT)");
    v("keep", keep, "Keep the newest K checkpoints (the one `latest` names is never deleted)");
    v("async", async,
      "Copy the state to host memory, then write the file on a background thread while training goes on");
  }
};

struct LogConfig {
  int64_t interval = 10;

  template <class V> void fields(V& v) { v("interval", interval, "Print a log line and a metrics.jsonl record every N steps"); }
};

struct ParallelConfig {
  int64_t tensor = 1;
  int64_t expert = 1;
  int64_t data = 0;
  bool sequence = false;
  bool distributed_optimizer = false;
  bool overlap_grad_reduce = true;
  bool overlap_param_gather = true;
  double grad_bucket_mb = 25.0;
  double timeout_s = 300.0;
  std::string backend = "auto";

  template <class V> void fields(V& v) {
    v("tensor", tensor, "Tensor-parallel size");
    v("expert", expert, "Expert-parallel size (carved out of the data-parallel ranks)");
    v("data", data, "Data-parallel size; 0 = world / tensor");
    v("sequence", sequence,
      "Sequence parallelism (Megatron's): outside attention and the FFNs, the residual stream and the norms hold "
      "1/tensor of the tokens on each tensor-parallel rank; needs tensor > 1 and micro_batch x seq_len divisible by "
      "tensor");
    v("distributed_optimizer", distributed_optimizer,
      "Shard the AdamW state and the update of the fp32 master weights over the data-parallel ranks (Megatron's "
      "distributed optimizer, ZeRO-1): gradients are reduce-scattered, parameters all-gathered after each step; "
      "optimizer state per rank divided by the data-parallel size, same training");
    v("overlap_grad_reduce", overlap_grad_reduce,
      "Start each gradient bucket's data-parallel reduction during the last micro-batch's backward pass, as soon "
      "as its gradients are complete (bit-identical to reducing after the backward)");
    v("overlap_param_gather", overlap_param_gather,
      "With the distributed optimizer: launch the parameter all-gathers after the update and let the next forward "
      "pass wait for each bucket only when it first needs it (bit-identical to gathering at once)");
    v("grad_bucket_mb", grad_bucket_mb,
      "Size of the data-parallel gradient buckets in MiB: smaller ones start reducing earlier in the backward, "
      "larger ones use the links better");
    v("timeout_s", timeout_s,
      "Watchdog: a collective not completed within this many seconds aborts the job with a diagnostic");
    v("backend", backend,
      "Communication backend: auto (NCCL for train.device cuda where built, else MPI), nccl, or mpi (host "
      "buffers; GPU data staged through host memory: several ranks may share one GPU, which NCCL refuses)",
      {"auto", "nccl", "mpi"});
  }
};

struct Config {
  ModelConfig model;
  TrainConfig train;
  DataConfig data;
  CheckpointConfig checkpoint;
  LogConfig log;
  ParallelConfig parallel;
  // Where each key was last set ("configs/x.yaml:12" or "--set"), for error messages.
  std::map<std::string, std::string> origin;
  std::string source;  // the top-level file

  template <class V> void sections(V& v) {
    v("model", model);
    v("train", train);
    v("data", data);
    v("checkpoint", checkpoint);
    v("log", log);
    v("parallel", parallel);
  }

  // "model.hidden" -> "configs/x.yaml:12: model.hidden" (or the key alone if never set)
  std::string where(const std::string& key) const;
};

// Loads a YAML file (following `include:`), then applies `key=value` overrides, then validates.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Parses a resolved config from YAML text (e.g. stored in a checkpoint); `name` labels errors.
Config config_from_yaml(const std::string& text, const std::string& name);
// Applies one "section.key=value" override (the value parsed as YAML).
void apply_override(Config& cfg, const std::string& assignment);
// Checks shapes and combinations; throws decotron::Error naming the key and its file:line.
void validate_config(const Config& cfg);
// The resolved config as YAML (every field, with its doc as a comment).
std::string config_to_yaml(const Config& cfg);
// The config reference in Markdown (docs/config.md is generated by `decotron config --doc`).
std::string config_reference_markdown();

}  // namespace decotron
