// Checkpoints: one HDF5 file holding everything a run needs to continue exactly where it was
// (docs/checkpoints.md describes every dataset and attribute).
//
// The file is layout-free: each tensor is stored whole, keyed by its global parameter name and
// shape, with its partition rule as an attribute, so a tensor- or expert-parallel loader can
// cut its own slice from any checkpoint, whatever layout wrote it.
//
// Saving and loading both go through CheckpointData, a host-memory copy of the state:
// capture() is quick and synchronous (an async save copies and then writes on a thread), and
// reading the whole file (checking every CRC) before anything is applied means a corrupt file
// never leaves a trainer half restored.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "model/parameter.h"
#include "trainer/trainer.h"

namespace decotron {

// Bumped whenever the layout changes incompatibly; readers refuse newer versions.
inline constexpr int64_t kCheckpointFormatVersion = 1;

// One whole tensor and its parameter metadata, in host memory.
struct CheckpointTensor {
  std::string name;  // global parameter name ("layers.3.ffn.w_up")
  Shape shape;
  std::vector<float> data;
  Partition partition = Partition::replicated;
  int64_t expert_block = 0;
  bool trainable = true;
  bool weight_decay = true;
};

struct CheckpointData {
  std::vector<CheckpointTensor> model;  // parameter values, in the model's creation order
  std::vector<CheckpointTensor> exp_avg, exp_avg_sq;  // AdamW moments (empty: weights only)
  int64_t optimizer_step = 0;
  TrainState state;
  double sparsity_lambda = 0;
  uint64_t seed = 0;
  std::string config_yaml;  // config_to_yaml of the run that wrote it
  // Provenance, filled by the writer and read back for messages.
  std::string decotron_version, hdf5_version;
  int64_t format_version = kCheckpointFormatVersion;
};

// Copies the trainer's full state to host memory.
CheckpointData capture_checkpoint(Trainer& trainer);
// Writes `data` to `path` (created or truncated; no temp file, no fsync: CheckpointManager
// does the atomic part).
void write_checkpoint(const CheckpointData& data, const std::string& path);
// Reads and CRC-checks a whole checkpoint; with weights_only the optimizer moments are skipped.
// Any problem (unreadable, truncated, corrupt, missing dataset) is a decotron::Error naming `path`.
CheckpointData read_checkpoint(const std::string& path, bool weights_only = false);
// Applies `data` to a trainer after checking that every parameter name and shape matches.
// `path` only names the source in errors.
void restore_checkpoint(Trainer& trainer, const CheckpointData& data, const std::string& path);

// capture + write / read + restore.
void save_checkpoint(Trainer& trainer, const std::string& path);
void load_checkpoint(Trainer& trainer, const std::string& path);

// The resolved config stored in a checkpoint (validated like a YAML file).
Config read_checkpoint_config(const std::string& path);
// Loads only the parameter values into a model (export, evaluation); names and shapes must match.
void load_model_weights(Transformer& model, const std::string& path);

}  // namespace decotron
