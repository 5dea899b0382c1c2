// Torch-free CPU kernels of the block-sparse prefill attention family: the attention itself
// (block_sparse_attention) and the two pattern estimators (vertical_slash_scores,
// block_pool_scores). Semantics: python/fastadapt_ops/ops/block_sparse.py. Each function is built
// twice (block_sparse_generic.cpp, block_sparse_avx2.cpp); the glue picks one per call.
//
// Everything here is fp32: the glue widens 16-bit q/k/v once (O(T D), negligible next to the
// attention) and narrows the output.
#pragma once
#include <cstdint>

namespace fastadapt::cpu {

// Fixed tile sizes of the layout: query blocks of 64 queries, key blocks of 64 keys.
constexpr int64_t kBsBlock = 64;

struct BsAttnArgs {
  const float* q = nullptr;  // [Nq, Hq, D] contiguous (Nq = q_indptr[B])
  const float* k = nullptr;  // [Nk, Hkv, D] contiguous (Nk = k_indptr[B])
  const float* v = nullptr;  // [Nk, Hkv, D] contiguous
  int64_t Hq = 0, Hkv = 0, D = 0;
  float scale = 1.f;
  const int32_t* q_indptr = nullptr;     // [B + 1] queries of sequence b: [q_indptr[b], q_indptr[b+1])
  const int32_t* k_indptr = nullptr;     // [B + 1] keys of sequence b (k_len >= q_len, causal tail)
  const int32_t* row_ptr = nullptr;      // [R + 1] BSR row pointers, rows ordered (b, h, query block)
  const int32_t* col_idx = nullptr;      // [nnz] key block indices, strictly increasing per row
  const int32_t* col_indptr = nullptr;   // [B * Hq + 1] extra key columns per (b, h), or null
  const int32_t* cols = nullptr;         // key indices (within the sequence), strictly increasing
  const int32_t* diag_indptr = nullptr;  // [B * Hq + 1] diagonal offsets per (b, h), or null
  const int32_t* diags = nullptr;        // offsets o >= 0 (key = query position - o), increasing
  float* out = nullptr;                  // [Nq, Hq, D] fp32
  float* lse = nullptr;                  // [Nq, Hq] natural log; -inf where a query sees no key
};

// One BSR row: query block r of head h of sequence b.
struct BsRow {
  int32_t b, h, r, row;
};

// Floats of scratch one thread needs for head dim D and up to nkb key blocks per sequence.
int64_t bs_scratch_floats(int64_t D, int64_t nkb);

// Rows [i0, i1) of `rows` (each a whole query block: no split-K, outputs written directly).
void bs_attn_rows_generic(const BsAttnArgs& a, const BsRow* rows, int64_t i0, int64_t i1, float* scratch);
void bs_attn_rows_avx2(const BsAttnArgs& a, const BsRow* rows, int64_t i0, int64_t i1, float* scratch);

// ---- estimators (one sequence: q [T, Hq, D], k [Tk, Hkv, D], queries are the last T keys) -----

// Vertical-slash scores of head h from its last n_last queries: with p_i the softmax row of query
// i (causal, scaled), vert[h, j] = sum_i p_i[j] and slash[h, o] = sum_i p_i[pos_i - o], both
// [Hq, Tk] fp32. Two passes over the keys (row max/sum, then the normalised mass).
void vs_scores_head_generic(const float* q, const float* k, int64_t T, int64_t Tk, int64_t Hq,
                            int64_t Hkv, int64_t D, float scale, int64_t n_last, int64_t h,
                            float* vert, float* slash, float* scratch);
void vs_scores_head_avx2(const float* q, const float* k, int64_t T, int64_t Tk, int64_t Hq,
                         int64_t Hkv, int64_t D, float scale, int64_t n_last, int64_t h,
                         float* vert, float* slash, float* scratch);

// Block-pooled logits of head h: qm[r] = mean of query block r, km[c] = mean of key block c
// (blocks of kBsBlock over query indices / key positions; last blocks partial), then
// scores[h, r, c] = scale * qm[r] . km[c] where block c starts at or before the last position
// of query block r, else -inf. scores: [Hq, nqb, nkb] fp32. scratch: (nqb + nkb) * D floats.
void block_pool_head_generic(const float* q, const float* k, int64_t T, int64_t Tk, int64_t Hq,
                             int64_t Hkv, int64_t D, float scale, int64_t h, float* scores,
                             float* scratch);
void block_pool_head_avx2(const float* q, const float* k, int64_t T, int64_t Tk, int64_t Hq,
                          int64_t Hkv, int64_t D, float scale, int64_t h, float* scores,
                          float* scratch);

}  // namespace fastadapt::cpu
