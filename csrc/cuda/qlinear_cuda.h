// CUDA launcher of fastadapt::qlinear. Torch-free: raw pointers, sizes and a cudaStream_t, so the
// kernels compile (and can be unit-tested) without libtorch. Argument checks live in the torch
// glue (qlinear_cuda_glue.cpp); the launcher re-checks only what would make a kernel read or
// write out of bounds, and reports it as an error code.
//
//   y[m, n] = sum_k x[m, k] * dequant(W)[n, k] (+ bias[n]),  fp32 accumulation,
//   W packed as described in cpu/kernels/qformat.h and dequantized in registers only.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cpu/kernels/qformat.h"

namespace fastadapt {

// Element type of activations, output and bias.
enum class QLinearDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// Which kernel runs. AUTO picks GEMV for M <= kQLinearGemvMaxM and the tensor-core GEMM above.
// GEMM needs 16-bit activations; with fp32 activations GEMV runs whatever is asked.
enum class QLinearPath : int32_t { AUTO = 0, GEMV = 1, GEMM = 2 };
constexpr int64_t kQLinearGemvMaxM = 8;

struct QLinearCudaParams {
  const void* x = nullptr;          // [M, K] act_dtype, row stride x_row_stride; 16-byte aligned
  const uint8_t* qdata = nullptr;   // [N, row_bytes(fmt, K)] contiguous; 16-byte aligned
  const void* scales = nullptr;     // [N, K / group_size] scale_type; int formats only
  const uint8_t* zeros = nullptr;   // [N, K / group_size]; nullptr = symmetric (zero 2^(bits-1))
  const void* bias = nullptr;       // [N] bias_dtype, or nullptr
  void* out = nullptr;              // [M, N] act_dtype, row stride out_row_stride
  int64_t M = 0;                    // rows of x (all leading dims flattened)
  int64_t N = 0;                    // out_features
  int64_t K = 0;                    // in_features: multiple of 32 (of 256 for Q4_K / Q6_K)
  int64_t x_row_stride = 0;         // elements between rows of x: >= K, multiple of 8
  int64_t out_row_stride = 0;       // elements between rows of out: >= N
  int64_t group_size = 0;           // int formats: multiple of 32 dividing K; ignored for GGUF
  QFormat fmt = QFormat::INT4;
  ScaleType scale_type = ScaleType::F32;
  QLinearDType act_dtype = QLinearDType::F16;  // dtype of x and out
  QLinearDType bias_dtype = QLinearDType::F16;
  QLinearPath path = QLinearPath::AUTO;
};

// Enqueues the kernel on `stream`. Returns cudaSuccess, cudaErrorInvalidValue for sizes,
// pointers or alignment the kernels cannot handle, cudaErrorNotSupported for an unknown format
// or dtype code, or the launch error. Never synchronises.
cudaError_t launch_qlinear(const QLinearCudaParams& p, cudaStream_t stream);

}  // namespace fastadapt
