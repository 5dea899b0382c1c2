// CUDA kernels of the mixture-of-experts ops (no torch headers; launchers in moe_cuda.h).
//
// * route: one warp per token. Softmax max and sum by warp reductions over the experts (lane,
//   lane + 32, ...), then k rounds of a warp arg-max over the experts not yet taken (ties: lower
//   index, as the CPU kernel and the reference), lane 0 writing the choice; renormalisation over
//   the real choices (AdaMoE) by lane 0.
// * group: one block. Per-expert counts by shared-memory atomics, an exclusive scan by thread 0,
//   then expert e's rows are filled by the thread(s) owning e walking the choices in token order,
//   so the grouping is stable and deterministic (O(E * T * k / threads); fine for the E and T of
//   decoding and small prefill batches; a segmented multi-block sort would be the next step).
// * gather: grouped rows of x; combine: one thread per (token, column), fp32 sums over the
//   token's k rows in a fixed order.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "cuda/elem_convert.cuh"
#include "cuda/moe_cuda.h"

namespace fastadapt {
namespace {

constexpr int kWarp = 32;
constexpr int kRouteWarps = 4;  // tokens per block
constexpr int kGroupThreads = 1024;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(kRouteWarps * kWarp) moe_topk_kernel(MoeRouteCudaParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + threadIdx.x / kWarp;
  if (t >= p.T) return;  // whole warps leave together
  const float* l = p.logits + t * p.E_all;
  int32_t* ids = p.topk_ids + t * p.k;
  float* w = p.topk_w + t * p.k;
  float mx = -FLT_MAX;
  for (int64_t e = lane; e < p.E_all; e += kWarp) mx = fmaxf(mx, l[e]);
  mx = warp_max(mx);
  float s = 0.f;
  for (int64_t e = lane; e < p.E_all; e += kWarp) s += __expf(l[e] - mx);
  s = warp_sum(s);
  float real_sum = 0.f;
  for (int64_t j = 0; j < p.k; ++j) {
    float bv = -INFINITY;
    int32_t bi = INT32_MAX;  // none yet; a lane's experts ascend, so ties keep the lower index
    for (int64_t e = lane; e < p.E_all; e += kWarp) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= ids[i] == e;
      if (!taken && (bi == INT32_MAX || l[e] > bv)) {
        bv = l[e];
        bi = static_cast<int32_t>(e);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) {
      ids[j] = bi;
      w[j] = __expf(bv - mx) / s;
    }
    __syncwarp();  // every lane sees ids[j] in the next round
    if (bi < p.E) real_sum += __expf(bv - mx) / s;
  }
  if (lane == 0 && p.renorm) {
    const float inv = real_sum > 0.f ? 1.f / real_sum : 0.f;
    for (int64_t j = 0; j < p.k; ++j) w[j] = ids[j] < p.E ? w[j] * inv : 0.f;
  }
}

__global__ void __launch_bounds__(kGroupThreads) moe_group_kernel(MoeRouteCudaParams p) {
  extern __shared__ int32_t cursor[];  // [E + 1]
  const int64_t n = p.T * p.k;
  for (int64_t e = threadIdx.x; e <= p.E; e += blockDim.x) cursor[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int32_t e = p.topk_ids[i];
    if (e < p.E) atomicAdd(&cursor[e + 1], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int64_t e = 0; e < p.E; ++e) cursor[e + 1] += cursor[e];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e <= p.E; e += blockDim.x) p.offsets[e] = cursor[e];
  const int32_t total = cursor[p.E];
  for (int64_t i = total + threadIdx.x; i < n; i += blockDim.x) {
    p.token_ids[i] = -1;
    p.row_w[i] = 0.f;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    if (p.topk_ids[i] >= p.E) p.topk_rows[i] = -1;
  // stable fill: the owner of expert e walks the choices in (token, j) order
  for (int64_t e = threadIdx.x; e < p.E; e += blockDim.x) {
    int32_t r = cursor[e];
    for (int64_t i = 0; i < n; ++i) {
      if (p.topk_ids[i] == e) {
        p.token_ids[r] = static_cast<int32_t>(i / p.k);
        p.row_w[r] = p.topk_w[i];
        p.topk_rows[i] = r;
        ++r;
      }
    }
  }
}

template <typename E>
__global__ void moe_gather_kernel(const E* __restrict__ x, const int32_t* __restrict__ ids,
                                  E* __restrict__ out, int64_t rows, int64_t K) {
  const int64_t r = blockIdx.y;
  const int64_t src = ids[r];
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < K;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[r * K + c] = x[src * K + c];
}

template <typename T>
__global__ void moe_combine_kernel(const T* __restrict__ y, const float* __restrict__ w,
                                   const int32_t* __restrict__ rows, T* __restrict__ out, int64_t k,
                                   int64_t N) {
  const int64_t t = blockIdx.y;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float acc = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t r = rows[t * k + j];
    if (r >= 0) acc += w[r] * to_f(y[static_cast<int64_t>(r) * N + n]);
  }
  out[t * N + n] = from_f<T>(acc);
}

}  // namespace

cudaError_t launch_moe_route(const MoeRouteCudaParams& p, cudaStream_t stream) {
  if (p.T < 0 || p.k < 1 || p.k > 64 || p.E < 1 || p.E > p.E_all || p.E_all > 4096 || p.k > p.E_all)
    return cudaErrorInvalidValue;
  if (p.T == 0) {
    return cudaMemsetAsync(p.offsets, 0, sizeof(int32_t) * (p.E + 1), stream);
  }
  const unsigned blocks = static_cast<unsigned>((p.T + kRouteWarps - 1) / kRouteWarps);
  moe_topk_kernel<<<blocks, kRouteWarps * kWarp, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  moe_group_kernel<<<1, kGroupThreads, sizeof(int32_t) * (p.E + 1), stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_moe_gather(const MoeGatherCudaParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.K == 0) return cudaSuccess;
  if (p.rows > 65535) return cudaErrorInvalidValue;  // grid.y
  const unsigned threads = 256;
  const dim3 grid(static_cast<unsigned>((p.K + threads - 1) / threads), static_cast<unsigned>(p.rows));
  if (p.elem_bytes == 4)
    moe_gather_kernel<uint32_t><<<grid, threads, 0, stream>>>(
        static_cast<const uint32_t*>(p.x), p.token_ids, static_cast<uint32_t*>(p.out), p.rows, p.K);
  else if (p.elem_bytes == 2)
    moe_gather_kernel<uint16_t><<<grid, threads, 0, stream>>>(
        static_cast<const uint16_t*>(p.x), p.token_ids, static_cast<uint16_t*>(p.out), p.rows, p.K);
  else
    return cudaErrorNotSupported;
  return cudaGetLastError();
}

cudaError_t launch_moe_combine(const MoeCombineCudaParams& p, cudaStream_t stream) {
  if (p.T == 0 || p.N == 0) return cudaSuccess;
  if (p.T > 65535) return cudaErrorInvalidValue;  // grid.y
  const unsigned threads = 128;
  const dim3 grid(static_cast<unsigned>((p.N + threads - 1) / threads), static_cast<unsigned>(p.T));
  switch (p.dtype) {
    case MoeDType::F32:
      moe_combine_kernel<float><<<grid, threads, 0, stream>>>(
          static_cast<const float*>(p.y), p.row_w, p.rows, static_cast<float*>(p.out), p.k, p.N);
      break;
    case MoeDType::F16:
      moe_combine_kernel<__half><<<grid, threads, 0, stream>>>(
          static_cast<const __half*>(p.y), p.row_w, p.rows, static_cast<__half*>(p.out), p.k, p.N);
      break;
    case MoeDType::BF16:
      moe_combine_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(p.y), p.row_w, p.rows, static_cast<__nv_bfloat16*>(p.out),
          p.k, p.N);
      break;
    default:
      return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

}  // namespace fastadapt
