// Data-movement kernels of the paged KV cache (kv_append, kv_compact), included by one TU per
// ISA (paged_kv_generic.cpp, paged_kv_avx2.cpp). They are row copies (memcpy of D elements);
// the ISA builds differ only in how the compiler lowers memcpy. Internal linkage only.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/kernels/paged_kernels.h"

namespace fastadapt::cpu {
namespace {

inline void kv_append_rows_impl(const KvAppendArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < a.H; ++h) {
      const int32_t s = a.slots[n * a.H + h];
      if (s < 0) continue;  // -1: padded token, nothing written
      std::memcpy(a.k_pages + s * a.k_row_bytes, a.k + n * a.k_sn + h * a.k_sh,
                  static_cast<size_t>(a.k_row_bytes));
      std::memcpy(a.v_pages + s * a.v_row_bytes, a.v + n * a.v_sn + h * a.v_sh,
                  static_cast<size_t>(a.v_row_bytes));
    }
  }
}

inline void kv_gather_rows_impl(const char* pool, int64_t row_bytes, const int32_t* slots,
                                int64_t i0, int64_t i1, char* tmp) {
  for (int64_t i = i0; i < i1; ++i)
    std::memcpy(tmp + i * row_bytes, pool + static_cast<int64_t>(slots[i]) * row_bytes,
                static_cast<size_t>(row_bytes));
}

inline void kv_scatter_rows_impl(char* pool, int64_t row_bytes, const int32_t* slots, int64_t i0,
                                 int64_t i1, const char* tmp) {
  for (int64_t i = i0; i < i1; ++i)
    std::memcpy(pool + static_cast<int64_t>(slots[i]) * row_bytes, tmp + i * row_bytes,
                static_cast<size_t>(row_bytes));
}

}  // namespace
}  // namespace fastadapt::cpu
