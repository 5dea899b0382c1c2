// Torch-free CPU kernels of the paged KV cache family: data movement (kv_append, kv_compact)
// and attention over paged keys (paged_decode_attention, paged_prefix_attention,
// merge_attention_states). Layout and semantics: python/fastadapt_ops/ops/kv_reference.py.
// Each function is built twice (paged_*_generic.cpp, paged_*_avx2.cpp); the glue picks one.
#pragma once
#include <cstdint>

namespace fastadapt::cpu {

// ---- data movement (bytes; dtype conversion happens in the glue, exactly as torch's .to) -----

// For tokens n in [n0, n1) and heads h in [0, H): copy row (n, h) of k to slot
// slots[n * H + h] of k_pages (and v likewise), skipping slot -1. Rows are row_bytes long.
struct KvAppendArgs {
  const char* k = nullptr;      // [N, H, D] element (n, h, 0) at k + n * k_sn + h * k_sh
  const char* v = nullptr;      // [N, H, D]
  int64_t k_sn = 0, k_sh = 0;   // byte strides of k
  int64_t v_sn = 0, v_sh = 0;   // byte strides of v
  const int32_t* slots = nullptr;  // [N, H] contiguous; -1 skips
  int64_t H = 0;
  char* k_pages = nullptr;      // [num_pages * page_size] rows of k_row_bytes
  char* v_pages = nullptr;      // [num_pages * page_size] rows of v_row_bytes
  int64_t k_row_bytes = 0, v_row_bytes = 0;
};
void kv_append_rows_generic(const KvAppendArgs& a, int64_t n0, int64_t n1);
void kv_append_rows_avx2(const KvAppendArgs& a, int64_t n0, int64_t n1);

// tmp[i] = pool[slots[i]] for i in [i0, i1) (rows of row_bytes).
void kv_gather_rows_generic(const char* pool, int64_t row_bytes, const int32_t* slots, int64_t i0,
                            int64_t i1, char* tmp);
void kv_gather_rows_avx2(const char* pool, int64_t row_bytes, const int32_t* slots, int64_t i0,
                         int64_t i1, char* tmp);
// pool[slots[i]] = tmp[i] for i in [i0, i1).
void kv_scatter_rows_generic(char* pool, int64_t row_bytes, const int32_t* slots, int64_t i0,
                             int64_t i1, const char* tmp);
void kv_scatter_rows_avx2(char* pool, int64_t row_bytes, const int32_t* slots, int64_t i0,
                          int64_t i1, const char* tmp);

// ---- attention -------------------------------------------------------------------------------

enum class KvDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// One page-table row (a (sequence, KV head) pair, or a shared prefix of one KV head).
struct PagedRow {
  const void* k_pages = nullptr;  // [num_pages, page_size, D] dtype, contiguous
  const void* v_pages = nullptr;  // [num_pages, page_size, D] dtype, contiguous
  KvDType dtype = KvDType::F32;
  int64_t page_size = 0, D = 0;
  const int32_t* pages = nullptr;  // the row's pages, in order (ceil(n / page_size) used)
  int64_t n = 0;                   // tokens of the row
};

// Partial attention of M queries over keys [k0, k1) of one row (online softmax, fp32):
//   q   [M, D] fp32 contiguous, already multiplied by the softmax scale
//   lim [M]    query m sees keys j <= lim[m] (causal limit; lim < k0 means no key here)
//   acc [M, D] out: sum_j exp(s_mj - mx[m]) v_j (unnormalised)
//   mx  [M]    out: running max of the visible logits (-inf when none)
//   sum [M]    out: sum_j exp(s_mj - mx[m])
void paged_attn_partial_generic(const PagedRow& row, const float* q, const int64_t* lim,
                                int64_t M, int64_t k0, int64_t k1, float* acc, float* mx,
                                float* sum);
void paged_attn_partial_avx2(const PagedRow& row, const float* q, const int64_t* lim, int64_t M,
                             int64_t k0, int64_t k1, float* acc, float* mx, float* sum);

// Second pass for per-key attention mass: for keys j in [k0, k1) add
// sum_m exp(s_mj - lse[m]) over the queries that see key j to score_acc[slot(j)]
// (score_acc: [num_pages * page_size] fp32). Queries with lse = -inf are skipped.
void paged_attn_scores_generic(const PagedRow& row, const float* q, const int64_t* lim,
                               const float* lse, int64_t M, int64_t k0, int64_t k1,
                               float* score_acc);
void paged_attn_scores_avx2(const PagedRow& row, const float* q, const int64_t* lim,
                            const float* lse, int64_t M, int64_t k0, int64_t k1, float* score_acc);

// Merge of nsplit partial states of M queries (split s at acc + s * M * D, mx + s * M, ...):
// out[m] = sum_s acc_s[m] e^(mx_s - mx*) / sum_s sum_s[m] e^(mx_s - mx*), lse[m] = mx* + log(..)
// written at out + out_idx[m] * D and lse[out_idx[m]]; 0 and -inf for a query with no key.
void paged_attn_merge_generic(const float* acc, const float* mx, const float* sum, int64_t nsplit,
                              int64_t M, int64_t D, const int64_t* out_idx, float* out, float* lse);
void paged_attn_merge_avx2(const float* acc, const float* mx, const float* sum, int64_t nsplit,
                           int64_t M, int64_t D, const int64_t* out_idx, float* out, float* lse);

// merge_attention_states over rows [r0, r1) of fp32 [rows, D] states and [rows] lse.
void merge_states_rows_generic(const float* out_a, const float* lse_a, const float* out_b,
                               const float* lse_b, float* out, float* lse, int64_t D, int64_t r0,
                               int64_t r1);
void merge_states_rows_avx2(const float* out_a, const float* lse_a, const float* out_b,
                            const float* lse_b, float* out, float* lse, int64_t D, int64_t r0,
                            int64_t r1);

}  // namespace fastadapt::cpu
