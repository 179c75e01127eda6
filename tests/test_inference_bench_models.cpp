// Writes the two exports docs/inference.md measures with `decotron bench decode`: a dense
// model and a DECO model of the same total size (the paper's 0.1B shapes), at two vocabularies. Skipped unless
// DECOTRON_BENCH_EXPORT_DIR is set (it takes minutes and ~1 GB of disk); no timing here.
//
// Random weights route about half of the (token, expert) pairs, not the ~20% a trained DECO
// model reaches; so the DECO export is given a router bias through one hidden coordinate:
// every embedding row's coordinate 0 is 1 (it dominates the normalized hidden state of every
// layer) and coordinate 0 of every router row is -beta, with beta bisected on the trainer's
// own routing statistics until 20% of the pairs are active.
#include <cstdlib>

#include "inference_test_util.h"

using namespace decotron;
using namespace decotron::inference;
using namespace decotron::inference::testing;

namespace {

Config paper_01b(const std::string& arch, int64_t vocab) {
  Config c;
  ModelConfig& m = c.model;
  m.arch = arch;
  m.vocab_size = vocab;
  m.seq_len = 512;
  m.hidden = 768;
  m.layers = 16;
  m.heads = 6;
  m.ffn_hidden = 1920;
  m.experts = 42;
  m.expert_width = 64;
  m.shared_expert_width = 128;
  validate_config(c);
  return c;
}

void set_router_bias(Transformer& m, float beta) {
  for (Parameter* p : m.params().all()) {
    if (p->name.ends_with(".w_router"))
      for (int64_t e = 0; e < p->value.dim(0); ++e) p->value.data<float>()[e * p->value.dim(1)] = -beta;
  }
}

double activation_ratio(Transformer& m, const Config& c) {
  auto tok = some_tokens(64, 360, 5), next = some_tokens(64, 360, 6);
  Tensor t = Tensor::empty({64}, DType::i32), g = Tensor::empty({64}, DType::i32);
  std::copy(tok.begin(), tok.end(), t.data<int32_t>());
  std::copy(next.begin(), next.end(), g.data<int32_t>());
  ForwardResult f = m.forward(t, g, {1, 64}, {}, 1.0, false);
  int64_t active = 0, all = 0;
  for (const RoutingStats& s : f.routing) {
    active += s.active_pairs;
    all += s.tokens * c.model.experts;
  }
  return double(active) / all;
}

}  // namespace

TEST(InferenceBenchModels, WriteDenseAndDecoExportsWhenAsked) {
  const char* out = std::getenv("DECOTRON_BENCH_EXPORT_DIR");
  if (!out) GTEST_SKIP() << "set DECOTRON_BENCH_EXPORT_DIR to write the benchmark exports";
  // The paper's vocabulary (the LM head is a third of the bytes a token reads) and 8192 (the
  // FFN dominates), each as a dense / DECO pair.
  for (int64_t vocab : {73448L, 8192L})
  for (const char* arch : {"dense", "deco"}) {
    Config c = paper_01b(arch, vocab);
    const std::string name = cat(arch, "-0.1b", vocab == 73448 ? "" : "-v8k");
    Transformer m(c.model, DType::f32, Device::cpu);
    m.params().initialize(1234);
    Tensor& emb = m.params().find("embedding.weight").value;
    for (int64_t v = 0; v < emb.dim(0); ++v) emb.data<float>()[v * emb.dim(1)] = 1.0f;
    if (std::string(arch) == "deco") {
      float lo = 0, hi = 2.0f;
      for (int it = 0; it < 16; ++it) {
        const float mid = 0.5f * (lo + hi);
        set_router_bias(m, mid);
        (activation_ratio(m, c) > 0.2 ? lo : hi) = mid;
      }
      set_router_bias(m, 0.5f * (lo + hi));
      std::printf("deco: router bias %.5f, activation ratio %.4f on 64 tokens\n", 0.5f * (lo + hi), activation_ratio(m, c));
    }
    ExportOptions o;
    o.dtype = FileDType::bf16;
    o.force = true;
    export_model(m, c, tiny_model(), std::string(out) + "/" + name, o);
    std::printf("wrote %s/%s (%lld parameters)\n", out, name.c_str(), static_cast<long long>(m.params().count()));
  }
}
