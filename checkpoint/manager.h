// CheckpointManager: the checkpoints of one run in one directory, saved so that no crash can
// leave a run without a usable checkpoint, and loaded with a fallback past damaged files.
//
//   <dir>/iter_0000100.h5   one file per saved iteration (checkpoint.h describes the content)
//   <dir>/latest            the name of the newest complete file, one line
//
// A save writes .iter_0000100.h5.tmp in the same directory, fsyncs it, renames it into place,
// fsyncs the directory, and only then rewrites `latest` the same way: at every instant the
// file `latest` names is complete. Then all but the newest `keep` files are deleted (never the
// one `latest` names). With async = true the state is copied to host memory synchronously and
// written by a background thread while training continues; at most one write is in flight.
#pragma once
#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checkpoint.h"

namespace decotron {

class CheckpointManager {
 public:
  // Creates `dir` if needed and removes temporary files a crashed save left behind.
  // writer = false (tensor-parallel ranks other than rank 0): save() only takes part in the
  // gathers of the snapshot; nothing is written or created.
  CheckpointManager(const std::string& dir, int64_t keep, bool async, bool writer = true);
  // Waits for an in-flight save; an error it raised is printed (a destructor cannot throw):
  // call wait() before exiting normally so such an error fails the run.
  ~CheckpointManager();
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;

  // "iter_0000100.h5"
  static std::string file_name(int64_t iteration);
  // Whether `dir` holds any iter_*.h5 file.
  static bool has_checkpoints(const std::string& dir);

  // Saves the trainer's state as of its current iteration. Waits for the previous async save
  // first, re-raising its error. Does nothing if this iteration was already saved or loaded.
  void save(Trainer& trainer);
  // Waits for the in-flight save (if any) and re-raises its error.
  void wait();

  struct Loaded {
    std::string path;
    CheckpointData data;
  };
  // Reads the checkpoint `latest` in `dir` names, checking every CRC; if it is missing,
  // truncated or corrupt, says so on stderr and falls back to the next newest good file.
  // Throws decotron::Error if no checkpoint in the directory is usable.
  static Loaded read_newest_good(const std::string& dir);
  // read_newest_good(dir()) + restore_checkpoint(); returns the file used.
  std::string load(Trainer& trainer);
  // Records that this iteration's state is already in this directory (a resume from it), so
  // that save() at the same iteration does not write it again.
  void mark_saved(int64_t iteration) { last_saved_ = iteration; }

  // Checkpoint files in `dir`, newest (highest iteration) first, as full paths.
  static std::vector<std::string> list(const std::string& dir);
  // The full path `latest` in `dir` names ("" if there is no readable `latest`).
  static std::string latest(const std::string& dir);
  const std::string& dir() const { return dir_; }

 private:
  void write_and_publish(const CheckpointData& data);
  void rotate();

  std::string dir_;
  int64_t keep_;
  bool async_;
  bool writer_ = true;
  int64_t last_saved_ = -1;  // iteration of the last save started or checkpoint loaded
  std::thread worker_;
  std::exception_ptr error_;  // set by the worker, taken by wait()
};

}  // namespace decotron
