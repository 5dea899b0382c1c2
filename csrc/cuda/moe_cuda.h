// Torch-free launchers of the CUDA mixture-of-experts kernels (routing, grouping, row gather,
// weighted combine). The grouped matmul itself runs launch_qlinear (qlinear_cuda.h) once per
// non-empty expert segment (see moe_cuda_glue.cpp).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

enum class MoeDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

struct MoeRouteCudaParams {
  const float* logits = nullptr;  // [T, E_all] fp32 contiguous (real experts first)
  int64_t T = 0, E_all = 0, E = 0, k = 0;  // k <= 64, E_all <= 4096
  bool renorm = true;
  int32_t* topk_ids = nullptr;  // [T, k]
  float* topk_w = nullptr;      // [T, k]
  int32_t* topk_rows = nullptr; // [T, k]
  int32_t* token_ids = nullptr; // [T * k]
  float* row_w = nullptr;       // [T * k]
  int32_t* offsets = nullptr;   // [E + 1]
};
// Top-k per token (one warp per token), then a one-block stable counting sort into groups.
cudaError_t launch_moe_route(const MoeRouteCudaParams& p, cudaStream_t stream);

struct MoeGatherCudaParams {
  const void* x = nullptr;        // [T, K] dtype, contiguous
  const int32_t* token_ids = nullptr;  // [rows], valid (built by moe_route)
  void* out = nullptr;            // [rows, K] dtype, contiguous
  int64_t rows = 0, K = 0;
  int32_t elem_bytes = 4;         // 2 or 4
};
cudaError_t launch_moe_gather(const MoeGatherCudaParams& p, cudaStream_t stream);

struct MoeCombineCudaParams {
  const void* y = nullptr;         // [P, N] dtype, contiguous
  const float* row_w = nullptr;    // [P]
  const int32_t* rows = nullptr;   // [T, k], -1 skips, else < P (caller guarantees)
  void* out = nullptr;             // [T, N] dtype
  int64_t T = 0, k = 0, N = 0;
  MoeDType dtype = MoeDType::F32;
};
cudaError_t launch_moe_combine(const MoeCombineCudaParams& p, cudaStream_t stream);

}  // namespace fastadapt
