// What `decotron train` does around a checkpoint when it resumes: find the checkpoints, and
// make metrics.jsonl read as one clean trajectory again. Nothing a run wrote is deleted:
// records the dead run wrote after its last checkpoint move to a side file.
#pragma once
#include <cstdint>
#include <string>

#include "core/config.h"

namespace decotron {

// Where a run saves its checkpoints: checkpoint.dir if set, else <run_dir>/checkpoints.
std::string checkpoint_dir_for(const Config& cfg, const std::string& run_dir);

// The checkpoint directory that --resume DIR means: DIR itself if it holds iter_*.h5 files,
// else DIR/checkpoints if that does. Anything else is an error saying what was looked for.
std::string resolve_resume_dir(const std::string& dir);

// "20261123T123456Z": a UTC time for side-file names.
std::string utc_timestamp();

// Moves the records of `metrics_path` from the first one whose "iter" is greater than
// `iteration` (or the first incomplete line, e.g. one cut by SIGKILL) to the end into
// <metrics_path>.discarded-<timestamp>, and cuts metrics.jsonl there, in place (a Trainer that
// has it open for append continues at the new end). Returns the side file's path, or "" if
// nothing was moved (or the file does not exist).
std::string discard_metrics_after(const std::string& metrics_path, int64_t iteration);

// Names the keys whose values differ between two config_to_yaml() texts, one
// "section.key: old -> new" per line ("" if they agree).
std::string config_differences(const std::string& old_yaml, const std::string& new_yaml);

}  // namespace decotron
