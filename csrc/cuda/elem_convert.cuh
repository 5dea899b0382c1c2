// float <-> element conversions shared by the CUDA kernels (float, __half, __nv_bfloat16):
// widening is exact, narrowing rounds to nearest even, as torch's conversions do.
// Internal linkage (anonymous namespace): every .cu file gets its own copy, nothing is exported.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastadapt {
namespace {

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }

}  // namespace
}  // namespace fastadapt
