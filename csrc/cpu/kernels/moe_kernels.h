// Torch-free CPU kernels of the mixture-of-experts family (fastadapt::moe_route, moe_combine;
// moe_grouped_qlinear runs the qlinear row kernels per expert segment, see cpu/moe_cpu.cpp), one
// build per ISA (moe_generic.cpp, moe_avx2.cpp) from one body (moe_impl.h). fp32, row-major.
#pragma once
#include <cstdint>

namespace fastadapt::cpu {

#define FASTADAPT_MOE_DECLARE(SUFFIX)                                                             \
  /* AdaMoE top-k of rows [t0, t1) of logits [T, E_all] (E real experts first, then nulls):     */ \
  /* p = softmax(row); the k largest p (lower index first on ties) -> topk_ids [T, k],          */ \
  /* topk_w [T, k]. renorm: real choices' weights / their sum (null choices 0; a row of only    */ \
  /* nulls gets 0s), else the softmax probabilities.                                            */ \
  void moe_topk_rows_##SUFFIX(const float* logits, int64_t E_all, int64_t E, int64_t k,         \
                              bool renorm, int64_t t0, int64_t t1, int32_t* topk_ids,           \
                              float* topk_w);                                                   \
  /* out[t, n0:n1] = sum_j w[r] y[r, n0:n1] with r = rows[t, j] (skipped when < 0), for tokens  */ \
  /* [t0, t1); y [P, N], rows [T, k], out [T, N]; a fixed summation order (j ascending).        */ \
  void moe_combine_rows_##SUFFIX(const float* y, int64_t N, const float* w, const int32_t* rows, \
                                 int64_t k, int64_t t0, int64_t t1, float* out);

FASTADAPT_MOE_DECLARE(generic)
FASTADAPT_MOE_DECLARE(avx2)
#undef FASTADAPT_MOE_DECLARE

// Counting sort of the routing into per-expert groups (serial, O(T k); ISA-independent, built
// in the generic TU): rows of expert e are [offsets[e], offsets[e+1]), tokens ascending.
// token_ids / row_w [T k] (entries past offsets[E] = -1 / 0), offsets [E + 1], rows [T, k].
void moe_group_rows(const int32_t* topk_ids, const float* topk_w, int64_t T, int64_t k, int64_t E,
                    int32_t* token_ids, float* row_w, int32_t* offsets, int32_t* rows);

}  // namespace fastadapt::cpu
