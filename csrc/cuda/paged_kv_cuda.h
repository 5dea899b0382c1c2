// Torch-free launchers of the CUDA paged KV data-movement kernels (kv_append, kv_compact).
// Rows are moved as raw elements of 2 or 4 bytes; dtype conversion happens in the glue (.to).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

struct KvAppendCudaParams {
  const void* k = nullptr;       // [N, H, D] element (n, h, d) at k + (n * k_sn + h * k_sh + d) * esize
  const void* v = nullptr;       // [N, H, D]
  int64_t k_sn = 0, k_sh = 0;    // element strides of k (last dim contiguous)
  int64_t v_sn = 0, v_sh = 0;    // element strides of v
  const int32_t* slots = nullptr;  // [N, H] contiguous; -1 skips
  int64_t N = 0, H = 0, D = 0;
  void* k_pages = nullptr;       // [num_slots, D]
  void* v_pages = nullptr;       // [num_slots, D]
  int32_t k_esize = 4, v_esize = 4;  // bytes per element of each pool (2 or 4)
};
cudaError_t launch_kv_append(const KvAppendCudaParams& p, cudaStream_t stream);

// tmp[i] = pool[slots[i]] (gather) or pool[slots[i]] = tmp[i] (scatter), i < M, rows of
// `width` elements of `esize` (2 or 4) bytes.
cudaError_t launch_kv_rows_gather(const void* pool, const int32_t* slots, int64_t M, int64_t width,
                                  int32_t esize, void* tmp, cudaStream_t stream);
cudaError_t launch_kv_rows_scatter(void* pool, const int32_t* slots, int64_t M, int64_t width,
                                   int32_t esize, const void* tmp, cudaStream_t stream);

}  // namespace fastadapt
