// The deployable export: a directory holding model.safetensors, config.json and the tokenizer
// model (docs/export-format.md is the specification, with its version). Expert weights are
// stored expert-major so that a decode step reads only the active experts' blocks.
#pragma once
#include <string>

#include "core/config.h"
#include "inference/file_dtype.h"
#include "model/parameter.h"

namespace decotron {
class Transformer;
}

namespace decotron::inference {

inline constexpr const char* kExportFormatName = "decotron-export";
inline constexpr int kExportFormatVersion = 1;

struct ExportOptions {
  // Dtype of the weight matrices: f32, f16 or bf16 (FileDType::i8 is not a valid choice here;
  // use int8). Vectors (norm weights, g, gamma) and the router W_r are always stored in fp32.
  FileDType dtype = FileDType::bf16;
  // Weight-only int8: every matrix except the router becomes int8 with one fp32 scale per
  // output channel (symmetric, scale = max|w| / 127); `dtype` then does not apply to them.
  bool int8 = false;
  // Replace a non-empty out_dir (otherwise that is an error).
  bool force = false;
};

// "bf16" | "fp16" | "fp32" -> FileDType; an Error naming the flag otherwise.
FileDType parse_export_dtype(const std::string& name);

// Writes out_dir/{model.safetensors, config.json, tokenizer.model} from the model's parameters
// (global names as the trainer creates them; their values are read on the CPU as fp32) and
// cfg.model. All files are written into a temporary sibling directory that is renamed to
// out_dir at the end, so out_dir is never half-written. Throws decotron::Error if out_dir
// exists and is not empty (unless opt.force), if the tokenizer cannot be loaded, or if its
// vocabulary is larger than the model's.
void export_model(const ParameterSet& params, const Config& cfg, const std::string& tokenizer_model,
                  const std::string& out_dir, const ExportOptions& opt);
// The same from a Transformer (its parameters and config).
void export_model(Transformer& model, const Config& cfg, const std::string& tokenizer_model,
                  const std::string& out_dir, const ExportOptions& opt);

// Symmetric per-row int8 quantization of a [rows, cols] fp32 matrix: scale_r = max_j |w_rj| / 127
// (1 if the row is zero), q_rj = round(w_rj / scale_r). Exposed for tests.
void quantize_rows_int8(const float* w, int64_t rows, int64_t cols, int8_t* q, float* scales);

}  // namespace decotron::inference
