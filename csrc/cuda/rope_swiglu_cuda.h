// Torch-free launchers of the CUDA RoPE and SwiGLU kernels (fastadapt::rope, fastadapt::silu_mul).
// Argument checks live in the torch glue (rope_swiglu_cuda_glue.cpp); the launchers re-check only
// what would make a kernel index out of bounds, and report it as an error code. Never synchronise.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

enum class EwDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

struct RopeCudaParams {
  void* q = nullptr;                // [T, Hq, D] dtype, element strides below, last dim contiguous
  int64_t q_stride_t = 0, q_stride_h = 0;
  void* k = nullptr;                // [T, Hk, D] dtype
  int64_t k_stride_t = 0, k_stride_h = 0;
  int64_t T = 0, Hq = 0, Hk = 0, D = 0;  // D even
  const void* positions = nullptr;  // [T] int32 or int64, contiguous
  bool positions_i64 = true;
  const float* cos_sin = nullptr;   // [max_pos, D] fp32: cos of the D/2 frequencies, then sin
  int64_t cs_stride = 0, max_pos = 0;
  bool interleaved = false;         // pairs (2i, 2i+1) instead of (i, i + D/2)
  EwDType dtype = EwDType::F32;
};

// Tokens whose position is outside [0, max_pos) are left untouched (no out-of-bounds read); the
// glue validates positions when FASTADAPT_CHECK_INDICES=1.
cudaError_t launch_rope(const RopeCudaParams& p, cudaStream_t stream);

struct SiluMulCudaParams {
  const void* x = nullptr;  // [rows, 2F] dtype, last dim contiguous: gate then up
  int64_t x_stride = 0;     // elements between rows of x
  void* y = nullptr;        // [rows, F] dtype, contiguous
  int64_t rows = 0, F = 0;
  EwDType dtype = EwDType::F32;
};

cudaError_t launch_silu_mul(const SiluMulCudaParams& p, cudaStream_t stream);

}  // namespace fastadapt
