// The op set of training and inference. Each function dispatches on its tensors' device and
// dtype: CPU kernels (kernels/cpu/, fp32 and fp64 — fp64 exists for the gradient checks) and
// CUDA kernels (kernels/cuda/). Layouts are row-major; T = tokens (batch x sequence) rows.
// bf16 on the CPU is emulated by the dispatch (kernels/cpu/bf16_emulation.h): bf16 tensors are
// widened to fp32, the fp32 kernel runs, and the outputs are rounded back to bf16.
// Buffer contract: "=" overwrites the output, "+=" accumulates into it (gradients of
// parameters accumulate across micro-batches; activation gradients are overwritten).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace decotron::ops {

// ---- linear (weights stored [out, in], as y = x W^T) ----------------------------------------
// y[M,N] (= or += when accumulate) x[M,K] . w[N,K]^T
void linear_forward(Tensor& y, const Tensor& x, const Tensor& w, bool accumulate = false);
// dx[M,K] (= or += when accumulate_dx) dy[M,N] . w[N,K];  dw[N,K] += dy^T . x.  dx or dw may be null.
void linear_backward(Tensor* dx, Tensor* dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                     bool accumulate_dx = false);

// ---- elementwise ------------------------------------------------------------------------------
void add_(Tensor& y, const Tensor& x);                       // y += x
void scale_(Tensor& y, double alpha);                        // y *= alpha
void mul_forward(Tensor& y, const Tensor& a, const Tensor& b);  // y = a * b
void mul_backward(Tensor& da, Tensor& db, const Tensor& dy, const Tensor& a, const Tensor& b);  // =
// y = x in y's dtype (fp32 <-> bf16 <-> fp64; bf16 rounds to nearest even): the compute copies
// of the master weights, the fp32 router input, gradients entering fp32 parameters.
void convert(Tensor& y, const Tensor& x);

// ---- embedding --------------------------------------------------------------------------------
// y[T,h] = table[tokens[t]]; tokens are i32 [T]
void embedding_forward(Tensor& y, const Tensor& tokens, const Tensor& table);
// dtable += scatter of dy rows by token
void embedding_backward(Tensor& dtable, const Tensor& tokens, const Tensor& dy);

// ---- RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * w -----------------------
void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps);
// dx =, dw +=
void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd);

// ---- rotary embedding, rotate-half convention, on [B, S, heads, D]; y may alias x ----------
void rope_forward(Tensor& y, const Tensor& x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                  double base);
void rope_backward(Tensor& dx, const Tensor& dy, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                   double base);

// ---- causal attention with grouped-query heads ------------------------------------------------
struct AttnShape {
  int64_t batch, seq, heads, kv_heads, head_dim;
};
// q, out: [B, S, heads, D]; k, v: [B, S, kv_heads, D]; lse: [B, heads, S] (log-sum-exp of the
// scaled scores, kept for the backward, as flash attention does).
void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const AttnShape& s);
// dq, dk, dv = (overwritten)
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnShape& s);

// ---- SwiGLU: h = SiLU(gate) * up ---------------------------------------------------------------
void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up);
void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate, const Tensor& up);  // =

// ---- DECO: NormSiLU over E expert blocks of width d (deco-model.md step 5) --------------------
enum class NormSiluMode : uint8_t { full, no_mean, no_rms, silu };
// u, z: [T, E*d]; gamma: [d]; stats: [T, 1 + E] (the mean, then each block's 1/rms).
void normsilu_forward(Tensor& z, Tensor& stats, const Tensor& u, const Tensor& gamma, int64_t experts,
                      NormSiluMode mode, double eps);
// du =, dgamma += (dgamma unused for no_rms / silu)
void normsilu_backward(Tensor& du, Tensor& dgamma, const Tensor& dz, const Tensor& u, const Tensor& gamma,
                       const Tensor& stats, int64_t experts, NormSiluMode mode, double eps);

// ---- DECO router activation: a = ReLU(r), s = a * g ---------------------------------------------
// r, s: [T, E] fp32/fp64; g: [E] (per expert) or [1] (one scalar shared by all experts).
void router_scale_forward(Tensor& s, const Tensor& r, const Tensor& g);
// dr = (ds * g + da_extra) * [r > 0];  dg += sum_t ds * a (when dg is non-null).  da_extra may be null.
void router_scale_backward(Tensor& dr, Tensor* dg, const Tensor& ds, const Tensor& r, const Tensor& g,
                           const Tensor* da_extra);
// Number of (token, expert) pairs with r > 0.
int64_t count_active(const Tensor& r);
// Tokens (rows) with at least one r > 0.
int64_t count_tokens_with_active(const Tensor& r);
// Active pairs per expert, [E] int64 on the host.
void count_active_per_expert(const Tensor& r, int64_t* counts);

// ---- sparsity regularizers on a = ReLU(r) -------------------------------------------------------
// Entropy (deco-model.md): sum over tokens of H_t; p = a/(sum a + 1e-5), H = -sum p log(p + 1e-5).
double entropy_forward(const Tensor& r);
// da += coef * dH_t/da (for every token t)
void entropy_backward(Tensor& da, const Tensor& r, double coef);
// ReMoE L1: sum_e (sum_t a_te) n_e / (target T^2), n_e = tokens with a_te > 0 (held constant).
double l1_reg_forward(const Tensor& r, double target);
void l1_reg_backward(Tensor& da, const Tensor& r, double target, double coef);
// A layer's routing statistics into out, f64 [2E + 2] on r's device (=), for the host to read
// later in one copy with the other layers' (each host-returning op above waits for the GPU):
// [0, E) the active pairs per expert, [E, 2E) sum_t a_te per expert (the L1 term's mass, summed
// as l1_reg_forward sums it), 2E the tokens with an active expert, 2E + 1 entropy_forward's sum.
void routing_summary(Tensor& out, const Tensor& r);

// ---- experts' outputs scaled by the router: y[t, e*d + j] = z[t, e*d + j] * s[t, e] ------------
void expert_scale_forward(Tensor& y, const Tensor& z, const Tensor& s, int64_t experts);
// dz =, ds =
void expert_scale_backward(Tensor& dz, Tensor& ds, const Tensor& dy, const Tensor& z, const Tensor& s,
                           int64_t experts);

// ---- DECO routed experts on (token, expert) pairs ------------------------------------------------
// The sparse expert path (deco-model.md, "Identities that make sparse computation exact") in
// three steps, composed in model/expert_dispatch.cpp: route_pairs picks the active pairs, their
// inputs are gathered (and under expert parallelism sent to the rank holding the expert), the
// grouped experts run on them, and their outputs are scattered back to the tokens. The math is
// that of router_scale -> linear(W_up) -> normsilu -> expert_scale -> linear(W_down), with
// NormSiLU's mean over all E*d entries taken as mean(u) = x . w_bar, so that no inactive expert
// is ever computed. "pre" is the matrix NormSiLU applies to: W_up, or W_gate when experts are
// gated (then z = NormSiLU(W_gate x) * (W_up x)).

// The pairs (t, e) of experts e in [e_begin, e_end) with r[t, e] > 0 (every pair when
// all_pairs: the dense-masked math through the same path), grouped by expert, tokens ascending
// within an expert. offsets (host): expert e_begin + i has pairs [offsets[i], offsets[i+1]).
// slot_pair is the same list token-major: entry (t, i) names the pair of token t and expert
// e_begin + i, or -1; a token's pairs in expert order are ascending pair indices.
struct RoutedPairs {
  std::vector<int64_t> offsets;
  Tensor tokens;     // i32 [P]: the token of each pair
  Tensor slots;      // i32 [P]: t * E + e, the pair's entry in [T, E] router matrices
  Tensor slot_pair;  // i32 [T, e_end - e_begin]: the pair of (t, e_begin + i), -1 if inactive
};
void route_pairs(RoutedPairs& pairs, const Tensor& r, int64_t e_begin, int64_t e_end, bool all_pairs);
// The pairs' rows summed into their tokens through the token-major view (the scatter-add of the
// pair path without sorting): out[t, :] = sum over t's pairs p, in pair order, of rows[p, :] (=);
// out [T, c], slot_pair [T, E_l], rows [P, c]; a token without pairs gets 0.
void combine_pairs(Tensor& out, const Tensor& slot_pair, const Tensor& rows);
// The pairs' values into their [T, E] slots: out[t, e_begin + i] = values[slot_pair[t, i]] where
// that pair exists, 0 everywhere else (=); values [P].
void pairs_to_slots(Tensor& out, const Tensor& slot_pair, const Tensor& values, int64_t e_begin);

// The experts on pairs grouped by expert. Pair p's input is row index[p] of x_rows [R, h] (the
// layer's tokens, or the rows received under expert parallelism), index i32 [P]; the kernels
// read the rows through the index (on CUDA in bf16: gathered inside the GEMMs, no [P, h] copy).
// Pairs [offsets[e], offsets[e+1]) go to local expert e, whose blocks are rows e*d.. of w_pre [E_l*d, h] (and of
// w_up_gated) and columns e*d.. of w_down [h, E_l*d]. sp [P]: the pairs' scores s_te; mu [P]
// (sp's dtype; null where the mode has no mean step): NormSiLU's mean of each pair's token,
// x_t . w_bar with w_bar the mean row of the WHOLE pre matrix (all E experts, on every rank):
// one dot per token, the caller's (ExpertDispatcher::pair_dot), not one per pair.
// outp [P, h] = W_down_e (s_p * z_p) (=). On CUDA (fp32 or bf16 activations) sp, mu, dsp and the
// cached rs are fp32.
struct GroupedExperts {
  Tensor mu;   // [P] mu as given (0 where the mode has no mean step)
  Tensor pre;  // [P, d] pre-activations
  Tensor up;   // [P, d] W_up x (gated experts only)
  Tensor rs;   // [P] 1/rms of each block (1 where the mode has no RMS step)
  Tensor y;    // [P, d] s * z, the input of W_down
};
void grouped_experts_forward(Tensor& outp, GroupedExperts& cache, const Tensor& x_rows, const Tensor& index,
                             const std::vector<int64_t>& offsets, const Tensor& sp, const Tensor* mu,
                             const Tensor& w_pre, const Tensor* w_up_gated, const Tensor& gamma,
                             const Tensor& w_down, NormSiluMode mode, double eps);
// Pair p's output gradient is row index[p] of dout_rows [R, h] (the same index as x_rows').
// dxp [P, h] (=) WITHOUT the mean's term; dsp [P] (=); gmean [P] (=, dsp's dtype): g_p, the sum
// of the gradient reaching the centred block (dc) of pair p (0 where the mode has no mean step).
// The mean's terms are the caller's, per token, where they cost T x h rather than P x h: with
// G_t the sum of g_p over t's pairs (combine_pairs), dx_t -= G_t w_bar (add_outer_), and every
// row of W_pre receives -gx / (E d), gx = sum_t G_t x_t (weighted_col_sum_) summed over every rank
// that holds experts (add_rows_). dw_pre, dw_up_gated, dgamma, dw_down +=.
void grouped_experts_backward(Tensor& dxp, Tensor& dsp, Tensor& gmean, Tensor& dw_pre, Tensor* dw_up_gated,
                              Tensor& dgamma, Tensor& dw_down, const Tensor& dout_rows, const GroupedExperts& cache,
                              const Tensor& x_rows, const Tensor& index, const std::vector<int64_t>& offsets,
                              const Tensor& sp,
                              const Tensor& w_pre, const Tensor* w_up_gated, const Tensor& gamma,
                              const Tensor& w_down, NormSiluMode mode, double eps);
// out[c] = sum over rows of x[n, c] (=): the rows' sum, for w_bar.
void sum_rows(Tensor& out, const Tensor& x);
// x[i, :] += alpha * row for every row i of x [n, c] (the mean's rank-one gradient).
void add_rows_(Tensor& x, const Tensor& row, double alpha);
// x[i, :] += alpha * a[i] * row: x [n, c], a [n] (on CUDA fp32), row [c] of x's dtype.
void add_outer_(Tensor& x, const Tensor& a, const Tensor& row, double alpha);
// out[k] += sum_i w[i] * x[i, k], in a fixed order: out [c] (fp32 or x's dtype), w [n] (on CUDA
// fp32), x [n, c].
void weighted_col_sum_(Tensor& out, const Tensor& w, const Tensor& x);

// ---- softmax cross-entropy ----------------------------------------------------------------------
// Returns the sum over rows of -log softmax(logits)[target]; targets i32 [T], logits [T, V].
// If grad_scale != 0 the logits are overwritten in place by grad_scale * (softmax - onehot):
// the gradient takes the logits' memory, so the [T, V] matrix exists once.
double cross_entropy(Tensor& logits, const Tensor& targets, double grad_scale);

// The two local halves of the vocabulary-parallel cross-entropy (Megatron's
// VocabParallelCrossEntropy; parallel/vocab_parallel_cross_entropy.h combines them over the
// tensor-parallel group). logits [T, V_l] are this rank's columns, vocabulary ids
// [vocab_start, vocab_start + V_l); targets i32 [T] are global ids. stats and lse are fp64 for
// every logits dtype: the log-sum-exp is combined in double and rounded once, as
// ops::cross_entropy rounds it, so the gradient is the whole-vocabulary op's to the last bit
// (nearly always; the ranks' partial sums round differently in double).
// stats [2, T] =: row 0 the log-sum-exp of each row's local logits; row 1 the target's logit
// where the target falls in this range, else 0 (so a sum over the ranks picks the target's).
void vocab_parallel_ce_forward(Tensor& stats, const Tensor& logits, const Tensor& targets, int64_t vocab_start);
// logits = grad_scale * (exp(logits - lse) - onehot), in place; lse [T] is the log-sum-exp over
// the whole vocabulary; the onehot is nonzero only for targets in this range.
void vocab_parallel_ce_backward(Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t vocab_start,
                                double grad_scale);

// ---- optimizer ---------------------------------------------------------------------------------
struct AdamWStep {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // 1-based, for bias correction
};
// Decoupled weight decay (Loshchilov & Hutter): p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p).
// grad is multiplied by grad_scale first (clipping).
void adamw_update(Tensor& param, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStep& s, double grad_scale);
// sum of squares of all entries, in double
double sum_squares(const Tensor& x);
// true if any entry is NaN or Inf
bool has_nonfinite(const Tensor& x);

}  // namespace decotron::ops
