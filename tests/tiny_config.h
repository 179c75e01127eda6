// The tiny model the unit tests build and train in a fraction of a second: 2 layers, hidden 32,
// 8 experts of width 8 plus a shared expert of 16, vocabulary 64, sequence 16.
#pragma once
#include <string>

#include "core/config.h"

namespace decotron::test {

inline ModelConfig tiny_model(const std::string& arch) {
  ModelConfig m;
  m.arch = arch;
  m.vocab_size = 64;
  m.seq_len = 16;
  m.hidden = 32;
  m.layers = 2;
  m.heads = 2;
  m.ffn_hidden = 64;
  m.experts = 8;
  m.expert_width = 8;
  m.shared_expert_width = 16;  // 2*8*8 + 3*16 = 176 != 192: parity off for this toy
  m.parameter_parity = false;
  return m;
}

// 60 steps of micro-batch 4, global batch 8, constant lr 1e-2, a fast sparsity controller.
inline Config tiny_config(const std::string& arch) {
  Config c;
  c.model = tiny_model(arch);
  TrainConfig& t = c.train;
  t.iters = 60;
  t.micro_batch = 4;
  t.global_batch = 8;
  t.lr = 1e-2;
  t.warmup_iters = 5;
  t.lr_schedule = "constant";
  t.reg_lambda0 = 1e-3;
  t.reg_multiplier = 1.05;
  t.eval_iters = 2;
  c.log.interval = 10;
  validate_config(c);
  return c;
}

}  // namespace decotron::test
