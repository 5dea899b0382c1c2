// AVX2 + FMA build of the block-sparse attention and estimator kernels (this TU alone gets
// -mavx2 -mfma; see block_sparse_impl.h).
#include "cpu/kernels/block_sparse_impl.h"

namespace fastadapt::cpu {

void bs_attn_rows_avx2(const BsAttnArgs& a, const BsRow* rows, int64_t i0, int64_t i1, float* scratch) {
  bs_attn_rows_impl(a, rows, i0, i1, scratch);
}

void vs_scores_head_avx2(const float* q, const float* k, int64_t T, int64_t Tk, int64_t Hq,
                         int64_t Hkv, int64_t D, float scale, int64_t n_last, int64_t h,
                         float* vert, float* slash, float* scratch) {
  vs_scores_head_impl(q, k, T, Tk, Hq, Hkv, D, scale, n_last, h, vert, slash, scratch);
}

void block_pool_head_avx2(const float* q, const float* k, int64_t T, int64_t Tk, int64_t Hq,
                          int64_t Hkv, int64_t D, float scale, int64_t h, float* scores,
                          float* scratch) {
  block_pool_head_impl(q, k, T, Tk, Hq, Hkv, D, scale, h, scores, scratch);
}

}  // namespace fastadapt::cpu
