// Torch-free launcher of the CUDA lut_linear kernels (layout: cpu/kernels/lut_format.h).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

enum class LutDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

struct LutCudaParams {
  const void* x = nullptr;         // [M, K] dtype, contiguous
  int64_t M = 0, K = 0, N = 0, bits = 0, group_size = 0, groups = 0;
  const uint8_t* planes = nullptr; // [NB, K/8, bits, 32]
  const float* scales = nullptr;   // [NB, groups, 32]
  const int8_t* zoffs = nullptr;   // [NB, groups, 32] or null
  int32_t zoff = -1;
  const void* bias = nullptr;      // [N] dtype or null
  // workspace (caller-allocated): int8 activations and per-group terms
  int8_t* xq = nullptr;            // [M, K]
  float* half_scale = nullptr;     // [M, groups]
  int32_t* xq_sum = nullptr;       // [M, groups]
  void* y = nullptr;               // [M, N] dtype
  LutDType dtype = LutDType::F32;
};

cudaError_t launch_lut_linear(const LutCudaParams& p, cudaStream_t stream);

}  // namespace fastadapt
