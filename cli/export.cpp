// decotron export: a checkpoint to a deployable model directory (docs/export-format.md).
#include <cstdio>
#include <filesystem>

#include "checkpoint/checkpoint.h"
#include "checkpoint/manager.h"
#include "checkpoint/resume.h"
#include "cli/commands.h"
#include "inference/export.h"
#include "model/transformer.h"

namespace decotron::cli {

namespace fs = std::filesystem;

namespace {

struct ExportArgs {
  std::string checkpoint, out, dtype = "bf16", tokenizer;
  bool int8 = false, force = false;
};

// A .h5 file as given; a run or checkpoints directory: its newest good checkpoint.
std::string checkpoint_file(const std::string& path) {
  if (fs::is_regular_file(path)) return path;
  if (!fs::exists(path)) fail("checkpoint '", path, "' does not exist: give a .h5 file, a run directory or its checkpoints/");
  return CheckpointManager::read_newest_good(resolve_resume_dir(path)).path;
}

void run_export(const ExportArgs& a) {
  const std::string file = checkpoint_file(a.checkpoint);
  Config cfg = read_checkpoint_config(file);
  const std::string tokenizer = a.tokenizer.empty() ? cfg.data.tokenizer_model : a.tokenizer;
  if (tokenizer.empty())
    fail(file, ": the run's config names no data.tokenizer_model; pass --tokenizer-model MODEL");
  if (!fs::exists(tokenizer))
    fail("tokenizer model '", tokenizer, "' (from ", a.tokenizer.empty() ? "the checkpoint's data.tokenizer_model" : "--tokenizer-model",
         ") does not exist; pass --tokenizer-model MODEL");
  Transformer model(cfg.model, DType::f32, Device::cpu);
  load_model_weights(model, file);
  inference::ExportOptions opt;
  opt.dtype = inference::parse_export_dtype(a.dtype);
  opt.int8 = a.int8;
  opt.force = a.force;
  inference::export_model(model, cfg, tokenizer, a.out, opt);
  std::printf("exported %s (%s%s) to %s: model.safetensors, config.json, tokenizer.model\n", file.c_str(),
              a.dtype.c_str(), a.int8 ? ", int8 weights" : "", a.out.c_str());
}

}  // namespace

void register_export(CLI::App& app) {
  auto a = std::make_shared<ExportArgs>();
  auto* cmd = app.add_subcommand("export", "Export a checkpoint for deployment (safetensors + config.json + tokenizer)");
  cmd->add_option("checkpoint", a->checkpoint, "A checkpoint .h5, or a run directory (its newest good checkpoint)")
      ->required();
  cmd->add_option("--out", a->out, "Output directory (must not exist or be empty, unless --force)")->required();
  cmd->add_option("--dtype", a->dtype, "Weight dtype of the matrices: bf16, fp16 or fp32")
      ->check(CLI::IsMember({"bf16", "fp16", "fp32"}))
      ->capture_default_str();
  cmd->add_flag("--int8", a->int8, "Weight-only int8 matrices with one fp32 scale per output channel");
  cmd->add_flag("--force", a->force, "Replace a non-empty output directory");
  cmd->add_option("--tokenizer-model", a->tokenizer, "SentencePiece model (default: the run's data.tokenizer_model)");
  cmd->callback([a] { run_export(*a); });
}

}  // namespace decotron::cli
