// The sparse expert path's GEMMs that read their pairs' rows through an index (bf16, tensor
// cores through WMMA, fp32 sums): the gather fused into the GEMM, so no [P, h] copy of the
// gathered rows is written and read back (kernels/cuda/gathered_gemm.cu).
//
// Pair p (of local expert e, p in [off[e], off[e+1])) reads row index[p] of `rows` [R, h]
// (num_rows = R; an index outside [0, R) sets kBadPairIndex and reads as zeros). An
// expert's weight block is addressed by the layout:
//   rows_of_expert: block(j, k) = W[(e n + j) ldw + k]   (w_pre [E n, h]: expert e's rows)
//   cols_of_expert: block(j, k) = W[k ldw + e n + j]     (w_down [h, E n]: expert e's columns)
// Host-includable (tests and benchmarks switch the path with set_fused_expert_gather).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <vector>

namespace decotron::cuda {

using bf16_t = __nv_bfloat16;

enum class ExpertBlock { rows_of_expert, cols_of_expert };

// C[p, j] = sum_k rows[index[p], k] block_e(j, k), j < n (C bf16 [P, n], row stride n): the
// pairs' pre-activations (w_pre, rows_of_expert) or their dY from the output gradient (w_down,
// cols_of_expert).
void gathered_gemm(bf16_t* C, const bf16_t* rows, int64_t num_rows, const int32_t* index, int64_t h, const bf16_t* W,
                   ExpertBlock layout, int64_t ldw, int64_t n, const std::vector<int64_t>& off);

// block_e(j, k) of grad (fp32, same layouts) += sum over e's pairs p of G[p, j] rows[index[p], k]:
// the experts' weight gradients, each element summed in pair order by one block (deterministic)
// and added once into the fp32 gradient (no bf16 rounding of the micro-batch's product).
void gathered_weight_grad(float* grad, ExpertBlock layout, int64_t ldg, const bf16_t* G, int64_t n,
                          const bf16_t* rows, int64_t num_rows, const int32_t* index, int64_t h,
                          const std::vector<int64_t>& off);

// Whether the grouped experts use these kernels: bf16 activations with fp32 gradients, unless
// DECOTRON_EXPERT_GATHER=copy (gather into [P, h], then cuBLAS's grouped GEMM: the earlier
// path, kept for comparison) or set_fused_expert_gather(false) (benchmarks).
bool fused_expert_gather();
void set_fused_expert_gather(bool on);

}  // namespace decotron::cuda
