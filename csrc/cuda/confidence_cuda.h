// Torch-free launchers of the CUDA confidence kernels (logit_confidence, hidden_cosine).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

enum class ConfDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

struct LogitConfidenceCudaParams {
  const void* logits = nullptr;  // [B, V], dtype, contiguous
  float* stats = nullptr;        // [B, 3] fp32: top-1 prob, top-1 - top-2 prob, entropy (nats)
  int64_t* argmax = nullptr;     // [B]
  int64_t B = 0, V = 0;
  float inv_temp = 1.f;
  ConfDType dtype = ConfDType::F32;
};

struct HiddenCosineCudaParams {
  const void* a = nullptr;  // [rows, H], dtype, contiguous
  const void* b = nullptr;  // [rows, H], dtype, contiguous
  float* out = nullptr;     // [rows] fp32
  int64_t rows = 0, H = 0;
  float eps = 1e-8f;
  ConfDType dtype = ConfDType::F32;
};

cudaError_t launch_logit_confidence(const LogitConfidenceCudaParams& p, cudaStream_t stream);
cudaError_t launch_hidden_cosine(const HiddenCosineCudaParams& p, cudaStream_t stream);

}  // namespace fastadapt
