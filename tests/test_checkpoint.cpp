// Checkpoints: bit-exact round trips, the manager's atomic/keep/fallback rules, async saves,
// and `decotron train` killed, stopped and resumed as a subprocess.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "checkpoint/checkpoint.h"
#include "checkpoint/manager.h"
#include "checkpoint/resume.h"

extern char** environ;

using namespace decotron;
namespace fs = std::filesystem;

namespace {

Config tiny_config() {
  Config c;
  ModelConfig& m = c.model;
  m.arch = "deco";
  m.vocab_size = 64, m.seq_len = 16, m.hidden = 32, m.layers = 2, m.heads = 2, m.ffn_hidden = 64;
  m.experts = 8, m.expert_width = 8, m.shared_expert_width = 16, m.parameter_parity = false;
  TrainConfig& t = c.train;
  t.iters = 40, t.micro_batch = 4, t.global_batch = 8, t.lr = 1e-2, t.warmup_iters = 5;
  t.lr_schedule = "constant", t.reg_lambda0 = 1e-3, t.reg_multiplier = 1.05, t.eval_iters = 2;
  t.skip_grad_norm_factor = 50;  // so recent_grad_norms matters
  c.log.interval = 5;
  validate_config(c);
  return c;
}

std::unique_ptr<Trainer> make_trainer(const Config& c, int64_t consumed = 0) {
  return std::make_unique<Trainer>(c, make_synthetic_data(64, 16, c.train.seed, consumed), "");
}

std::string fresh_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / "decotron_ckpt_test" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Every tensor and every piece of state, bit for bit.
void expect_same_state(Trainer& a, Trainer& b) {
  auto pa = a.optimizer().params(), pb = b.optimizer().params();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(same_bits(pa[i]->value, pb[i]->value)) << pa[i]->name;
    EXPECT_TRUE(same_bits(a.optimizer().moments()[i].exp_avg, b.optimizer().moments()[i].exp_avg)) << pa[i]->name;
    EXPECT_TRUE(same_bits(a.optimizer().moments()[i].exp_avg_sq, b.optimizer().moments()[i].exp_avg_sq))
        << pa[i]->name;
  }
  EXPECT_EQ(a.optimizer().step(), b.optimizer().step());
  EXPECT_EQ(a.state().iteration, b.state().iteration);
  EXPECT_EQ(a.state().consumed_samples, b.state().consumed_samples);
  EXPECT_EQ(a.state().skipped_total, b.state().skipped_total);
  EXPECT_EQ(a.state().consecutive_skips, b.state().consecutive_skips);
  EXPECT_EQ(a.state().recent_grad_norms, b.state().recent_grad_norms);
  EXPECT_EQ(a.controller().lambda(), b.controller().lambda());
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// A metrics line without its wall-clock fields.
std::string without_timing(const std::string& line) {
  nlohmann::json j = nlohmann::json::parse(line);
  j.erase("tokens_per_s");
  j.erase("tflops");
  j.erase("peak_memory_bytes");  // a measurement of the process, like the two above
  return j.dump();
}

int64_t last_iter(const std::string& metrics) {
  int64_t it = -1;
  for (const std::string& l : read_lines(metrics)) {
    try {
      it = std::max<int64_t>(it, nlohmann::json::parse(l).value("iter", int64_t{-1}));
    } catch (const nlohmann::json::exception&) {
    }
  }
  return it;
}

// Byte offset in the file of a contiguous dataset's data.
haddr_t data_offset(const std::string& file, const std::string& dataset) {
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  hid_t d = H5Dopen2(f, dataset.c_str(), H5P_DEFAULT);
  haddr_t off = H5Dget_offset(d);
  H5Dclose(d);
  H5Fclose(f);
  return off;
}

void flip_byte(const std::string& file, size_t offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(offset);
  char c = 0;
  f.read(&c, 1);
  c ^= 0x10;
  f.seekp(offset);
  f.write(&c, 1);
}

// `decotron train ...` as a child process, stdout and stderr to <log>.
pid_t spawn_train(const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> argv_s = {DECOTRON_BINARY, "train"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  EXPECT_EQ(rc, 0) << "cannot start " << DECOTRON_BINARY;
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Runs to completion; returns the exit code.
int run_train(const std::vector<std::string>& args, const std::string& log) {
  return wait_exit(spawn_train(args, log));
}

// Polls a run's metrics until they reach `iter` (or the process exits), then sends `sig`.
void signal_at(pid_t pid, const std::string& metrics, int64_t iter, int sig) {
  for (;;) {
    if (last_iter(metrics) >= iter) break;
    if (waitpid(pid, nullptr, WNOHANG) == pid) FAIL() << "the run ended before iteration " << iter;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  kill(pid, sig);
}

// The subprocess config: the tiny model, with batches big enough (10 micro-batches a step)
// that a test polling the metrics can stop it in the middle of a 40-step run.
std::string write_cli_config(const std::string& dir, bool async = false) {
  std::string path = dir + "/tiny.yaml";
  std::ofstream(path) << "model: {arch: deco, vocab_size: 64, seq_len: 16, hidden: 32, layers: 2, heads: 2,\n"
                         "        ffn_hidden: 64, experts: 8, expert_width: 8, shared_expert_width: 16,\n"
                         "        parameter_parity: false}\n"
                         "train: {iters: 40, micro_batch: 16, global_batch: 160, lr: 1.0e-2, warmup_iters: 5,\n"
                         "        lr_schedule: constant, reg_lambda0: 1.0e-3, reg_multiplier: 1.05,\n"
                         "        eval_interval: 10, eval_iters: 2, skip_grad_norm_factor: 50}\n"
                         "checkpoint: {interval: 10, keep: 2, async: " << (async ? "true" : "false") << "}\n"
                         "log: {interval: 5}\n";
  return path;
}

void expect_same_metrics(const std::string& a, const std::string& b) {
  auto la = read_lines(a), lb = read_lines(b);
  ASSERT_EQ(la.size(), lb.size()) << a << " vs " << b;
  for (size_t i = 0; i < la.size(); ++i) EXPECT_EQ(without_timing(la[i]), without_timing(lb[i])) << "line " << i + 1;
}

}  // namespace

TEST(CheckpointFile, RoundTripIsBitExactAndTrainingContinuesIdentically) {
  const std::string dir = fresh_dir("roundtrip");
  Config c = tiny_config();
  auto a = make_trainer(c);
  for (int i = 0; i < 7; ++i) a->train_step();
  save_checkpoint(*a, dir + "/a.h5");

  auto b = make_trainer(c);
  b->train_step();  // b differs from a in every respect until loaded
  load_checkpoint(*b, dir + "/a.h5");
  expect_same_state(*a, *b);

  // Exact resume: the data restarts at consumed_samples, and both go on identically.
  b->set_data(make_synthetic_data(64, 16, c.train.seed, b->state().consumed_samples));
  for (int i = 0; i < 3; ++i) {
    StepResult ra = a->train_step(), rb = b->train_step();
    EXPECT_EQ(ra.lm_loss, rb.lm_loss);
    EXPECT_EQ(ra.grad_norm, rb.grad_norm);
  }
  expect_same_state(*a, *b);
}

TEST(CheckpointFile, StoresConfigVersionsAndWeightsForExport) {
  const std::string dir = fresh_dir("config");
  Config c = tiny_config();
  c.train.seed = 77;
  auto a = make_trainer(c);
  a->train_step();
  save_checkpoint(*a, dir + "/a.h5");

  Config back = read_checkpoint_config(dir + "/a.h5");
  EXPECT_EQ(back.train.seed, 77u);
  EXPECT_EQ(config_differences(config_to_yaml(c), config_to_yaml(back)), "");

  CheckpointData d = read_checkpoint(dir + "/a.h5", true);
  EXPECT_EQ(d.format_version, kCheckpointFormatVersion);
  EXPECT_FALSE(d.decotron_version.empty());
  EXPECT_EQ(d.hdf5_version.substr(0, 3), "1.1");
  EXPECT_EQ(d.seed, 77u);
  EXPECT_TRUE(d.exp_avg.empty());
  const CheckpointTensor& up = *std::find_if(d.model.begin(), d.model.end(),
                                             [](const auto& t) { return t.name == "layers.1.ffn.w_up"; });
  EXPECT_EQ(up.partition, Partition::expert_rows);
  EXPECT_EQ(up.expert_block, 8);

  Transformer m(c.model, DType::f32, Device::cpu);
  load_model_weights(m, dir + "/a.h5");
  for (Parameter* p : m.params().all())
    EXPECT_TRUE(same_bits(p->value, a->model().params().find(p->name).value)) << p->name;
}

TEST(CheckpointFile, MismatchedModelShapeIsAClearError) {
  const std::string dir = fresh_dir("mismatch");
  Config c = tiny_config();
  auto a = make_trainer(c);
  save_checkpoint(*a, dir + "/a.h5");
  Config wide = c;
  wide.model.hidden = 48;
  auto b = make_trainer(wide);
  std::string msg = error_of([&] { load_checkpoint(*b, dir + "/a.h5"); });
  EXPECT_NE(msg.find(dir + "/a.h5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("embedding"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[64, 32]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[64, 48]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--resume"), std::string::npos) << msg;
}

TEST(CheckpointManager, KeepsTheNewestAndUpdatesLatest) {
  const std::string dir = fresh_dir("keep");
  auto t = make_trainer(tiny_config());
  CheckpointManager m(dir, 2, false);
  for (int i = 0; i < 4; ++i) {
    t->train_step();
    m.save(*t);
    m.save(*t);  // the same iteration again: nothing written
  }
  EXPECT_EQ(CheckpointManager::list(dir), (std::vector<std::string>{dir + "/iter_0000004.h5", dir + "/iter_0000003.h5"}));
  EXPECT_EQ(CheckpointManager::latest(dir), dir + "/iter_0000004.h5");
  for (const auto& e : fs::directory_iterator(dir)) EXPECT_NE(e.path().filename().string()[0], '.');
}

TEST(CheckpointManager, TruncatedOrCorruptNewestFallsBackToThePreviousGoodOne) {
  const std::string dir = fresh_dir("fallback");
  auto t = make_trainer(tiny_config());
  CheckpointManager m(dir, 5, false);
  for (int i = 0; i < 4; ++i) {
    t->train_step();
    m.save(*t);
  }
  // Newest truncated (a crash of a non-atomic copy, a full disk): iteration 3 is used.
  fs::resize_file(dir + "/iter_0000004.h5", fs::file_size(dir + "/iter_0000004.h5") / 2);
  testing::internal::CaptureStderr();
  auto l = CheckpointManager::read_newest_good(dir);
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(l.path, dir + "/iter_0000003.h5");
  EXPECT_EQ(l.data.state.iteration, 3);
  EXPECT_NE(err.find("iter_0000004.h5 is unusable"), std::string::npos) << err;

  // One flipped byte in a tensor of iteration 3: the CRC catches it, iteration 2 is used.
  const std::string name = t->model().params().all().front()->name;
  flip_byte(dir + "/iter_0000003.h5", data_offset(dir + "/iter_0000003.h5", "/optimizer/exp_avg_sq/" + name) + 5);
  testing::internal::CaptureStderr();
  l = CheckpointManager::read_newest_good(dir);
  err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(l.path, dir + "/iter_0000002.h5");
  EXPECT_NE(err.find("checksum mismatch"), std::string::npos) << err;

  // A missing dataset in iteration 2: iteration 1.
  {
    hid_t f = H5Fopen((dir + "/iter_0000002.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(H5Ldelete(f, ("/model/" + name).c_str(), H5P_DEFAULT), 0);
    H5Fclose(f);
  }
  testing::internal::CaptureStderr();
  l = CheckpointManager::read_newest_good(dir);
  err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(l.path, dir + "/iter_0000001.h5");

  // Nothing good at all: a clear error naming the directory.
  fs::resize_file(dir + "/iter_0000001.h5", 100);
  testing::internal::CaptureStderr();
  std::string msg = error_of([&] { CheckpointManager::read_newest_good(dir); });
  testing::internal::GetCapturedStderr();
  EXPECT_NE(msg.find("no usable checkpoint in " + dir), std::string::npos) << msg;
}

TEST(CheckpointManager, AsyncSaveWritesTheSnapshotTakenAtSaveTime) {
  const std::string sync_dir = fresh_dir("sync"), async_dir = fresh_dir("async");
  auto t = make_trainer(tiny_config());
  for (int i = 0; i < 3; ++i) t->train_step();
  CheckpointManager sync(sync_dir, 3, false), async(async_dir, 3, true);
  sync.save(*t);
  async.save(*t);
  t->train_step();  // training goes on while the background write runs
  async.wait();
  const std::string a = read_file(sync_dir + "/iter_0000003.h5"), b = read_file(async_dir + "/iter_0000003.h5");
  EXPECT_GT(a.size(), 100000u);
  EXPECT_TRUE(a == b) << "async and sync files differ";
  async.save(*t);  // the next one, then the destructor joins
}

TEST(CheckpointConfig, IntervalMustBeAMultipleOfTheLogInterval) {
  Config c = tiny_config();
  c.checkpoint.interval = 12;
  std::string msg = error_of([&] { validate_config(c); });
  EXPECT_NE(msg.find("checkpoint.interval"), std::string::npos) << msg;
  EXPECT_NE(msg.find("log.interval"), std::string::npos) << msg;
  c.checkpoint.interval = 15;
  EXPECT_NO_THROW(validate_config(c));
}

TEST(CheckpointResume, DiscardsMetricsWrittenAfterTheCheckpoint) {
  const std::string dir = fresh_dir("discard");
  const std::string metrics = dir + "/metrics.jsonl";
  std::ofstream(metrics) << "{\"iter\":5}\n{\"iter\":10}\n{\"iter\":10,\"val_loss\":1}\n{\"iter\":15}\n{\"iter\":2";
  std::string side = discard_metrics_after(metrics, 10);
  EXPECT_EQ(read_lines(metrics), (std::vector<std::string>{"{\"iter\":5}", "{\"iter\":10}", "{\"iter\":10,\"val_loss\":1}"}));
  EXPECT_EQ(read_lines(side), (std::vector<std::string>{"{\"iter\":15}", "{\"iter\":2"}));
  EXPECT_EQ(discard_metrics_after(metrics, 10), "");
}

TEST(CheckpointResume, KilledRunResumesToTheUninterruptedTrajectory) {
  const std::string dir = fresh_dir("kill");
  const std::string cfg = write_cli_config(dir);
  ASSERT_EQ(run_train({"--config", cfg, "--run-dir", dir + "/full", "--synthetic-data"}, dir + "/full.log"), 0)
      << read_file(dir + "/full.log");

  const std::string run = dir + "/killed", metrics = run + "/metrics.jsonl";
  pid_t pid = spawn_train({"--config", cfg, "--run-dir", run, "--synthetic-data"}, dir + "/killed.log");
  signal_at(pid, metrics, 25, SIGKILL);
  EXPECT_EQ(wait_exit(pid), 128 + SIGKILL);
  const int64_t died_at = last_iter(metrics);
  ASSERT_LT(died_at, 40) << "the run finished before it was killed";
  const int64_t saved = CheckpointManager::read_newest_good(run + "/checkpoints").data.state.iteration;

  // The same command again: the run directory holds checkpoints, so it resumes.
  ASSERT_EQ(run_train({"--config", cfg, "--run-dir", run, "--synthetic-data"}, dir + "/resume.log"), 0)
      << read_file(dir + "/resume.log");
  const std::string log = read_file(dir + "/resume.log");
  EXPECT_NE(log.find("resuming"), std::string::npos) << log;
  expect_same_metrics(dir + "/full/metrics.jsonl", metrics);
  bool side_file = false;
  for (const auto& e : fs::directory_iterator(run))
    side_file |= e.path().filename().string().starts_with("metrics.jsonl.discarded-");
  EXPECT_EQ(side_file, died_at > saved) << "died at " << died_at << ", checkpoint " << saved;
  // keep: 2, and the final checkpoint is the last iteration.
  EXPECT_EQ(CheckpointManager::list(run + "/checkpoints").size(), 2u);
  EXPECT_EQ(CheckpointManager::latest(run + "/checkpoints"), run + "/checkpoints/iter_0000040.h5");
}

TEST(CheckpointResume, SigtermSavesAndExitsZeroThenResumeFinishes) {
  const std::string dir = fresh_dir("sigterm");
  const std::string cfg = write_cli_config(dir, true);  // async saves: the exit joins the writer
  const std::string run = dir + "/run", metrics = run + "/metrics.jsonl";
  pid_t pid = spawn_train({"--config", cfg, "--run-dir", run, "--synthetic-data"}, dir + "/run.log");
  signal_at(pid, metrics, 15, SIGTERM);
  ASSERT_EQ(wait_exit(pid), 0) << read_file(dir + "/run.log");
  const auto loaded = CheckpointManager::read_newest_good(run + "/checkpoints");
  const int64_t stopped = loaded.data.state.iteration;
  EXPECT_GE(stopped, 15);
  EXPECT_LT(stopped, 40);
  EXPECT_NE(read_file(dir + "/run.log").find("stopping after iteration " + std::to_string(stopped)), std::string::npos);

  // --resume with no --config: the config comes from the checkpoint.
  ASSERT_EQ(run_train({"--resume", run, "--synthetic-data"}, dir + "/resume.log"), 0) << read_file(dir + "/resume.log");
  EXPECT_EQ(last_iter(metrics), 40);
  EXPECT_EQ(CheckpointManager::latest(run + "/checkpoints"), run + "/checkpoints/iter_0000040.h5");
}

TEST(CheckpointResume, RunDirWithMetricsButNoCheckpointIsRefused) {
  const std::string dir = fresh_dir("refuse");
  const std::string cfg = write_cli_config(dir);
  fs::create_directories(dir + "/run");
  std::ofstream(dir + "/run/metrics.jsonl") << "{\"iter\":5}\n";
  EXPECT_EQ(run_train({"--config", cfg, "--run-dir", dir + "/run", "--synthetic-data"}, dir + "/log"), 1);
  EXPECT_NE(read_file(dir + "/log").find("no checkpoint"), std::string::npos) << read_file(dir + "/log");
  EXPECT_EQ(read_lines(dir + "/run/metrics.jsonl").size(), 1u);
}
