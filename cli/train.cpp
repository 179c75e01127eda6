// decotron train: one training run from a YAML config, saving checkpoints and resuming from them
// (docs/checkpoints.md).
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "checkpoint/manager.h"
#include "checkpoint/resume.h"
#include "cli/commands.h"
#include "core/config.h"
#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"
#include "trainer/trainer.h"

namespace decotron::cli {

namespace fs = std::filesystem;

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
// The first SIGTERM/SIGINT asks for a clean stop (finish the step, save, exit 0); a second one
// gets the default action, so an impatient Ctrl-C still kills at once (the atomic saves keep
// the checkpoint directory usable either way).
extern "C" void on_stop_signal(int sig) {
  g_stop_signal = sig;
  std::signal(sig, SIG_DFL);
}

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string run_dir;
  std::string resume;
  bool synthetic = false;
};

// Writes the resolved config to <run_dir>/config.yaml; a different one already there (a
// resume with changed settings) is kept as config.yaml.before-resume-<timestamp>.
void write_run_config(const std::string& run_dir, const std::string& yaml) {
  const fs::path path = fs::path(run_dir) / "config.yaml";
  if (fs::exists(path)) {
    std::ifstream in(path);
    std::stringstream old;
    old << in.rdbuf();
    if (config_differences(old.str(), yaml).empty()) return;  // same values (comments may differ)
    fs::rename(path, path.string() + ".before-resume-" + utc_timestamp());
  }
  std::ofstream out(path);
  out << yaml;
  if (!out) fail("cannot write ", path.string());
}

// What a `train` invocation resolves to before any work: where the run lives, its config, and
// the checkpoint it resumes from (if any).
struct Plan {
  std::string run_dir;
  std::string source;  // checkpoint directory to resume from; "" for a fresh run
  Config cfg;
  std::optional<CheckpointManager::Loaded> loaded;
  double read_seconds = 0;
};

Plan plan_run(const TrainArgs& a) {
  Plan p;
  // Which checkpoints to resume from: --resume DIR, or the run directory's own (below).
  p.source = a.resume.empty() ? "" : resolve_resume_dir(a.resume);
  p.run_dir = a.run_dir;
  if (p.run_dir.empty()) {
    if (!a.resume.empty() && p.source != a.resume) p.run_dir = a.resume;  // --resume named a run dir
    else if (!a.config.empty()) p.run_dir = "runs/" + fs::path(a.config).stem().string();
    else fail("--resume ", a.resume, " is a checkpoint directory: give --run-dir for the run's metrics, or --config");
  }
  if (!a.config.empty()) {
    p.cfg = load_config(a.config, a.overrides);
    const std::string own = checkpoint_dir_for(p.cfg, p.run_dir);
    if (p.source.empty() && CheckpointManager::has_checkpoints(own)) {
      p.source = own;
      std::printf("run directory %s already holds checkpoints in %s: resuming from them (use another --run-dir "
                  "for a fresh run)\n", p.run_dir.c_str(), own.c_str());
      std::fflush(stdout);
    }
  } else if (p.source.empty()) {
    p.source = (fs::path(p.run_dir) / "checkpoints").string();
    if (!CheckpointManager::has_checkpoints(p.source))
      fail("--config is required (only a resumed run can take its config from its checkpoint, and ", p.source,
           " holds none)");
  }
  if (!p.source.empty()) {
    auto t0 = std::chrono::steady_clock::now();
    p.loaded = CheckpointManager::read_newest_good(p.source);
    p.read_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string& stored = p.loaded->data.config_yaml;
    if (a.config.empty()) {
      p.cfg = config_from_yaml(stored, p.loaded->path + ":/config");
      for (const auto& o : a.overrides) apply_override(p.cfg, o);
      validate_config(p.cfg);
    } else if (std::string diff = config_differences(stored, config_to_yaml(p.cfg)); !diff.empty()) {
      std::printf("note: the config differs from the one stored in %s (the new values apply from here on):\n%s",
                  p.loaded->path.c_str(), diff.c_str());
      std::fflush(stdout);
    }
  }
  if (!p.loaded && fs::exists(fs::path(p.run_dir) / "metrics.jsonl"))
    fail("run directory '", p.run_dir, "' already holds a run (metrics.jsonl) but no checkpoint in ",
         checkpoint_dir_for(p.cfg, p.run_dir), "; choose another --run-dir, or move it away: Decotron never "
         "overwrites a saved run");
  return p;
}

// Every rank must train the same model on the same settings (a rank launched with another
// --set would silently diverge): the resolved configs' hashes are compared.
void check_same_config_on_all_ranks(Communicator& world, const std::string& yaml) {
  const int64_t mine = static_cast<int64_t>(std::hash<std::string>{}(yaml) & 0x7fffffffffffffffull);
  std::vector<int64_t> all(world.size());
  world.all_gather(&mine, all.data(), 1, CommType::i64);
  std::string differ;
  for (int r = 0; r < world.size(); ++r)
    if (all[r] != all[0]) differ += cat(differ.empty() ? "" : ", ", r);
  if (!differ.empty())
    fail("the resolved config differs between ranks (rank(s) ", differ, " vs rank 0): launch every rank with the "
         "same --config and --set arguments");
}

void run_train(const TrainArgs& a) {
  // Installed first: a signal during setup then also stops the run cleanly at its first step.
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  // Under mpirun/srun every rank runs this; rank 0 alone prints (the others keep stderr for
  // warnings and errors) and writes config.yaml, metrics.jsonl and checkpoints.
  mpi_ensure_initialized();
  const bool main_rank = mpi_world_rank() == 0;
  if (!main_rank && !std::freopen("/dev/null", "w", stdout)) fail("cannot silence stdout of rank ", mpi_world_rank());
  Plan p = plan_run(a);
  const Config& cfg = p.cfg;
  // Before the groups are built from cfg.parallel (different sizes on different ranks would
  // build mismatched groups).
  check_same_config_on_all_ranks(*MpiCommunicator::world(cfg.parallel.timeout_s, std::make_shared<CollectiveLog>()),
                                 config_to_yaml(cfg));
  // Collective over the world: no rank gets past it (and creates metrics.jsonl) before every
  // rank has planned its run (plan_run refuses a directory that holds metrics but no checkpoint).
  std::shared_ptr<ParallelContext> par =
      make_parallel_context(cfg.parallel, cfg.train.device == "cuda" ? Device::cuda : Device::cpu);
  par->world->barrier();
  const ParallelLayout& lay = par->layout;

  const int64_t consumed = p.loaded ? p.loaded->data.state.consumed_samples : 0;
  std::unique_ptr<TrainingData> data =
      a.synthetic ? make_synthetic_data(cfg.model.vocab_size, cfg.model.seq_len, cfg.train.seed, consumed,
                                        lay.dp_rank, lay.dp_size)
                  : make_training_data(cfg, consumed, lay.dp_rank, lay.dp_size);
  Trainer trainer(cfg, std::move(data), p.run_dir, par);
  // Checkpoints hold whole tensors and the main rank alone writes them. Data-parallel replicas
  // hold the same state; the tensor- and expert-parallel ranks of the main rank's TP x EP grid
  // take part in gathering the split tensors, and every data-parallel rank in gathering the
  // distributed optimizer's shards.
  std::optional<CheckpointManager> manager;
  if (main_rank || trainer.checkpoint_is_collective())
    manager.emplace(checkpoint_dir_for(cfg, p.run_dir), cfg.checkpoint.keep, cfg.checkpoint.async, main_rank);
  if (p.loaded) {
    // Restored (and the shapes checked) before metrics.jsonl is touched.
    restore_checkpoint(trainer, p.loaded->data, p.loaded->path);
    std::printf("resumed from %s at iteration %lld (%lld samples consumed; read and checked in %.3f s)\n",
                p.loaded->path.c_str(), static_cast<long long>(trainer.state().iteration),
                static_cast<long long>(trainer.state().consumed_samples), p.read_seconds);
    if (main_rank) {
      // The dead run's records after the checkpoint would repeat in the resumed trajectory.
      std::string side = discard_metrics_after((fs::path(p.run_dir) / "metrics.jsonl").string(),
                                               trainer.state().iteration);
      if (!side.empty()) std::printf("metrics.jsonl records after the checkpoint moved to %s\n", side.c_str());
    }
    std::error_code ec;
    if (manager && fs::equivalent(p.source, manager->dir(), ec)) manager->mark_saved(trainer.state().iteration);
    std::fflush(stdout);
    p.loaded.reset();  // the host copy is no longer needed
  }
  if (main_rank) write_run_config(p.run_dir, config_to_yaml(cfg));

  const int64_t interval = cfg.checkpoint.interval;
  trainer.after_iteration = [&manager, interval](Trainer& t) {
    if (manager && interval > 0 && t.state().iteration % interval == 0) manager->save(t);
    // A signal may reach one rank only (a scheduler, a user's kill): every rank learns of it
    // here, so that all stop after the same iteration.
    const int64_t signalled = t.parallel().world->sum(int64_t{g_stop_signal != 0});
    if (signalled > 0) {
      if (g_stop_signal || t.parallel().is_main())
        std::fprintf(stderr, "%s: stopping after iteration %lld%s\n",
                     g_stop_signal ? cat("signal ", static_cast<int>(g_stop_signal)).c_str() : "stop request",
                     static_cast<long long>(t.state().iteration),
                     t.parallel().layout.world_size > 1 ? cat(" (", signalled, " rank(s) signalled)").c_str() : "");
      t.request_stop();
    }
  };
  trainer.train();
  // At the end, and after a stop request: a signal-triggered save may fall inside a log
  // interval (docs/checkpoints.md says what a resume from it does to metrics.jsonl).
  if (manager) {
    manager->save(trainer);
    manager->wait();
    if (main_rank)
      std::printf("run directory: %s (config.yaml, metrics.jsonl, checkpoints in %s)\n", p.run_dir.c_str(),
                  manager->dir().c_str());
  }
  if (main_rank && lay.world_size > 1)
    std::printf("communication on rank 0 (whole run: steps, evaluations, checkpoints): %s\n",
                par->log->traffic().summary().c_str());
  std::fflush(stdout);
  // No rank leaves (and finalizes MPI) while the main rank may still fail its save.
  par->world->barrier();
}

}  // namespace

void register_train(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand("train", "Train a DECO or dense model from a YAML config");
  cmd->add_option("--config", args->config,
                  "YAML config (see configs/ and docs/config.md); when resuming, the checkpoint's config is used "
                  "if this is omitted");
  cmd->add_option("--set", args->overrides, "Override a config key: --set section.key=value (repeatable)");
  cmd->add_option("--run-dir", args->run_dir, "Run directory for config.yaml, metrics.jsonl, checkpoints "
                                              "(default: runs/<config name>)");
  cmd->add_option("--resume", args->resume,
                  "Resume from the newest good checkpoint in DIR (a run directory or its checkpoint directory); "
                  "a --run-dir that already holds checkpoints resumes from them without this flag");
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
