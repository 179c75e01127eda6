// The CPU inference runtime: loads an export (inference/export.h) and runs prefill and
// token-by-token decode with a KV cache, in fp32, through the trainer's kernels (kernels/ops.h).
//
// Weights are converted to fp32 once, at load (bf16/fp16 widened, int8 multiplied by its
// scales). Why at load and not per use: the CPU kernels the trainer ships compute in fp32 only
// (OpenBLAS sgemm), so a per-use conversion would redo the same widening on every token, and
// converting once keeps the runtime's arithmetic identical to the trainer's for an fp32
// export (the tests hold it to 1e-5). The cost is memory: 4 bytes per weight. The decode
// counters report both the fp32 bytes this runtime reads and what the same step reads from
// the export's own dtype.
//
// The DECO FFN runs sparsely (deco-model.md, "Identities that make sparse computation exact"):
// for each token the router picks the active experts (a_e = ReLU(r_e) > 0) and only their
// blocks of experts.up / experts.gate / experts.down are read. NormSiLU's mean over all E*d
// entries of u = W_up x comes from the identity mean(u) = x . w_bar, w_bar = the mean of the
// rows of W_up (of W_gate in the gated ablation, where NormSiLU applies to W_gate x),
// precomputed at load; each expert's RMS needs only its own block of d entries. So the
// inactive experts' rows are never touched, and the result equals the dense-masked
// computation of the trainer (tests/test_inference_runtime.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "data/tokenizer.h"
#include "inference/export_config.h"

namespace decotron::inference {

// What the forward passes since the last reset_counters() did.
struct RuntimeCounters {
  int64_t forwards = 0;           // forward() calls
  int64_t tokens = 0;             // positions computed
  double weight_bytes_f32 = 0;    // weight bytes read from the fp32 copy (each block once per forward)
  double weight_bytes_export = 0; // the same reads counted in the export's dtype (int8 + scales, bf16, ...)
  double kv_bytes = 0;            // key/value cache bytes read by attention
  int64_t active_pairs = 0;       // (token, expert) pairs with a_e > 0, over the DECO layers
  int64_t routed_pairs = 0;       // all (token, expert) pairs of the DECO layers
  double activation_ratio() const { return routed_pairs ? double(active_pairs) / routed_pairs : 0.0; }
};

class Model {
 public:
  // Reads dir/config.json, dir/model.safetensors (checked against it) and dir/tokenizer.model.
  explicit Model(const std::string& export_dir);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ExportInfo& info() const { return info_; }
  const ModelConfig& config() const { return info_.model; }
  const data::Tokenizer& tokenizer() const { return *tokenizer_; }
  int64_t context_length() const { return info_.model.seq_len; }
  int64_t position() const { return pos_; }  // tokens in the KV cache
  void reset() { pos_ = 0; }                 // empties the KV cache

  // Runs `tokens` at positions [position(), position() + n), appending their keys and values
  // to the cache. Returns fp32 logits [n, V] (all_logits) or [1, V] for the last position.
  // Prefill from an empty cache uses the trainer's causal attention kernel; later positions
  // attend over the cache. Error if the context would overflow.
  Tensor forward(std::span<const int32_t> tokens, bool all_logits);

  // The DECO FFN of layer `layer` on rows x [n, hidden], computed sparsely (exposed for tests).
  Tensor deco_ffn(int layer, const Tensor& x);
  // Fp32 weights as loaded (tests).
  const Tensor& weight(const std::string& export_name) const;

  const RuntimeCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = {}; }
  // Bytes of the fp32 weights held in memory.
  size_t weight_bytes_loaded() const;

 private:
  struct Layer;
  void attention(Layer& L, const Tensor& xn, Tensor& out, int64_t n);
  void rope(Tensor& x, int64_t n, int64_t heads) const;
  Tensor swiglu(const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down);
  void count_weight(const Tensor& w, int64_t elements = -1, bool fp32_in_export = false, int64_t scales = -1);

  ExportInfo info_;
  std::string dir_;
  std::unique_ptr<data::Tokenizer> tokenizer_;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<std::pair<std::string, Tensor>> named_;  // every loaded weight by export name
  Tensor embedding_, final_norm_, lm_head_;
  std::vector<double> rope_cos_, rope_sin_;  // [context, head_dim / 2], as the trainer's rope computes them
  double export_bytes_per_elem_ = 4;         // matrices' bytes per element in the export (int8: 1 + scales)
  int64_t pos_ = 0;
  RuntimeCounters counters_;
};

}  // namespace decotron::inference
