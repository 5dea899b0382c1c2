// Argument checks of fastadapt::kv_append and fastadapt::kv_compact shared by the CPU and CUDA
// glue, and the index-content validators of the paged family (also used by the attention ops).
// Index *contents* are validated on CPU; CUDA validates them only when the environment variable
// FASTADAPT_CHECK_INDICES=1 is set (a device-to-host copy and a sync per call).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace fastadapt {

inline bool paged_is_float_kind(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A page pool [num_pages, page_size, D], float32 | bfloat16 | float16, contiguous.
inline void check_page_pool(const char* op, const char* name, const at::Tensor& p) {
  TORCH_CHECK(p.dim() == 3, "fastadapt::", op, ": ", name,
              " must be [num_pages, page_size, D], got shape ", p.sizes());
  TORCH_CHECK(paged_is_float_kind(p.scalar_type()), "fastadapt::", op, ": ", name,
              " must be float32, bfloat16 or float16, got ", p.scalar_type());
  TORCH_CHECK(p.is_contiguous(), "fastadapt::", op, ": ", name, " must be contiguous");
  TORCH_CHECK(p.size(1) > 0 && p.size(2) > 0, "fastadapt::", op, ": ", name,
              " must have page_size > 0 and D > 0, got shape ", p.sizes());
}

inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t,
                               const at::Device& dev) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "fastadapt::", op, ": ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == dev, "fastadapt::", op, ": ", name, " must be on ", dev, ", got ",
              t.device());
}

// Whether index contents are validated on this device (always on CPU; opt-in on CUDA).
inline bool paged_validate_contents(const at::Device& dev) {
  if (dev.is_cpu()) return true;
  const char* e = std::getenv("FASTADAPT_CHECK_INDICES");
  return e != nullptr && std::strcmp(e, "0") != 0 && e[0] != '\0';
}

// Every slot in [0, num_slots), or -1 when allow_skip.
inline void validate_slots(const char* op, const char* name, const at::Tensor& slots,
                           int64_t num_slots, bool allow_skip) {
  const at::Tensor s = slots.to(at::kCPU).contiguous();
  const int32_t* p = s.data_ptr<int32_t>();
  for (int64_t i = 0, n = s.numel(); i < n; ++i) {
    const int64_t v = p[i];
    TORCH_CHECK((v >= 0 && v < num_slots) || (allow_skip && v == -1), "fastadapt::", op, ": ",
                name, "[", i, "] = ", v, " is out of range: slots must lie in [0, ", num_slots,
                ")", allow_skip ? " or be -1 (skip)" : "");
  }
}

// CSR page table of R rows: indptr [R + 1] non-decreasing within [0, nnz], every used page in
// [0, num_pages), lens[r] in [0, pages_of_row * page_size]. Returns whether some page is used
// by more than one row position (the score accumulation then runs serially).
inline bool validate_page_table(const char* op, const char* indptr_name, const char* indices_name,
                                const char* lens_name, const at::Tensor& indptr,
                                const at::Tensor& indices, const at::Tensor& lens, int64_t R,
                                int64_t num_pages, int64_t page_size) {
  const at::Tensor ip = indptr.to(at::kCPU).contiguous();
  const at::Tensor ix = indices.to(at::kCPU).contiguous();
  const at::Tensor ln = lens.to(at::kCPU).contiguous();
  const int32_t* pp = ip.data_ptr<int32_t>();
  const int32_t* px = ix.data_ptr<int32_t>();
  const int32_t* pl = ln.data_ptr<int32_t>();
  const int64_t nnz = ix.numel();
  std::vector<uint8_t> seen(static_cast<size_t>(num_pages), 0);
  bool shared = false;
  for (int64_t r = 0; r <= R; ++r) {
    TORCH_CHECK(pp[r] >= 0 && pp[r] <= nnz, "fastadapt::", op, ": ", indptr_name, "[", r, "] = ",
                pp[r], " is outside [0, ", nnz, "] (", indices_name, " has ", nnz, " entries)");
    if (r > 0)
      TORCH_CHECK(pp[r] >= pp[r - 1], "fastadapt::", op, ": ", indptr_name,
                  " must be non-decreasing, but [", r - 1, "] = ", pp[r - 1], " > [", r, "] = ",
                  pp[r]);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t np = pp[r + 1] - pp[r];
    const int64_t n = pl[r];
    TORCH_CHECK(n >= 0 && n <= np * page_size, "fastadapt::", op, ": ", lens_name, "[", r,
                "] = ", n, " does not fit the row's ", np, " page(s) of ", page_size, " tokens");
    const int64_t used = (n + page_size - 1) / page_size;
    for (int64_t i = pp[r]; i < pp[r] + np; ++i) {
      const int64_t pg = px[i];
      TORCH_CHECK(pg >= 0 && pg < num_pages, "fastadapt::", op, ": ", indices_name, "[", i,
                  "] = ", pg, " (row ", r, ") is outside [0, ", num_pages, ")");
      if (i < pp[r] + used) {
        shared |= seen[pg] != 0;
        seen[pg] = 1;
      }
    }
  }
  return shared;
}

struct KvAppendShape {
  int64_t N, H, D;
};

inline KvAppendShape check_kv_append_args(const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& k_pages, const at::Tensor& v_pages,
                                          const at::Tensor& slot_mapping) {
  const char* op = "kv_append";
  check_page_pool(op, "k_pages", k_pages);
  check_page_pool(op, "v_pages", v_pages);
  TORCH_CHECK(k_pages.sizes() == v_pages.sizes(), "fastadapt::kv_append: v_pages must have "
              "k_pages' shape ", k_pages.sizes(), ", got ", v_pages.sizes());
  const int64_t D = k_pages.size(2);
  TORCH_CHECK(k.dim() == 3 && k.size(2) == D, "fastadapt::kv_append: k must be [N, H_kv, ", D,
              "], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fastadapt::kv_append: v must have k's shape ", k.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK(paged_is_float_kind(k.scalar_type()), "fastadapt::kv_append: k must be float32, "
              "bfloat16 or float16, got ", k.scalar_type());
  TORCH_CHECK(paged_is_float_kind(v.scalar_type()), "fastadapt::kv_append: v must be float32, "
              "bfloat16 or float16, got ", v.scalar_type());
  TORCH_CHECK(k.stride(2) == 1 || D == 1, "fastadapt::kv_append: k's last dimension must be "
              "contiguous, got strides ", k.strides());
  TORCH_CHECK(v.stride(2) == 1 || D == 1, "fastadapt::kv_append: v's last dimension must be "
              "contiguous, got strides ", v.strides());
  const auto dev = k_pages.device();
  TORCH_CHECK(v_pages.device() == dev && k.device() == dev && v.device() == dev,
              "fastadapt::kv_append: k, v, k_pages and v_pages must be on one device, got ",
              k.device(), ", ", v.device(), ", ", dev, ", ", v_pages.device());
  check_index_tensor(op, "slot_mapping", slot_mapping, dev);
  TORCH_CHECK(slot_mapping.dim() == 2 && slot_mapping.size(0) == k.size(0) &&
                  slot_mapping.size(1) == k.size(1),
              "fastadapt::kv_append: slot_mapping must be [N, H_kv] = [", k.size(0), ", ",
              k.size(1), "], got shape ", slot_mapping.sizes());
  if (paged_validate_contents(dev))
    validate_slots(op, "slot_mapping", slot_mapping, k_pages.size(0) * k_pages.size(1), true);
  return {k.size(0), k.size(1), D};
}

inline void check_kv_compact_args(const at::Tensor& k_pages, const at::Tensor& v_pages,
                                  const std::optional<at::Tensor>& scores,
                                  const at::Tensor& src_slots, const at::Tensor& dst_slots) {
  const char* op = "kv_compact";
  check_page_pool(op, "k_pages", k_pages);
  check_page_pool(op, "v_pages", v_pages);
  TORCH_CHECK(k_pages.sizes() == v_pages.sizes(), "fastadapt::kv_compact: v_pages must have "
              "k_pages' shape ", k_pages.sizes(), ", got ", v_pages.sizes());
  const auto dev = k_pages.device();
  TORCH_CHECK(v_pages.device() == dev, "fastadapt::kv_compact: v_pages must be on ", dev);
  const int64_t P = k_pages.size(0), S = k_pages.size(1);
  if (scores.has_value()) {
    const auto& s = *scores;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == P && s.size(1) == S,
                "fastadapt::kv_compact: scores must be float32 [num_pages, page_size] = [", P,
                ", ", S, "], got ", s.scalar_type(), " of shape ", s.sizes());
    TORCH_CHECK(s.is_contiguous() && s.device() == dev,
                "fastadapt::kv_compact: scores must be contiguous and on ", dev);
  }
  check_index_tensor(op, "src_slots", src_slots, dev);
  check_index_tensor(op, "dst_slots", dst_slots, dev);
  TORCH_CHECK(src_slots.dim() == 1, "fastadapt::kv_compact: src_slots must be 1-D [M], got shape ",
              src_slots.sizes());
  TORCH_CHECK(dst_slots.dim() == 1, "fastadapt::kv_compact: dst_slots must be 1-D [M], got shape ",
              dst_slots.sizes());
  TORCH_CHECK(src_slots.numel() == dst_slots.numel(), "fastadapt::kv_compact: src_slots and "
              "dst_slots must have equal lengths, got ", src_slots.numel(), " and ",
              dst_slots.numel());
  if (paged_validate_contents(dev)) {
    validate_slots(op, "src_slots", src_slots, P * S, false);
    validate_slots(op, "dst_slots", dst_slots, P * S, false);
    at::Tensor d = dst_slots.to(at::kCPU).contiguous().clone();
    int32_t* p = d.data_ptr<int32_t>();
    std::sort(p, p + d.numel());
    for (int64_t i = 1; i < d.numel(); ++i)
      TORCH_CHECK(p[i] != p[i - 1], "fastadapt::kv_compact: dst_slots must be distinct, slot ",
                  p[i], " appears more than once");
  }
}

}  // namespace fastadapt
