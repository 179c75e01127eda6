#include "checkpoint/resume.h"

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "checkpoint/manager.h"
#include "core/error.h"

namespace decotron {

namespace fs = std::filesystem;

std::string checkpoint_dir_for(const Config& cfg, const std::string& run_dir) {
  return cfg.checkpoint.dir.empty() ? (fs::path(run_dir) / "checkpoints").string() : cfg.checkpoint.dir;
}

std::string resolve_resume_dir(const std::string& dir) {
  if (CheckpointManager::has_checkpoints(dir)) return dir;
  const std::string sub = (fs::path(dir) / "checkpoints").string();
  if (CheckpointManager::has_checkpoints(sub)) return sub;
  fail("--resume ", dir, ": no checkpoint found (looked for iter_*.h5 in ", dir, " and in ", sub,
       "); give a run directory or its checkpoint directory");
}

std::string utc_timestamp() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", &tm);
  return buf;
}

std::string discard_metrics_after(const std::string& metrics_path, int64_t iteration) {
  std::ifstream in(metrics_path);
  if (!in) return "";
  std::vector<std::string> keep, drop;
  for (std::string line; std::getline(in, line);) {
    bool ok = false;
    try {
      nlohmann::json j = nlohmann::json::parse(line);
      ok = j.contains("iter") && j["iter"].is_number_integer() && j["iter"].get<int64_t>() <= iteration;
    } catch (const nlohmann::json::exception&) {
      ok = false;  // a partial last line from a killed run
    }
    (ok ? keep : drop).push_back(line);
  }
  in.close();
  if (drop.empty()) return "";
  std::string side = metrics_path + ".discarded-" + utc_timestamp();
  for (int k = 1; fs::exists(side); ++k) side = metrics_path + ".discarded-" + utc_timestamp() + "-" + std::to_string(k);
  // The side file is complete before metrics.jsonl is replaced, so a crash in between loses
  // nothing (the records would then be in both files).
  auto write_lines = [](const std::string& path, const std::vector<std::string>& lines) {
    std::ofstream out(path, std::ios::trunc);
    for (const std::string& l : lines) out << l << "\n";
    out.close();
    if (!out) fail("cannot write ", path, " (check free disk space and permissions)");
  };
  write_lines(side, drop);
  const std::string tmp = metrics_path + ".tmp";
  write_lines(tmp, keep);
  std::error_code ec;
  fs::rename(tmp, metrics_path, ec);
  if (ec) fail("cannot replace ", metrics_path, ": ", ec.message());
  return side;
}

namespace {

// "section.key" -> value text, from config_to_yaml's "section:\n  key: value  # doc" lines.
std::map<std::string, std::string> yaml_values(const std::string& yaml) {
  std::map<std::string, std::string> out;
  std::istringstream in(yaml);
  std::string section;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    if (line[0] != ' ') {
      section = line.substr(0, line.find(':'));
      continue;
    }
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(2, colon - 2), value = line.substr(colon + 1);
    if (auto doc = value.find("  # "); doc != std::string::npos) value.resize(doc);
    out[section + "." + key] = value.substr(value.find_first_not_of(' ') == std::string::npos ? value.size()
                                                                                              : value.find_first_not_of(' '));
  }
  return out;
}

}  // namespace

std::string config_differences(const std::string& old_yaml, const std::string& new_yaml) {
  std::map<std::string, std::string> a = yaml_values(old_yaml), b = yaml_values(new_yaml);
  std::string out;
  for (const auto& [k, v] : b) {
    auto it = a.find(k);
    std::string old = it == a.end() ? "(absent)" : it->second;
    if (old != v) out += cat("  ", k, ": ", old, " -> ", v, "\n");
  }
  for (const auto& [k, v] : a)
    if (!b.count(k)) out += cat("  ", k, ": ", v, " -> (absent)\n");
  return out;
}

}  // namespace decotron
