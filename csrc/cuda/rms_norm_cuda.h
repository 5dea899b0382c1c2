// Torch-free launcher of the CUDA RMSNorm kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

enum class NormDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

struct RmsNormCudaParams {
  const void* x = nullptr;  // [rows, D], dtype, contiguous
  void* residual = nullptr; // [rows, D], dtype, or null; updated in place: residual += x
  const float* w = nullptr; // [D] fp32
  void* y = nullptr;        // [rows, D], dtype
  int64_t rows = 0, D = 0;
  float eps = 1e-6f;
  NormDType dtype = NormDType::F32;
};

cudaError_t launch_rms_norm(const RmsNormCudaParams& p, cudaStream_t stream);

}  // namespace fastadapt
