// Torch-free launchers of the CUDA paged attention kernels (split-K decode / shared-prefix
// attention with a merge pass, optional per-key mass pass) and of merge_attention_states.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

enum class AttnDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

struct PagedAttnCudaParams {
  const void* q = nullptr;          // [B, T_q, H_q, D] q_dtype, contiguous
  AttnDType q_dtype = AttnDType::F32;
  const void* k_pages = nullptr;    // [num_pages, page_size, D] kv_dtype, contiguous
  const void* v_pages = nullptr;    // [num_pages, page_size, D] kv_dtype
  AttnDType kv_dtype = AttnDType::F32;
  const int32_t* indptr = nullptr;  // [rows + 1]
  const int32_t* indices = nullptr; // [nnz]
  const int32_t* lens = nullptr;    // [rows]
  int64_t B = 0, Tq = 0, Hq = 0, Hkv = 0, D = 0, page_size = 0;
  bool prefix = false;  // false: rows b * H_kv + h, causal T_q; true: rows h, all B*T_q*G queries
  int64_t avg_row_capacity = 0;  // nnz * page_size / rows: sizes the split-K (no device read)
  float scale = 1.f;
  void* out = nullptr;              // [B, T_q, H_q, D] q_dtype
  float* lse = nullptr;             // [B, T_q, H_q]
  float* score_acc = nullptr;       // [num_pages * page_size] or null (decode only)
  float* workspace = nullptr;       // paged_attention_workspace_floats(...) floats
  int num_sms = 132;
  bool vec_loads = false;  // pools 16-byte aligned and D * element size a multiple of 16
};

// Floats of workspace the launch needs (partial states of every (row, query chunk, split)).
int64_t paged_attention_workspace_floats(const PagedAttnCudaParams& p);
cudaError_t launch_paged_attention(const PagedAttnCudaParams& p, cudaStream_t stream);

struct MergeStatesCudaParams {
  const void* out_a = nullptr;  // [rows, D] dtype, contiguous
  const float* lse_a = nullptr; // [rows]
  const void* out_b = nullptr;  // [rows, D] dtype
  const float* lse_b = nullptr; // [rows]
  void* out = nullptr;          // [rows, D] dtype
  float* lse = nullptr;         // [rows]
  int64_t rows = 0, D = 0;
  AttnDType dtype = AttnDType::F32;
};
cudaError_t launch_merge_attention_states(const MergeStatesCudaParams& p, cudaStream_t stream);

}  // namespace fastadapt
