// Torch-free CPU kernels of the token merging and pruning family (fastadapt::bipartite_soft_matching,
// merge_tokens, proportional_attention), one build per ISA (tokens_generic.cpp, tokens_avx2.cpp)
// from one body (tokens_impl.h). All buffers fp32, contiguous, row-major.
#pragma once
#include <cstdint>

namespace fastadapt::cpu {

#define FASTADAPT_TOKENS_DECLARE(SUFFIX)                                                          \
  /* inv[r] = 1 / max(||x[r]||_2, 1e-12) for rows [r0, r1) of x [rows, C] */                     \
  void tokens_inv_norms_##SUFFIX(const float* x, int64_t C, int64_t r0, int64_t r1, float* inv); \
  /* One batch item of ToMe matching. metric [N, C], inv [N] (inverse row norms); the B half   */ \
  /* (odd tokens) transposed: bT [C, ldb] (ldb a multiple of 16, zero-padded), wb [ldb] (inv   */ \
  /* norm of odd token 2j+1, 0 when protected or padding), addb [ldb] (0, or -inf when         */ \
  /* protected or padding). For A tokens i in [i0, i1) (token 2i): best[i] = max over allowed  */ \
  /* j of cos(metric[2i], metric[2j+1]), best_idx[i] = 2j+1 (first j on ties); -inf and -1     */ \
  /* when no j qualifies. The similarity is a running max: nothing is stored.                  */ \
  void tokens_match_rows_##SUFFIX(const float* metric, const float* inv, int64_t C, const float* bT, \
                                  int64_t ldb, const float* wb, const float* addb, int64_t i0,     \
                                  int64_t i1, float* best, int32_t* best_idx);                     \
  /* Size-weighted means of one batch item. x [N, C], sizes [N] or null (= ones); sources of    */ \
  /* output row m are src_idx[src_ptr[m] .. src_ptr[m + 1]) (CSR). For m in [m0, m1):           */ \
  /* out[m] = sum s x / sum s (0 when the sum is 0), out_sizes[m] = sum s.                      */ \
  void tokens_merge_rows_##SUFFIX(const float* x, const float* sizes, const int32_t* src_ptr,    \
                                  const int32_t* src_idx, int64_t C, int64_t m0, int64_t m1,      \
                                  float* out, float* out_sizes);                                   \
  /* Flash-style attention of one (batch, head). q [Nq, D], kT [D, ldk] (K transposed, keys   */ \
  /* zero-padded to ldk >= round_up(Nk, 16)), v [Nk, D], bias [Nk] (log sizes, -inf = masked    */ \
  /* key) or null. Rows [q0, q1) of out [Nq, D] = softmax(q k^T scale + bias) v, online        */ \
  /* softmax over key blocks (no Nq x Nk matrix); all-masked rows give 0.                      */ \
  void tokens_prop_attn_rows_##SUFFIX(const float* q, const float* kT, int64_t ldk, const float* v, \
                                      const float* bias, int64_t Nk, int64_t D, float scale,       \
                                      int64_t q0, int64_t q1, float* out);

FASTADAPT_TOKENS_DECLARE(generic)
FASTADAPT_TOKENS_DECLARE(avx2)
#undef FASTADAPT_TOKENS_DECLARE

}  // namespace fastadapt::cpu
