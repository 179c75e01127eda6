#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/config.h"
#include "core/error.h"

using namespace decotron;
namespace fs = std::filesystem;

namespace {

std::string write_file(const std::string& name, const std::string& text) {
  fs::path dir = fs::temp_directory_path() / "decotron_config_test";
  fs::create_directories(dir);
  fs::path p = dir / name;
  std::ofstream(p) << text;
  return p.string();
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Config, UnknownKeyNamesFileLineAndSuggests) {
  std::string f = write_file("unknown.yaml", "model:\n  hidden: 64\n  hiden_size: 3\n");
  std::string msg = error_of([&] { load_config(f); });
  EXPECT_NE(msg.find("unknown.yaml:3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.hiden_size"), std::string::npos) << msg;
  std::string sec = error_of([&] { load_config(write_file("sec.yaml", "modle:\n  hidden: 64\n")); });
  EXPECT_NE(sec.find("did you mean 'model'"), std::string::npos) << sec;
}

TEST(Config, WrongTypeAndBadChoice) {
  std::string msg = error_of([&] { load_config(write_file("type.yaml", "train:\n  iters: many\n")); });
  EXPECT_NE(msg.find("type.yaml:2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected a integer"), std::string::npos) << msg;
  msg = error_of([&] { load_config(write_file("choice.yaml", "model:\n  normsilu: fancy\n")); });
  EXPECT_NE(msg.find("not one of"), std::string::npos) << msg;
}

TEST(Config, ImpossibleShapesAreErrors) {
  std::string msg = error_of([&] {
    load_config(write_file("heads.yaml", "model:\n  hidden: 100\n  heads: 3\n"));
  });
  EXPECT_NE(msg.find("heads.yaml:2: model.hidden"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not divisible"), std::string::npos) << msg;
  msg = error_of([&] { load_config(write_file("parity.yaml", "model:\n  experts: 40\n")); });
  EXPECT_NE(msg.find("parameter parity"), std::string::npos) << msg;
  EXPECT_NE(msg.find("parity.yaml:2"), std::string::npos) << msg;
  msg = error_of([&] {
    load_config(write_file("batch.yaml", "train:\n  micro_batch: 3\n  global_batch: 8\n"));
  });
  EXPECT_NE(msg.find("not a multiple"), std::string::npos) << msg;
}

// Sequence parallelism splits each micro-batch's tokens over the tensor-parallel ranks: it is
// an error without tensor parallelism (as in Megatron-Core) and when the tokens do not divide.
TEST(Config, SequenceParallelNeedsTensorParallelAndDivisibleTokens) {
  std::string msg = error_of([&] { load_config(write_file("sp1.yaml", "parallel:\n  sequence: true\n")); });
  EXPECT_NE(msg.find("sp1.yaml:2: parallel.sequence"), std::string::npos) << msg;
  EXPECT_NE(msg.find("needs tensor parallelism (parallel.tensor > 1)"), std::string::npos) << msg;
  msg = error_of([&] {
    load_config(write_file("sp3.yaml", "model:\n  seq_len: 16\ntrain:\n  micro_batch: 1\n  global_batch: 4\n"
                                       "parallel:\n  tensor: 3\n  sequence: true\n"));
  });
  EXPECT_NE(msg.find("sp3.yaml:8: parallel.sequence"), std::string::npos) << msg;
  EXPECT_NE(msg.find("1 x 16 = 16 tokens do not split over parallel.tensor = 3"), std::string::npos) << msg;
  EXPECT_EQ(error_of([&] {
              load_config(write_file("sp2.yaml", "model:\n  seq_len: 16\ntrain:\n  micro_batch: 1\n"
                                                 "  global_batch: 4\nparallel:\n  tensor: 2\n  sequence: true\n"));
            }),
            "");
}

TEST(Config, IncludesAndOverrides) {
  write_file("base.yaml", "model:\n  hidden: 64\n  heads: 2\ntrain:\n  lr: 0.5\n");
  std::string child = write_file("child.yaml", "include: base.yaml\ntrain:\n  lr: 0.25\n  iters: 200\n  decay_iters: 50\n");
  Config c = load_config(child, {"train.seed=99", "model.normsilu=no_rms"});
  EXPECT_EQ(c.model.hidden, 64);
  EXPECT_EQ(c.train.lr, 0.25);
  EXPECT_EQ(c.train.seed, 99u);
  EXPECT_EQ(c.model.normsilu, "no_rms");
  EXPECT_EQ(c.origin.at("train.seed"), "--set");
  EXPECT_NE(c.origin.at("model.hidden").find("base.yaml:2"), std::string::npos);
  std::string msg = error_of([&] { load_config(child, {"train.nope=1"}); });
  EXPECT_NE(msg.find("train.nope"), std::string::npos) << msg;
  msg = error_of([&] { load_config(child, {"trainlr"}); });
  EXPECT_NE(msg.find("section.key=value"), std::string::npos) << msg;
  std::string cyc = write_file("cycle.yaml", "include: cycle.yaml\n");
  EXPECT_NE(error_of([&] { load_config(cyc); }).find("includes itself"), std::string::npos);
}

TEST(Config, ResolvedYamlRoundTrips) {
  Config c = load_config(std::string(DECOTRON_SOURCE_DIR) + "/configs/tiny-deco.yaml", {"train.lr=0.00123"});
  std::string dumped = config_to_yaml(c);
  Config again = load_config(write_file("resolved.yaml", dumped));
  // The header names the source; everything after it must agree.
  auto body = [](const std::string& s) { return s.substr(s.find('\n')); };
  EXPECT_EQ(body(config_to_yaml(again)), body(dumped));
  EXPECT_EQ(again.train.lr, 0.00123);
}

TEST(Config, ShippedConfigsLoad) {
  for (const auto& entry : fs::directory_iterator(std::string(DECOTRON_SOURCE_DIR) + "/configs")) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    EXPECT_NO_THROW(load_config(entry.path().string()));
  }
}

TEST(Config, DocsReferenceIsCurrent) {
  std::ifstream in(std::string(DECOTRON_SOURCE_DIR) + "/docs/config.md");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(text, config_reference_markdown())
      << "docs/config.md is stale: regenerate it with `decotron config --doc > docs/config.md`";
}
