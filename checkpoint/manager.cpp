#include "checkpoint/manager.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>

namespace decotron {

namespace fs = std::filesystem;

namespace {

const std::regex kFileRe(R"(iter_(\d+)\.h5)");

// Makes a file's (or a directory's entries') contents durable before we depend on them.
void fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) fail("cannot open ", path, " to fsync it: ", std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) fail("fsync of ", path, " failed: ", std::strerror(err), " (is the disk full or failing?)");
}

// Renames `tmp` over `final` after making `tmp` durable, then makes the rename durable.
void publish(const std::string& tmp, const std::string& final, const std::string& dir) {
  fsync_path(tmp, false);
  std::error_code ec;
  fs::rename(tmp, final, ec);
  if (ec) fail("cannot rename ", tmp, " to ", final, ": ", ec.message());
  fsync_path(dir, true);
}

int64_t iteration_of(const std::string& file_name) {
  std::smatch m;
  return std::regex_match(file_name, m, kFileRe) ? std::stoll(m[1].str()) : -1;
}

std::string file_size_str(const std::string& path) {
  std::error_code ec;
  auto bytes = fs::file_size(path, ec);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MiB", ec ? 0.0 : bytes / double(1 << 20));
  return buf;
}

}  // namespace

CheckpointManager::CheckpointManager(const std::string& dir, int64_t keep, bool async, bool writer)
    : dir_(dir), keep_(keep), async_(async), writer_(writer) {
  if (!writer_) return;
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) fail("cannot create checkpoint directory ", dir_, ": ", ec.message(), " (set checkpoint.dir elsewhere)");
  // A save killed midway leaves only a temporary file; it was never published, so it goes.
  for (const auto& e : fs::directory_iterator(dir_)) {
    const std::string n = e.path().filename().string();
    if (n.size() > 4 && n.front() == '.' && n.ends_with(".tmp")) fs::remove(e.path(), ec);
  }
}

CheckpointManager::~CheckpointManager() {
  if (worker_.joinable()) worker_.join();
  if (error_) {
    try {
      std::rethrow_exception(error_);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: the last checkpoint save failed: %s\n", e.what());
    }
  }
}

std::string CheckpointManager::file_name(int64_t iteration) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "iter_%07lld.h5", static_cast<long long>(iteration));
  return buf;
}

bool CheckpointManager::has_checkpoints(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (iteration_of(e.path().filename().string()) >= 0) return true;
  return false;
}

std::vector<std::string> CheckpointManager::list(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    int64_t it = iteration_of(e.path().filename().string());
    if (it >= 0) found.emplace_back(it, e.path().string());
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

std::string CheckpointManager::latest(const std::string& dir) {
  std::ifstream in(fs::path(dir) / "latest");
  std::string name;
  if (!(in >> name) || iteration_of(name) < 0) return "";
  return (fs::path(dir) / name).string();
}

void CheckpointManager::wait() {
  if (worker_.joinable()) worker_.join();
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void CheckpointManager::save(Trainer& trainer) {
  wait();
  const int64_t it = trainer.state().iteration;
  if (it == last_saved_) return;
  auto t0 = std::chrono::steady_clock::now();
  // The snapshot is taken now, on the training thread, so the file holds exactly this
  // iteration's state even if training moves on while it is written.
  auto data = std::make_shared<CheckpointData>(capture_checkpoint(trainer));
  const double snapshot_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  last_saved_ = it;
  if (!writer_) return;
  if (!async_) {
    write_and_publish(*data);
    const std::string path = (fs::path(dir_) / file_name(it)).string();
    std::printf("checkpoint: saved %s (%s) in %.3f s\n", path.c_str(), file_size_str(path).c_str(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::fflush(stdout);
    return;
  }
  worker_ = std::thread([this, data, t0, snapshot_s] {
    try {
      write_and_publish(*data);
      const std::string path = (fs::path(dir_) / file_name(data->state.iteration)).string();
      std::printf("checkpoint: saved %s (%s) in %.3f s, %.3f s of it on the training thread\n", path.c_str(),
                  file_size_str(path).c_str(),
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), snapshot_s);
      std::fflush(stdout);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: background checkpoint save failed: %s\n", e.what());
      error_ = std::current_exception();
    }
  });
}

void CheckpointManager::write_and_publish(const CheckpointData& data) {
  const std::string name = file_name(data.state.iteration);
  const std::string final = (fs::path(dir_) / name).string(), tmp = (fs::path(dir_) / ("." + name + ".tmp")).string();
  try {
    write_checkpoint(data, tmp);
    publish(tmp, final, dir_);
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);  // never published; do not leave a partial file behind
    throw;
  }
  const std::string latest_tmp = (fs::path(dir_) / ".latest.tmp").string();
  {
    std::ofstream out(latest_tmp, std::ios::trunc);
    out << name << "\n";
    out.close();
    if (!out) fail("cannot write ", latest_tmp, " (check free disk space and permissions)");
  }
  publish(latest_tmp, (fs::path(dir_) / "latest").string(), dir_);
  rotate();
}

void CheckpointManager::rotate() {
  const std::string keep_always = latest(dir_);
  std::vector<std::string> files = list(dir_);
  for (size_t i = static_cast<size_t>(keep_); i < files.size(); ++i) {
    if (files[i] == keep_always) continue;
    std::error_code ec;
    fs::remove(files[i], ec);
    if (ec) std::fprintf(stderr, "warning: cannot delete old checkpoint %s: %s\n", files[i].c_str(), ec.message().c_str());
  }
}

CheckpointManager::Loaded CheckpointManager::read_newest_good(const std::string& dir) {
  std::vector<std::string> order, files = list(dir);
  const std::string named = latest(dir);
  if (!named.empty()) order.push_back(named);  // a missing file is reported like a corrupt one
  for (const std::string& f : files)
    if (f != named) order.push_back(f);
  if (order.empty()) fail("no checkpoint in ", dir, " (no iter_*.h5 files); nothing to resume from");
  std::string reasons;
  for (const std::string& path : order) {
    try {
      return Loaded{path, read_checkpoint(path)};
    } catch (const Error& e) {
      std::fprintf(stderr, "warning: checkpoint %s is unusable, trying the next newest: %s\n", path.c_str(), e.what());
      reasons += cat("\n  ", e.what());
    }
  }
  fail("no usable checkpoint in ", dir, "; every file failed to load:", reasons,
       "\nThe files are left in place; start a new run directory or restore a backup");
}

std::string CheckpointManager::load(Trainer& trainer) {
  wait();
  Loaded l = read_newest_good(dir_);
  restore_checkpoint(trainer, l.data, l.path);
  last_saved_ = l.data.state.iteration;
  return l.path;
}

}  // namespace decotron
