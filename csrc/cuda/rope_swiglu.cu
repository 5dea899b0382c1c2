// CUDA RoPE (in place on strided q/k) and SwiGLU (silu(gate) * up): one thread per rotated pair /
// per output element, grid-stride loops, fp32 math. Elementwise and memory-bound: the work is a
// few loads and FMAs per element, so the plain layout is what counts. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/elem_convert.cuh"
#include "cuda/rope_swiglu_cuda.h"

namespace fastadapt {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;


template <typename T, typename P>
__global__ void rope_kernel(RopeCudaParams p) {
  const int64_t half = p.D / 2, H = p.Hq + p.Hk;
  const int64_t total = p.T * H * half;
  const P* positions = static_cast<const P*>(p.positions);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half, row = idx / half;
    const int64_t t = row / H, h = row - t * H;
    const int64_t pos = static_cast<int64_t>(positions[t]);
    if (pos < 0 || pos >= p.max_pos) continue;  // validated by the glue on request
    T* x = h < p.Hq ? static_cast<T*>(p.q) + t * p.q_stride_t + h * p.q_stride_h
                    : static_cast<T*>(p.k) + t * p.k_stride_t + (h - p.Hq) * p.k_stride_h;
    const float c = p.cos_sin[pos * p.cs_stride + i];
    const float s = p.cos_sin[pos * p.cs_stride + half + i];
    const int64_t ia = p.interleaved ? 2 * i : i;
    const int64_t ib = p.interleaved ? 2 * i + 1 : i + half;
    const float a = to_f(x[ia]), b = to_f(x[ib]);
    x[ia] = from_f<T>(a * c - b * s);
    x[ib] = from_f<T>(b * c + a * s);
  }
}

// silu(g) = (g >= 0 ? g : g e) / (1 + e), e = e^-|g| (as the CPU kernel: no overflow of e; -inf
// gives -inf * 0 = NaN like torch). expf is accurate to 2 ulp on the device.
template <typename T>
__global__ void silu_mul_kernel(SiluMulCudaParams p) {
  const int64_t total = p.rows * p.F;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / p.F, i = idx - r * p.F;
    const float g = to_f(x[r * p.x_stride + i]), u = to_f(x[r * p.x_stride + p.F + i]);
    const float e = expf(-fabsf(g));
    const float num = g < 0.f ? g * e : g;
    y[idx] = from_f<T>(num / (1.f + e) * u);
  }
}

unsigned blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

template <typename T>
cudaError_t launch_rope_typed(const RopeCudaParams& p, cudaStream_t stream) {
  const int64_t total = p.T * (p.Hq + p.Hk) * (p.D / 2);
  if (p.positions_i64)
    rope_kernel<T, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(p);
  else
    rope_kernel<T, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_silu_mul_typed(const SiluMulCudaParams& p, cudaStream_t stream) {
  silu_mul_kernel<T><<<blocks_for(p.rows * p.F), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rope(const RopeCudaParams& p, cudaStream_t stream) {
  if (p.T < 0 || p.Hq < 0 || p.Hk < 0 || p.D <= 0 || p.D % 2 || p.max_pos < 0)
    return cudaErrorInvalidValue;
  if (p.T * (p.Hq + p.Hk) == 0) return cudaSuccess;
  if (!p.q && p.Hq > 0) return cudaErrorInvalidValue;
  if (!p.k && p.Hk > 0) return cudaErrorInvalidValue;
  if (!p.positions || !p.cos_sin) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case EwDType::F32: return launch_rope_typed<float>(p, stream);
    case EwDType::F16: return launch_rope_typed<__half>(p, stream);
    case EwDType::BF16: return launch_rope_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t launch_silu_mul(const SiluMulCudaParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.F < 0 || (p.rows > 1 && p.x_stride < 2 * p.F)) return cudaErrorInvalidValue;
  if (p.rows * p.F == 0) return cudaSuccess;
  if (!p.x || !p.y) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case EwDType::F32: return launch_silu_mul_typed<float>(p, stream);
    case EwDType::F16: return launch_silu_mul_typed<__half>(p, stream);
    case EwDType::BF16: return launch_silu_mul_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace fastadapt
