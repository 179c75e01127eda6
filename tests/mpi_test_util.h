// Helpers of the tests that launch mpirun: a child process with a clean MPI environment, its
// exit code with a time limit, and the metrics.jsonl records of a run.
#pragma once
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

namespace decotron::testing {

inline const char* kMpirun = "mpirun --allow-run-as-root --oversubscribe";

inline std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline std::string fresh_test_dir(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path d = fs::temp_directory_path() / ("decotron_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

// Runs `sh -c command` (output to `log`) in its own process group and returns its exit code
// (128 + signal), or -1 after `limit_s` (the group is then killed). The child does not see this
// process's MPI runtime variables (a test process may be an MPI singleton).
inline int run_command(const std::string& command, const std::string& log, double limit_s = 120) {
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
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

inline std::vector<nlohmann::json> metrics_records(const std::string& metrics) {
  std::vector<nlohmann::json> out;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace decotron::testing
