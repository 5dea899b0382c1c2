// Portable build of the paged KV data-movement kernels (see paged_kv_impl.h).
#include "cpu/kernels/paged_kv_impl.h"

namespace fastadapt::cpu {
void kv_append_rows_generic(const KvAppendArgs& a, int64_t n0, int64_t n1) {
  kv_append_rows_impl(a, n0, n1);
}
void kv_gather_rows_generic(const char* pool, int64_t row_bytes, const int32_t* slots, int64_t i0,
                         int64_t i1, char* tmp) {
  kv_gather_rows_impl(pool, row_bytes, slots, i0, i1, tmp);
}
void kv_scatter_rows_generic(char* pool, int64_t row_bytes, const int32_t* slots, int64_t i0,
                          int64_t i1, const char* tmp) {
  kv_scatter_rows_impl(pool, row_bytes, slots, i0, i1, tmp);
}
}  // namespace fastadapt::cpu
