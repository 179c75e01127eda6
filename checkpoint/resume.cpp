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
  std::ifstream in(metrics_path, std::ios::binary);
  if (!in) return "";
  std::stringstream buf;
  buf << in.rdbuf();
  in.close();
  const std::string text = buf.str();
  // Records are appended in iteration order: the trajectory is the prefix before the first
  // record past `iteration` (or the first incomplete line: unparsable, or without its newline).
  size_t keep = 0;
  while (keep < text.size()) {
    size_t nl = text.find('\n', keep);
    if (nl == std::string::npos) break;
    bool ok = false;
    try {
      nlohmann::json j = nlohmann::json::parse(text.substr(keep, nl - keep));
      ok = j.contains("iter") && j["iter"].is_number_integer() && j["iter"].get<int64_t>() <= iteration;
    } catch (const nlohmann::json::exception&) {
    }
    if (!ok) break;
    keep = nl + 1;
  }
  if (keep == text.size()) return "";
  std::string side = metrics_path + ".discarded-" + utc_timestamp();
  for (int k = 1; fs::exists(side); ++k) side = metrics_path + ".discarded-" + utc_timestamp() + "-" + std::to_string(k);
  // The side file is complete before metrics.jsonl is cut, so a crash in between loses nothing
  // (the records would then be in both files).
  {
    std::ofstream out(side, std::ios::binary | std::ios::trunc);
    out << text.substr(keep);
    if (text.back() != '\n') out << "\n";
    out.close();
    if (!out) fail("cannot write ", side, " (check free disk space and permissions)");
  }
  // Cut in place rather than replace the file: a writer that already has it open for append
  // (the Trainer) goes on writing at the new end.
  std::error_code ec;
  fs::resize_file(metrics_path, keep, ec);
  if (ec) fail("cannot truncate ", metrics_path, ": ", ec.message());
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
