// config.json of an export: the model's shape and switches, the weights' dtype and the
// tokenizer's special ids (docs/export-format.md). One struct, written by export_model and
// read (strictly: unknown or missing keys are errors) by the runtime.
#pragma once
#include <cstdint>
#include <string>

#include "core/config.h"
#include "inference/file_dtype.h"

namespace decotron::inference {

struct ExportInfo {
  ModelConfig model;               // every ModelConfig field, under "model"
  FileDType dtype = FileDType::bf16;  // dtype of the matrices (when not int8)
  bool int8 = false;               // weight-only int8 matrices with fp32 per-channel scales
  int64_t tokenizer_vocab = 0;     // ids of the tokenizer (<= model.vocab_size)
  int32_t eod_id = -1, bos_id = -1, pad_id = -1;
  int format_version = 0;          // read from the file (written as kExportFormatVersion)
};

// "bf16" | "fp16" | "fp32" (the names used in config.json and on the command line)
const char* export_dtype_name(FileDType t);

std::string export_info_to_json(const ExportInfo& info);
// Parses and checks config.json; errors name the file and the key.
ExportInfo read_export_info(const std::string& config_json_path);

}  // namespace decotron::inference
