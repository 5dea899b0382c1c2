// Torch-free launchers of the CUDA block-sparse prefill attention and pattern estimators
// (semantics: python/fastadapt_ops/ops/block_sparse.py).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

enum class BsCudaDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// One BSR row: query block r of q head h of sequence b (host-built, uploaded by the glue).
struct BsCudaRow {
  int32_t b, h, r, row;
};

struct BsCudaParams {
  const void* q = nullptr;  // [Nq, Hq, D] dtype, contiguous
  const void* k = nullptr;  // [Nk, Hkv, D] dtype, contiguous
  const void* v = nullptr;  // [Nk, Hkv, D] dtype, contiguous
  void* out = nullptr;      // [Nq, Hq, D] dtype
  float* lse = nullptr;     // [Nq, Hq] fp32
  BsCudaDType dtype = BsCudaDType::F32;
  int64_t Hq = 0, Hkv = 0, D = 0;  // D in {64, 128}
  float scale = 1.f;
  const int32_t* q_indptr = nullptr;     // [B + 1]
  const int32_t* k_indptr = nullptr;     // [B + 1]
  const int32_t* row_ptr = nullptr;      // [rows + 1]
  const int32_t* col_idx = nullptr;      // [nnz]
  const int32_t* col_indptr = nullptr;   // [B * Hq + 1] or null
  const int32_t* cols = nullptr;
  const int32_t* diag_indptr = nullptr;  // [B * Hq + 1] or null
  const int32_t* diags = nullptr;
  const BsCudaRow* rows = nullptr;       // [nrows]
  int64_t nrows = 0;
  int64_t max_nkb = 1;                   // largest key-block count of a sequence
};

// True when the CUDA kernel has a build for head dim D.
bool block_sparse_cuda_supports_d(int64_t D);
cudaError_t launch_block_sparse_attention(const BsCudaParams& p, cudaStream_t stream);

// Vertical-slash scores of one sequence; vert and slash [Hq, Tk] fp32 must be zeroed by the
// caller; lse_buf: [Hq, 64] fp32 scratch.
struct VsCudaParams {
  const void* q = nullptr;  // [T, Hq, D]
  const void* k = nullptr;  // [Tk, Hkv, D]
  BsCudaDType dtype = BsCudaDType::F32;
  int64_t T = 0, Tk = 0, Hq = 0, Hkv = 0, D = 0, n_last = 64;
  float scale = 1.f;
  float* vert = nullptr;
  float* slash = nullptr;
  float* lse_buf = nullptr;
};
cudaError_t launch_vertical_slash_scores(const VsCudaParams& p, cudaStream_t stream);

// Block-pooled scores [Hq, nqb, nkb] fp32; scratch: (Hq * nqb + Hkv * nkb) * D floats.
struct BpCudaParams {
  const void* q = nullptr;
  const void* k = nullptr;
  BsCudaDType dtype = BsCudaDType::F32;
  int64_t T = 0, Tk = 0, Hq = 0, Hkv = 0, D = 0;
  float scale = 1.f;
  float* scores = nullptr;
  float* scratch = nullptr;
};
cudaError_t launch_block_pool_scores(const BpCudaParams& p, cudaStream_t stream);

}  // namespace fastadapt
