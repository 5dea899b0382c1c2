// Portable build of the paged attention kernels (see paged_attention_impl.h).
#include "cpu/kernels/paged_attention_impl.h"

namespace fastadapt::cpu {
void paged_attn_partial_generic(const PagedRow& row, const float* q, const int64_t* lim, int64_t M,
                             int64_t k0, int64_t k1, float* acc, float* mx, float* sum) {
  paged_attn_partial_impl(row, q, lim, M, k0, k1, acc, mx, sum);
}
void paged_attn_scores_generic(const PagedRow& row, const float* q, const int64_t* lim,
                            const float* lse, int64_t M, int64_t k0, int64_t k1, float* score_acc) {
  paged_attn_scores_impl(row, q, lim, lse, M, k0, k1, score_acc);
}
void paged_attn_merge_generic(const float* acc, const float* mx, const float* sum, int64_t nsplit,
                           int64_t M, int64_t D, const int64_t* out_idx, float* out, float* lse) {
  paged_attn_merge_impl(acc, mx, sum, nsplit, M, D, out_idx, out, lse);
}
void merge_states_rows_generic(const float* out_a, const float* lse_a, const float* out_b,
                            const float* lse_b, float* out, float* lse, int64_t D, int64_t r0,
                            int64_t r1) {
  merge_states_rows_impl(out_a, lse_a, out_b, lse_b, out, lse, D, r0, r1);
}
}  // namespace fastadapt::cpu
