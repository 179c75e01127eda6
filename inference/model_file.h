// Reading an export: model.safetensors mapped read-only into memory, its header checked
// (every offset inside the file, dtypes known, sizes consistent) and its tensors checked
// against config.json (every tensor the model needs present, with its shape and an allowed
// dtype; nothing unexpected). Every problem is a decotron::Error naming the file and what is
// wrong. Format: docs/export-format.md.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "inference/export_config.h"
#include "inference/file_dtype.h"

namespace decotron::inference {

struct TensorEntry {
  std::string name;
  FileDType dtype = FileDType::f32;
  Shape shape;
  const unsigned char* data = nullptr;  // inside the mapping
  size_t nbytes = 0;
};

class SafetensorsFile {
 public:
  // Maps and validates the file (header only: no tensor data is read).
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  size_t file_size() const { return size_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Tensors by name (the "__padding__.K" entries excluded).
  const std::map<std::string, TensorEntry>& tensors() const { return tensors_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorEntry& get(const std::string& name) const;  // Error naming the file if absent

  // The tensor converted to a new fp32 CPU tensor of its shape: bf16 and fp16 widened, int8
  // multiplied by its "<name>.scale" (per row, or per (expert, output channel) for experts.down).
  Tensor read_f32(const std::string& name) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorEntry> tensors_;
};

// What config.json says the file must hold.
struct ExpectedTensor {
  std::string name;
  Shape shape;
  enum class Kind : uint8_t { matrix, fp32 } kind;  // matrix: export dtype or int8 (+ .scale); fp32: vectors, router
};
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& m);

// Checks the file's tensors against config.json; the error names both files.
void check_against_config(const SafetensorsFile& file, const ExportInfo& info, const std::string& config_path);

}  // namespace decotron::inference
