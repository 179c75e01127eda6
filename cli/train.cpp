// decotron train: one training run from a YAML config.
#include <csignal>
#include <filesystem>
#include <fstream>

#include "cli/commands.h"
#include "core/config.h"
#include "trainer/trainer.h"

namespace decotron::cli {

namespace fs = std::filesystem;

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string run_dir;
  bool synthetic = false;
};

void run_train(const TrainArgs& a) {
  Config cfg = load_config(a.config, a.overrides);
  std::string run_dir = a.run_dir.empty() ? "runs/" + fs::path(a.config).stem().string() : a.run_dir;
  if (fs::exists(fs::path(run_dir) / "metrics.jsonl"))
    fail("run directory '", run_dir, "' already holds a run (metrics.jsonl); choose another --run-dir, or move it "
         "away: Decotron never overwrites a saved run");
  fs::create_directories(run_dir);
  {
    std::ofstream out(fs::path(run_dir) / "config.yaml");
    out << config_to_yaml(cfg);
    if (!out) fail("cannot write ", run_dir, "/config.yaml");
  }
  std::unique_ptr<TrainingData> data =
      a.synthetic ? make_synthetic_data(cfg.model.vocab_size, cfg.model.seq_len, cfg.train.seed, 0)
                  : make_training_data(cfg, 0);
  Trainer trainer(cfg, std::move(data), run_dir);
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  trainer.after_iteration = [](Trainer& t) {
    if (g_stop_signal) {
      std::fprintf(stderr, "signal %d: stopping after iteration %lld\n", static_cast<int>(g_stop_signal),
                   static_cast<long long>(t.state().iteration));
      t.request_stop();
    }
  };
  trainer.train();
  std::printf("run directory: %s (config.yaml, metrics.jsonl)\n", run_dir.c_str());
}

}  // namespace

void register_train(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand("train", "Train a DECO or dense model from a YAML config");
  cmd->add_option("--config", args->config, "YAML config (see configs/ and docs/config.md)")->required();
  cmd->add_option("--set", args->overrides, "Override a config key: --set section.key=value (repeatable)");
  cmd->add_option("--run-dir", args->run_dir, "Run directory for config.yaml, metrics.jsonl, checkpoints "
                                              "(default: runs/<config name>)");
  cmd->add_flag("--synthetic-data", args->synthetic,
                "Train on synthetic Markov-chain tokens instead of data.prefixes (smoke tests, benchmarks)");
  cmd->callback([args] { run_train(*args); });
}

void register_config(CLI::App& app) {
  auto file = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  auto doc = std::make_shared<bool>(false);
  auto* cmd = app.add_subcommand("config", "Check and print a resolved config, or print the config reference");
  cmd->add_option("file", *file, "YAML config to check and print with every key resolved");
  cmd->add_option("--set", *overrides, "Override a config key: --set section.key=value (repeatable)");
  cmd->add_flag("--doc", *doc, "Print the reference of every config key in Markdown (docs/config.md)");
  cmd->callback([=] {
    if (*doc) {
      std::fputs(config_reference_markdown().c_str(), stdout);
      return;
    }
    if (file->empty()) fail("decotron config: give a config FILE to check, or --doc");
    std::fputs(config_to_yaml(load_config(*file, *overrides)).c_str(), stdout);
  });
}

}  // namespace decotron::cli
