// CUDA lut_linear: (1) per-group int8 quantization of x, (2) per block of 4 warps (4 row blocks of
// 32 rows, one lane per row), the 8-entry half tables of a K tile built in shared memory (T[15-p] =
// -T[p] restores the other half) and looked up per (chunk, bit plane); integer accumulation per
// group, scale per group, plane weight 2^i. Same integers as the CPU kernels (lut_format.h).
// No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cpu/kernels/lut_format.h"
#include "cuda/elem_convert.cuh"
#include "cuda/lut_linear_cuda.h"

namespace fastadapt {
namespace {

constexpr int kQuantThreads = 128;
constexpr int kWarps = 4;                 // row blocks per CUDA block
constexpr int kTileChunks = 512;          // chunks of 4 values per shared-memory tile (2048 values)

// grid (M, groups): a = max|x_g| / 127, xq = rint(x / a) clamped to +-127, sum(xq).
template <typename T>
__global__ void lut_quant_kernel(const T* __restrict__ x, int64_t K, int64_t gs, int64_t G,
                                 int8_t* __restrict__ xq, float* __restrict__ half_scale,
                                 int32_t* __restrict__ xq_sum) {
  const int64_t m = blockIdx.x, g = blockIdx.y;
  const T* xg = x + m * K + g * gs;
  __shared__ float red[kQuantThreads / 32];
  __shared__ int32_t reds[kQuantThreads / 32];
  float mx = 0.f;
  for (int64_t k = threadIdx.x; k < gs; k += kQuantThreads) mx = fmaxf(mx, fabsf(to_f(xg[k])));
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
  __syncthreads();
  float amax = 0.f;
  for (int i = 0; i < kQuantThreads / 32; ++i) amax = fmaxf(amax, red[i]);
  const float a = __fdiv_rn(amax, 127.f);
  int32_t s = 0;
  for (int64_t k = threadIdx.x; k < gs; k += kQuantThreads) {
    int32_t q = 0;
    if (a > 0.f) q = static_cast<int32_t>(fminf(127.f, fmaxf(-127.f, rintf(__fdiv_rn(to_f(xg[k]), a)))));
    xq[m * K + g * gs + k] = static_cast<int8_t>(q);
    s += q;
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) reds[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t t = 0;
    for (int i = 0; i < kQuantThreads / 32; ++i) t += reds[i];
    half_scale[m * G + g] = 0.5f * a;
    xq_sum[m * G + g] = t;
  }
}

__device__ __forceinline__ int32_t half_lookup(const int16_t* t8, int idx) {
  return idx < 8 ? static_cast<int32_t>(t8[idx]) : -static_cast<int32_t>(t8[15 - idx]);
}

// grid (ceil(NB / kWarps), M), block kWarps * 32: warp w takes row block blockIdx.x * kWarps + w,
// lane j the row 32 rb + lut_row_of_byte(j) (the byte it reads of every 32-byte plane unit).
template <typename T>
__global__ void lut_gemv_kernel(LutCudaParams p) {
  __shared__ int16_t tab[kTileChunks * 8];  // half tables: entries p < 8 of each chunk
  const int64_t m = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t NB = (p.N + 31) / 32;
  const int64_t rb = blockIdx.x * kWarps + warp;
  const bool active = rb < NB;
  const int64_t K = p.K, gs = p.group_size, G = p.groups, B = p.bits;
  const int row = lut_row_of_byte(lane);
  const int8_t* xq = p.xq + m * K;
  const uint8_t* wp = p.planes + (active ? rb : 0) * (K / 8) * B * 32;
  float acc = 0.f;
  int32_t P = 0;
  for (int64_t t0 = 0; t0 < K / 4; t0 += kTileChunks) {
    const int64_t t1 = min(t0 + kTileChunks, K / 4);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < (t1 - t0) * 8; e += blockDim.x) {
      const int64_t c = t0 + e / 8;
      const int pp = static_cast<int>(e % 8);
      const int8_t* q = xq + 4 * c;
      int32_t v = -q[3];
      for (int b = 0; b < 3; ++b) v += (pp >> b & 1) ? q[b] : -q[b];
      tab[e] = static_cast<int16_t>(v);
    }
    __syncthreads();
    if (!active) continue;
    for (int64_t cp = t0 / 2; cp < t1 / 2; ++cp) {
      const int16_t* tl = tab + (2 * cp - t0) * 8;
      const uint8_t* w = wp + cp * B * 32 + lane;
      int32_t A = 0;
      for (int64_t i = 0; i < B; ++i) {
        const int v = w[i * 32];
        A += (half_lookup(tl, v & 15) + half_lookup(tl + 8, v >> 4)) * (1 << i);  // plane weight 2^i
      }
      P += A;
      if (((cp + 1) * 8) % gs == 0) {  // end of group g: scale it in
        const int64_t g = (cp + 1) * 8 / gs - 1;
        const int32_t z = p.zoffs ? p.zoffs[(rb * G + g) * 32 + row] : p.zoff;
        const int32_t I = P + z * p.xq_sum[m * G + g];
        acc = fmaf(p.scales[(rb * G + g) * 32 + row] * p.half_scale[m * G + g], static_cast<float>(I), acc);
        P = 0;
      }
    }
  }
  const int64_t n = rb * 32 + row;
  if (active && n < p.N) {
    if (p.bias) acc += to_f(static_cast<const T*>(p.bias)[n]);
    static_cast<T*>(p.y)[m * p.N + n] = from_f<T>(acc);
  }
}

template <typename T>
cudaError_t launch_typed(const LutCudaParams& p, cudaStream_t stream) {
  lut_quant_kernel<T><<<dim3(static_cast<unsigned>(p.M), static_cast<unsigned>(p.groups)), kQuantThreads, 0,
                        stream>>>(static_cast<const T*>(p.x), p.K, p.group_size, p.groups, p.xq, p.half_scale,
                                  p.xq_sum);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t NB = (p.N + 31) / 32;
  const dim3 grid(static_cast<unsigned>((NB + kWarps - 1) / kWarps), static_cast<unsigned>(p.M));
  lut_gemv_kernel<T><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lut_linear(const LutCudaParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.M > 65535 || p.groups > 65535) return cudaErrorInvalidConfiguration;
  switch (p.dtype) {
    case LutDType::F16: return launch_typed<__half>(p, stream);
    case LutDType::BF16: return launch_typed<__nv_bfloat16>(p, stream);
    default: return launch_typed<float>(p, stream);
  }
}

}  // namespace fastadapt
