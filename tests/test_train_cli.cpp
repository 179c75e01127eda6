// `decotron train` end to end through the command line.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace {

struct CliRun {
  int code;
  std::string out;
};

CliRun run(const std::string& args) {
  std::string cmd = std::string(DECOTRON_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::string tiny_config(const fs::path& dir) {
  fs::create_directories(dir);
  fs::path f = dir / "tiny.yaml";
  std::ofstream(f) << "model:\n  arch: deco\n  vocab_size: 64\n  seq_len: 16\n  hidden: 32\n  layers: 2\n"
                      "  heads: 2\n  ffn_hidden: 64\n  experts: 8\n  expert_width: 8\n  shared_expert_width: 16\n"
                      "  parameter_parity: false\n"
                      "train:\n  iters: 20\n  micro_batch: 2\n  global_batch: 4\n  warmup_iters: 2\n"
                      "  decay_iters: 5\n  eval_interval: 10\n  eval_iters: 2\nlog:\n  interval: 5\n";
  return f.string();
}

}  // namespace

TEST(TrainCli, WritesResolvedConfigAndMetrics) {
  fs::path dir = fs::temp_directory_path() / "decotron_train_cli";
  fs::remove_all(dir);
  std::string cfg = tiny_config(dir);
  CliRun r = run("train --config " + cfg + " --synthetic-data --run-dir " + (dir / "run").string() +
              " --set train.seed=7");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("iter     20/20"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("val_loss"), std::string::npos) << r.out;
  std::ifstream m(dir / "run" / "metrics.jsonl");
  int records = 0, evals = 0;
  for (std::string line; std::getline(m, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("val_loss")) {
      ++evals;
      continue;
    }
    ++records;
    for (const char* key : {"iter", "tokens", "lm_loss", "reg_loss", "act_ratio", "act_ratio_per_layer", "reg_coef",
                            "lr", "grad_norm", "tokens_per_s", "tflops", "peak_memory_bytes", "no_expert_frac"})
      EXPECT_TRUE(j.contains(key)) << key << " missing in " << line;
    EXPECT_EQ(j["act_ratio_per_layer"].size(), 1u);
  }
  EXPECT_EQ(records, 4);
  EXPECT_EQ(evals, 2);
  std::ifstream c(dir / "run" / "config.yaml");
  std::string text((std::istreambuf_iterator<char>(c)), {});
  EXPECT_NE(text.find("seed: 7"), std::string::npos);
  // A second run into the same directory resumes from its checkpoint (here: already finished)
  // and never rewrites what the first wrote.
  CliRun again = run("train --config " + cfg + " --synthetic-data --run-dir " + (dir / "run").string() +
                     " --set train.seed=7");
  EXPECT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("resuming"), std::string::npos) << again.out;
  std::ifstream m2(dir / "run" / "metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(m2, line);) ++lines;
  EXPECT_EQ(lines, records + evals);
  // A run directory with metrics but no checkpoint is refused.
  fs::create_directories(dir / "bare");
  fs::copy_file(dir / "run" / "metrics.jsonl", dir / "bare" / "metrics.jsonl");
  CliRun bare = run("train --config " + cfg + " --synthetic-data --run-dir " + (dir / "bare").string());
  EXPECT_EQ(bare.code, 1);
  EXPECT_NE(bare.out.find("already holds a run"), std::string::npos) << bare.out;
}

TEST(TrainCli, UserErrorsAreClear) {
  fs::path dir = fs::temp_directory_path() / "decotron_train_cli_err";
  fs::remove_all(dir);
  std::string cfg = tiny_config(dir);
  CliRun missing = run("train --config /nonexistent.yaml");
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE(missing.out.find("does not exist"), std::string::npos) << missing.out;
  CliRun badset = run("train --config " + cfg + " --set train.lr=fast --synthetic-data");
  EXPECT_EQ(badset.code, 1);
  EXPECT_NE(badset.out.find("train.lr"), std::string::npos) << badset.out;
  CliRun nodata = run("train --config " + cfg + " --run-dir " + (dir / "r").string());
  EXPECT_EQ(nodata.code, 1);
  EXPECT_NE(nodata.out.find("data.prefixes"), std::string::npos) << nodata.out;
  CliRun cuda = run("train --config " + cfg + " --set train.device=cuda --synthetic-data --run-dir " + (dir / "c").string());
  EXPECT_EQ(cuda.code, 1) << cuda.out;
  EXPECT_NE(cuda.out.find("train.device"), std::string::npos) << cuda.out;
  EXPECT_EQ(run("train --help").code, 0);
}

// bench kernels runs every kernel at a config's shapes (here the CPU, fp32 and emulated bf16)
// and prints one row each; a filter that matches nothing is a clear error.
TEST(TrainCli, BenchKernelsRunsEveryKernel) {
  fs::path dir = fs::temp_directory_path() / "decotron_cli_bench_kernels";
  fs::remove_all(dir);
  const std::string cfg = tiny_config(dir);
  for (const char* dtype : {"fp32", "bf16"}) {
    CliRun r = run("bench kernels --config " + cfg + " --iters 1 --warmup 0 --set train.dtype=" + dtype);
    ASSERT_EQ(r.code, 0) << r.out;
    for (const char* k : {"linear qkv fwd", "linear lm head chunk bwd", "attention bwd", "rmsnorm bwd", "rope fwd",
                          "embedding bwd", "swiglu bwd", "route_pairs", "grouped_experts fwd", "grouped_experts bwd",
                          "combine_pairs", "pairs_to_slots", "cross_entropy", "adamw_update", "convert fp32->bf16", "sum_squares"})
      EXPECT_NE(r.out.find(std::string("| ") + k), std::string::npos) << dtype << ": no row for " << k << "\n" << r.out;
    EXPECT_NE(r.out.find("ceilings measured now"), std::string::npos) << r.out;
  }
  CliRun only = run("bench kernels --config " + cfg + " --iters 1 --only attention");
  EXPECT_EQ(only.code, 0) << only.out;
  EXPECT_EQ(only.out.find("| rmsnorm"), std::string::npos) << only.out;
  CliRun none = run("bench kernels --config " + cfg + " --only nosuchkernel");
  EXPECT_EQ(none.code, 1) << none.out;
  EXPECT_NE(none.out.find("--only"), std::string::npos) << none.out;
}
