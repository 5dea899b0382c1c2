// Argument checks of fastadapt::block_sparse_attention, vertical_slash_scores and
// block_pool_scores, shared by the CPU and CUDA glue. Layout contents (index values) are checked
// on host copies: always on CPU, on CUDA when FASTADAPT_VALIDATE_INDICES=1 (the Python layout
// builders produce valid layouts by construction).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastadapt {

constexpr int64_t kBsBlockSize = 64;  // = cpu::kBsBlock: query and key block size of the layout

inline void check_bs_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor* v) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) > 0, op, ": q must be [T, H_q, D] with D > 0, got shape ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  q.scalar_type() == at::kHalf,
              op, ": q must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.dim() == 3 && k.size(2) == q.size(2) && k.size(1) > 0, op,
              ": k must be [T_k, H_kv, D] with q's D (", q.size(2), "), got shape ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(),
              ", got ", k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), op, ": k must be on q's device ", q.device());
  TORCH_CHECK(q.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads (", q.size(1),
              ") must be a positive multiple of k heads (", k.size(1), ")");
  if (v) {
    TORCH_CHECK(v->sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v->sizes());
    TORCH_CHECK(v->scalar_type() == q.scalar_type(), op, ": v must have q's dtype ", q.scalar_type(),
                ", got ", v->scalar_type());
    TORCH_CHECK(v->device() == q.device(), op, ": v must be on q's device ", q.device());
  }
}

inline void check_bs_index(const char* op, const char* name, const at::Tensor& t,
                           const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt, op, ": ", name,
              " must be a 1-D int32 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device());
}

// Host copies (contiguous int32) of a layout's index tensors and the per-sequence lengths.
struct BsLayoutHost {
  std::vector<int32_t> q_indptr, k_indptr;  // [B + 1] (a single sequence when not given)
  int64_t B = 1, rows = 0;                  // rows = H_q * sum_b ceil(q_len_b / 64)
  std::vector<int64_t> row_base;            // [B] first BSR row of sequence b
};

inline std::vector<int32_t> bs_host(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  return std::vector<int32_t>(p, p + c.numel());
}

// Checks shapes, dtypes and devices of everything, and the contents of the small indptrs
// (always: they are copied to host anyway). Returns the sequence table.
inline BsLayoutHost check_bs_layout_shapes(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const std::optional<at::Tensor>& q_indptr,
    const std::optional<at::Tensor>& k_indptr, const std::optional<at::Tensor>& col_indptr,
    const std::optional<at::Tensor>& cols, const std::optional<at::Tensor>& diag_indptr,
    const std::optional<at::Tensor>& diags) {
  const int64_t Nq = q.size(0), Nk = k.size(0), Hq = q.size(1);
  check_bs_index(op, "row_ptr", row_ptr, q);
  check_bs_index(op, "col_idx", col_idx, q);
  TORCH_CHECK(q_indptr.has_value() == k_indptr.has_value(), op,
              ": q_indptr and k_indptr must be given together");
  BsLayoutHost L;
  if (q_indptr.has_value()) {
    check_bs_index(op, "q_indptr", *q_indptr, q);
    check_bs_index(op, "k_indptr", *k_indptr, q);
    TORCH_CHECK(q_indptr->numel() >= 2 && k_indptr->numel() == q_indptr->numel(), op,
                ": q_indptr and k_indptr must both have B + 1 >= 2 entries, got ", q_indptr->numel(),
                " and ", k_indptr->numel());
    L.q_indptr = bs_host(*q_indptr);
    L.k_indptr = bs_host(*k_indptr);
  } else {
    TORCH_CHECK(Nq <= INT32_MAX && Nk <= INT32_MAX, op, ": too many tokens for int32 indices");
    L.q_indptr = {0, static_cast<int32_t>(Nq)};
    L.k_indptr = {0, static_cast<int32_t>(Nk)};
  }
  L.B = static_cast<int64_t>(L.q_indptr.size()) - 1;
  TORCH_CHECK(L.q_indptr[0] == 0 && L.q_indptr[L.B] == Nq, op, ": q_indptr must start at 0 and end at ",
              "q's token count ", Nq);
  TORCH_CHECK(L.k_indptr[0] == 0 && L.k_indptr[L.B] == Nk, op, ": k_indptr must start at 0 and end at ",
              "k's token count ", Nk);
  L.row_base.resize(L.B);
  int64_t rows = 0;
  for (int64_t b = 0; b < L.B; ++b) {
    const int64_t T = L.q_indptr[b + 1] - L.q_indptr[b], Tk = L.k_indptr[b + 1] - L.k_indptr[b];
    TORCH_CHECK(T >= 0, op, ": q_indptr must be non-decreasing (sequence ", b, ")");
    TORCH_CHECK(Tk >= T, op, ": k_indptr: sequence ", b, " has ", Tk, " keys for ", T,
                " queries; queries are the last keys, so k_len >= q_len");
    L.row_base[b] = rows;
    rows += Hq * ((T + kBsBlockSize - 1) / kBsBlockSize);
  }
  L.rows = rows;
  TORCH_CHECK(row_ptr.numel() == rows + 1, op, ": row_ptr must have H_q * query blocks + 1 = ",
              rows + 1, " entries (rows ordered sequence, head, query block of 64), got ",
              row_ptr.numel());
  TORCH_CHECK(col_indptr.has_value() == cols.has_value(), op,
              ": col_indptr and cols must be given together");
  TORCH_CHECK(diag_indptr.has_value() == diags.has_value(), op,
              ": diag_indptr and diags must be given together");
  if (col_indptr.has_value()) {
    check_bs_index(op, "col_indptr", *col_indptr, q);
    check_bs_index(op, "cols", *cols, q);
    TORCH_CHECK(col_indptr->numel() == L.B * Hq + 1, op, ": col_indptr must have B * H_q + 1 = ",
                L.B * Hq + 1, " entries, got ", col_indptr->numel());
  }
  if (diag_indptr.has_value()) {
    check_bs_index(op, "diag_indptr", *diag_indptr, q);
    check_bs_index(op, "diags", *diags, q);
    TORCH_CHECK(diag_indptr->numel() == L.B * Hq + 1, op, ": diag_indptr must have B * H_q + 1 = ",
                L.B * Hq + 1, " entries, got ", diag_indptr->numel());
  }
  return L;
}

// A CSR list [ptr] over `segments` whose entries in segment s are strictly increasing and in
// [0, limit(s)).
template <typename Limit>
inline void check_bs_csr(const char* op, const char* ptr_name, const char* idx_name,
                         const std::vector<int32_t>& ptr, const std::vector<int32_t>& idx,
                         Limit limit) {
  const int64_t n = static_cast<int64_t>(ptr.size()) - 1;
  TORCH_CHECK(ptr[0] == 0 && ptr[n] == static_cast<int64_t>(idx.size()), op, ": ", ptr_name,
              " must start at 0 and end at ", idx_name, "'s size ", idx.size(), ", got ", ptr[0],
              " and ", ptr[n]);
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK(ptr[s + 1] >= ptr[s], op, ": ", ptr_name, " must be non-decreasing (entry ", s, ")");
    const int64_t lim = limit(s);
    for (int64_t t = ptr[s]; t < ptr[s + 1]; ++t) {
      TORCH_CHECK(idx[t] >= 0 && idx[t] < lim, op, ": ", idx_name, "[", t, "] = ", idx[t],
                  " is out of range [0, ", lim, ") for row ", s);
      TORCH_CHECK(t == ptr[s] || idx[t] > idx[t - 1], op, ": ", idx_name,
                  " must be strictly increasing within a row (row ", s, ", entry ", t, ")");
    }
  }
}

// Index contents: block columns within each sequence's key blocks, columns and diagonals within
// its keys, all sorted without repeats.
inline void check_bs_layout_contents(const char* op, const BsLayoutHost& L, int64_t Hq,
                                     const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                     const std::optional<at::Tensor>& col_indptr,
                                     const std::optional<at::Tensor>& cols,
                                     const std::optional<at::Tensor>& diag_indptr,
                                     const std::optional<at::Tensor>& diags) {
  // sequence of every BSR row
  std::vector<int32_t> row_seq(L.rows);
  for (int64_t b = 0; b < L.B; ++b) {
    const int64_t end = b + 1 < L.B ? L.row_base[b + 1] : L.rows;
    for (int64_t r = L.row_base[b]; r < end; ++r) row_seq[r] = static_cast<int32_t>(b);
  }
  auto nkeys = [&](int64_t b) { return static_cast<int64_t>(L.k_indptr[b + 1] - L.k_indptr[b]); };
  check_bs_csr(op, "row_ptr", "col_idx", bs_host(row_ptr), bs_host(col_idx), [&](int64_t r) {
    return (nkeys(row_seq[r]) + kBsBlockSize - 1) / kBsBlockSize;
  });
  if (col_indptr.has_value())
    check_bs_csr(op, "col_indptr", "cols", bs_host(*col_indptr), bs_host(*cols),
                 [&](int64_t s) { return nkeys(s / Hq); });
  if (diag_indptr.has_value())
    check_bs_csr(op, "diag_indptr", "diags", bs_host(*diag_indptr), bs_host(*diags),
                 [&](int64_t s) { return nkeys(s / Hq); });
}

inline double bs_scale(const std::optional<double>& scale, int64_t D) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

}  // namespace fastadapt
