// Helpers of the tests that launch `decotron train` (or this test binary) under mpirun: a tiny
// DECO config, processes with a deadline, metrics.jsonl records.
#pragma once
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace decotron::mpi_test {

inline const char* kMpirun = "mpirun --allow-run-as-root --oversubscribe";

inline std::string mpirun(int np) { return std::string(kMpirun) + " -np " + std::to_string(np) + " "; }

inline std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline std::string fresh_dir(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path d = fs::temp_directory_path() / ("decotron_parallel_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

inline std::string self_exe() {
  char self[4096] = {0};
  if (readlink("/proc/self/exe", self, sizeof self - 1) <= 0) return "";
  return self;
}

// Starts `sh -c command` (output to `log`) in its own process group; returns its pid.
inline pid_t spawn(const std::string& command, const std::string& log) {
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    // This test process may have initialized MPI as a singleton, which leaves its runtime's
    // variables in the environment; a child mpirun must not see them.
    std::vector<std::string> names;
    for (char** e = environ; *e; ++e) {
      std::string var(*e);
      for (const char* prefix : {"OMPI_", "PMIX_", "OPAL_", "ORTE_"})
        if (var.rfind(prefix, 0) == 0) names.push_back(var.substr(0, var.find('=')));
    }
    for (const auto& n : names) unsetenv(n.c_str());
    std::string full = command + " > " + log + " 2>&1";
    execl("/bin/sh", "sh", "-c", full.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  return pid;
}

// Waits up to `limit_s` for `pid`; returns its exit code (128 + signal), or -1 on timeout (the
// process group is then killed).
inline int wait_exit(pid_t pid, double limit_s) {
  auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit_s) {
      kill(-pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

inline int run(const std::string& command, const std::string& log, double limit_s = 120) {
  return wait_exit(spawn(command, log), limit_s);
}

inline std::vector<nlohmann::json> train_records(const std::string& metrics) {
  std::vector<nlohmann::json> out;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// The tiny DECO of the parallel tests, logging every step. expert_compute: dense, so that every
// layout computes the same dense-masked products (the sparse path's per-expert GEMMs see
// different row counts on each data-parallel slice, fp32 rounding differs, and a router logit
// near 0 can flip); the sparse path equals the dense one exactly in fp64
// (test_model_gradients.cpp, test_expert_parallel.cpp), and test_expert_parallel.cpp trains it. Adam's eps is 1e-6: with 1e-8 a weight
// whose gradient is ~0 turns fp32 rounding differences between layouts into lr-sized steps, and
// a router logit then crosses 0 within 20 steps.
inline std::string tiny_config(const std::string& dir, int64_t iters, int64_t global_batch, double timeout_s,
                               const std::string& lr_schedule = "wsd", int64_t checkpoint_interval = 0) {
  std::string path = dir + "/tiny.yaml";
  std::ofstream(path) << "model: {arch: deco, vocab_size: 64, seq_len: 16, hidden: 32, layers: 2, heads: 2,\n"
                         "        ffn_hidden: 64, experts: 8, expert_width: 8, shared_expert_width: 16,\n"
                         "        parameter_parity: false, expert_compute: dense}\n"
                         "train: {iters: " << iters << ", micro_batch: 2, global_batch: " << global_batch
                      << ", warmup_iters: 2, decay_iters: 5, lr_schedule: " << lr_schedule << ",\n"
                         "        reg_lambda0: 1.0e-3, reg_multiplier: 1.05, eval_interval: 10, eval_iters: 4,\n"
                         "        adam_eps: 1.0e-6}\n"
                         "parallel: {timeout_s: " << timeout_s << "}\n"
                         "checkpoint: {interval: " << checkpoint_interval << "}\n"  // 0: at the end only
                         "log: {interval: 1}\n";
  return path;
}

inline std::string train_cmd(const std::string& cfg, const std::string& run_dir) {
  return std::string(DECOTRON_BINARY) + " train --config " + cfg + " --synthetic-data --run-dir " + run_dir;
}

// Returns the relative difference (for the measured numbers the tests print).
inline double expect_close(double a, double b, double rel, const std::string& what) {
  const double diff = std::fabs(a - b), scale = std::max(std::fabs(a), std::fabs(b));
  EXPECT_LE(diff, rel * scale + 1e-12) << what << ": " << a << " vs " << b;
  return scale > 0 ? diff / scale : 0.0;
}

}  // namespace decotron::mpi_test
