// Argument checks of fastadapt::paged_decode_attention, fastadapt::paged_prefix_attention and
// fastadapt::merge_attention_states shared by the CPU and CUDA glue.
#pragma once
#include <ATen/ATen.h>

#include "paged_kv_checks.h"

namespace fastadapt {

// Largest head dimension the kernels take (the CUDA kernel keeps tiles of D floats in shared
// memory; the CPU kernel would take any D, but one limit keeps the two devices alike).
constexpr int64_t kPagedMaxHeadDim = 256;

struct PagedAttnShape {
  int64_t B, Tq, Hq, Hkv, G, D, P, S;
  bool shared_pages;  // some page appears twice among the used pages (validated devices only)
};

// Common part: q [B, T_q, H_q, D], pools [P, S, D] of one dtype, the page table of R rows.
inline PagedAttnShape check_paged_attention_common(
    const char* op, const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& lens,
    const char* indptr_name, const char* indices_name, const char* lens_name, bool per_sequence) {
  TORCH_CHECK(q.dim() == 4, "fastadapt::", op, ": q must be [B, T_q, H_q, D], got shape ",
              q.sizes());
  TORCH_CHECK(paged_is_float_kind(q.scalar_type()), "fastadapt::", op,
              ": q must be float32, bfloat16 or float16, got ", q.scalar_type());
  check_page_pool(op, "k_pages", k_pages);
  check_page_pool(op, "v_pages", v_pages);
  TORCH_CHECK(v_pages.sizes() == k_pages.sizes() && v_pages.scalar_type() == k_pages.scalar_type(),
              "fastadapt::", op, ": v_pages must match k_pages (", k_pages.scalar_type(), ", ",
              k_pages.sizes(), "), got ", v_pages.scalar_type(), " of shape ", v_pages.sizes());
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK(k_pages.size(2) == D, "fastadapt::", op, ": q's head dim ", D,
              " must equal the pools' D = ", k_pages.size(2));
  TORCH_CHECK(D <= kPagedMaxHeadDim, "fastadapt::", op, ": head dim D = ", D,
              " is above the supported maximum ", kPagedMaxHeadDim);
  const auto dev = q.device();
  TORCH_CHECK(k_pages.device() == dev && v_pages.device() == dev, "fastadapt::", op,
              ": k_pages and v_pages must be on q's device ", dev);
  check_index_tensor(op, indptr_name, indptr, dev);
  check_index_tensor(op, indices_name, indices, dev);
  check_index_tensor(op, lens_name, lens, dev);
  TORCH_CHECK(lens.dim() == 1, "fastadapt::", op, ": ", lens_name, " must be 1-D, got shape ",
              lens.sizes());
  TORCH_CHECK(indices.dim() == 1, "fastadapt::", op, ": ", indices_name,
              " must be 1-D, got shape ", indices.sizes());
  const int64_t R = lens.numel();
  int64_t Hkv;
  if (per_sequence) {
    TORCH_CHECK(B > 0 ? (R % B == 0 && R > 0) : true, "fastadapt::", op, ": ", lens_name,
                " must hold B * H_kv entries (B = ", B, "), got ", R);
    Hkv = B > 0 ? R / B : 0;
  } else {
    Hkv = R;
  }
  TORCH_CHECK(Hkv > 0 || B == 0, "fastadapt::", op, ": ", lens_name, " must not be empty");
  TORCH_CHECK(Hkv == 0 || Hq % Hkv == 0, "fastadapt::", op, ": H_q = ", Hq,
              " must be a multiple of H_kv = ", Hkv, " (from ", lens_name, ")");
  TORCH_CHECK(indptr.dim() == 1 && indptr.numel() == R + 1, "fastadapt::", op, ": ", indptr_name,
              " must be [", R + 1, "] (one more than ", lens_name, "), got shape ", indptr.sizes());
  const int64_t P = k_pages.size(0), S = k_pages.size(1);
  bool shared = false;
  if (paged_validate_contents(dev))
    shared = validate_page_table(op, indptr_name, indices_name, lens_name, indptr, indices, lens,
                                 R, P, S);
  return {B, Tq, Hq, Hkv, Hkv > 0 ? Hq / Hkv : 0, D, P, S, shared};
}

inline PagedAttnShape check_paged_decode_args(const at::Tensor& q, const at::Tensor& k_pages,
                                              const at::Tensor& v_pages,
                                              const at::Tensor& page_indptr,
                                              const at::Tensor& page_indices,
                                              const at::Tensor& kv_lens,
                                              const std::optional<at::Tensor>& score_acc) {
  const char* op = "paged_decode_attention";
  PagedAttnShape s = check_paged_attention_common(op, q, k_pages, v_pages, page_indptr,
                                                  page_indices, kv_lens, "page_indptr",
                                                  "page_indices", "kv_lens", true);
  if (score_acc.has_value()) {
    const auto& a = *score_acc;
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(0) == s.P &&
                    a.size(1) == s.S,
                "fastadapt::paged_decode_attention: score_acc must be float32 [num_pages, "
                "page_size] = [", s.P, ", ", s.S, "], got ", a.scalar_type(), " of shape ",
                a.sizes());
    TORCH_CHECK(a.is_contiguous() && a.device() == q.device(),
                "fastadapt::paged_decode_attention: score_acc must be contiguous and on ",
                q.device());
  }
  return s;
}

inline PagedAttnShape check_paged_prefix_args(const at::Tensor& q, const at::Tensor& k_pages,
                                              const at::Tensor& v_pages,
                                              const at::Tensor& prefix_indptr,
                                              const at::Tensor& prefix_indices,
                                              const at::Tensor& prefix_lens) {
  return check_paged_attention_common("paged_prefix_attention", q, k_pages, v_pages,
                                      prefix_indptr, prefix_indices, prefix_lens, "prefix_indptr",
                                      "prefix_indices", "prefix_lens", false);
}

// Returns (rows, D) of the [..., H, D] states.
inline std::pair<int64_t, int64_t> check_merge_states_args(const at::Tensor& out_a,
                                                           const at::Tensor& lse_a,
                                                           const at::Tensor& out_b,
                                                           const at::Tensor& lse_b) {
  const char* op = "merge_attention_states";
  TORCH_CHECK(out_a.dim() >= 2 && out_a.size(-1) > 0, "fastadapt::", op,
              ": out_a must be [..., H, D] with D > 0, got shape ", out_a.sizes());
  TORCH_CHECK(paged_is_float_kind(out_a.scalar_type()), "fastadapt::", op,
              ": out_a must be float32, bfloat16 or float16, got ", out_a.scalar_type());
  TORCH_CHECK(paged_is_float_kind(out_b.scalar_type()), "fastadapt::", op,
              ": out_b must be float32, bfloat16 or float16, got ", out_b.scalar_type());
  TORCH_CHECK(out_b.sizes() == out_a.sizes(), "fastadapt::", op,
              ": out_b must have out_a's shape ", out_a.sizes(), ", got ", out_b.sizes());
  const auto lse_shape = out_a.sizes().slice(0, out_a.dim() - 1);
  TORCH_CHECK(lse_a.scalar_type() == at::kFloat && lse_a.sizes() == lse_shape, "fastadapt::", op,
              ": lse_a must be float32 of shape ", lse_shape, ", got ", lse_a.scalar_type(),
              " of shape ", lse_a.sizes());
  TORCH_CHECK(lse_b.scalar_type() == at::kFloat && lse_b.sizes() == lse_shape, "fastadapt::", op,
              ": lse_b must be float32 of shape ", lse_shape, ", got ", lse_b.scalar_type(),
              " of shape ", lse_b.sizes());
  const auto dev = out_a.device();
  TORCH_CHECK(out_b.device() == dev && lse_a.device() == dev && lse_b.device() == dev,
              "fastadapt::", op, ": out_b, lse_a and lse_b must be on out_a's device ", dev);
  const int64_t D = out_a.size(-1);
  return {out_a.numel() / D, D};
}

}  // namespace fastadapt
