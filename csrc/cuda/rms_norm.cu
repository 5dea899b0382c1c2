// CUDA RMSNorm (optionally fused with the residual add): one block per row, fp32 math, the
// sum of squares reduced through warp shuffles and one shared-memory step. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/elem_convert.cuh"
#include "cuda/rms_norm_cuda.h"

namespace fastadapt {
namespace {

constexpr int kThreads = 256;


template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, T* __restrict__ residual,
                                const float* __restrict__ w, T* __restrict__ y, int64_t D,
                                float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * D;
  T* yr = y + row * D;
  T* rr = residual ? residual + row * D : nullptr;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += kThreads) {
    float v = to_f(xr[i]);
    if (rr) {
      v += to_f(rr[i]);
      rr[i] = from_f<T>(v);
      v = to_f(rr[i]);  // normalise what the residual stream now holds
    }
    ss += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float inv_rms;
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) t += warp_sums[i];
    inv_rms = rsqrtf(t / static_cast<float>(D) + eps);
  }
  __syncthreads();
  const T* src = rr ? rr : xr;
  for (int64_t i = threadIdx.x; i < D; i += kThreads)
    yr[i] = from_f<T>(to_f(src[i]) * inv_rms * w[i]);
}

template <typename T>
cudaError_t launch_typed(const RmsNormCudaParams& p, cudaStream_t stream) {
  if (p.rows > 0x7FFFFFFF) return cudaErrorInvalidValue;
  rms_norm_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<T*>(p.residual), p.w, static_cast<T*>(p.y), p.D,
      p.eps);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm(const RmsNormCudaParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  switch (p.dtype) {
    case NormDType::F32: return launch_typed<float>(p, stream);
    case NormDType::F16: return launch_typed<__half>(p, stream);
    case NormDType::BF16: return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace fastadapt
