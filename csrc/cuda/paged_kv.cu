// CUDA paged KV data movement: one block per token row (kv_append) or per moved slot
// (kv_compact's gather and scatter), threads over the row's elements. No torch headers.
#include <cstdint>

#include "cuda/paged_kv_cuda.h"

namespace fastadapt {
namespace {

constexpr int kThreads = 128;

template <typename E>
__global__ void kv_append_kernel(const E* __restrict__ k, const E* __restrict__ v, int64_t k_sn,
                                 int64_t k_sh, int64_t v_sn, int64_t v_sh,
                                 const int32_t* __restrict__ slots, int64_t H, int64_t D,
                                 E* __restrict__ k_pages, E* __restrict__ v_pages) {
  const int64_t row = blockIdx.x;  // n * H + h
  const int32_t s = slots[row];
  if (s < 0) return;
  const int64_t n = row / H, h = row % H;
  const E* kr = k + n * k_sn + h * k_sh;
  const E* vr = v + n * v_sn + h * v_sh;
  E* kd = k_pages + static_cast<int64_t>(s) * D;
  E* vd = v_pages + static_cast<int64_t>(s) * D;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    kd[d] = kr[d];
    vd[d] = vr[d];
  }
}

// The two pools may differ in element size: the K and V halves then go through two launches.
template <typename E>
__global__ void kv_append_one_kernel(const E* __restrict__ x, int64_t sn, int64_t sh,
                                     const int32_t* __restrict__ slots, int64_t H, int64_t D,
                                     E* __restrict__ pages) {
  const int64_t row = blockIdx.x;
  const int32_t s = slots[row];
  if (s < 0) return;
  const E* xr = x + (row / H) * sn + (row % H) * sh;
  E* dst = pages + static_cast<int64_t>(s) * D;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) dst[d] = xr[d];
}

template <typename E>
__global__ void gather_kernel(const E* __restrict__ pool, const int32_t* __restrict__ slots,
                              int64_t width, E* __restrict__ tmp) {
  const int64_t i = blockIdx.x;
  const E* src = pool + static_cast<int64_t>(slots[i]) * width;
  for (int64_t d = threadIdx.x; d < width; d += kThreads) tmp[i * width + d] = src[d];
}

template <typename E>
__global__ void scatter_kernel(E* __restrict__ pool, const int32_t* __restrict__ slots,
                               int64_t width, const E* __restrict__ tmp) {
  const int64_t i = blockIdx.x;
  E* dst = pool + static_cast<int64_t>(slots[i]) * width;
  for (int64_t d = threadIdx.x; d < width; d += kThreads) dst[d] = tmp[i * width + d];
}

}  // namespace

cudaError_t launch_kv_append(const KvAppendCudaParams& p, cudaStream_t stream) {
  const int64_t rows = p.N * p.H;
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(rows);
  if (p.k_esize == p.v_esize) {
    if (p.k_esize == 4)
      kv_append_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const uint32_t*>(p.k), static_cast<const uint32_t*>(p.v), p.k_sn, p.k_sh,
          p.v_sn, p.v_sh, p.slots, p.H, p.D, static_cast<uint32_t*>(p.k_pages),
          static_cast<uint32_t*>(p.v_pages));
    else
      kv_append_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const uint16_t*>(p.k), static_cast<const uint16_t*>(p.v), p.k_sn, p.k_sh,
          p.v_sn, p.v_sh, p.slots, p.H, p.D, static_cast<uint16_t*>(p.k_pages),
          static_cast<uint16_t*>(p.v_pages));
    return cudaGetLastError();
  }
  auto one = [&](const void* x, int64_t sn, int64_t sh, void* pages, int32_t es) {
    if (es == 4)
      kv_append_one_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const uint32_t*>(x), sn, sh, p.slots, p.H, p.D, static_cast<uint32_t*>(pages));
    else
      kv_append_one_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const uint16_t*>(x), sn, sh, p.slots, p.H, p.D, static_cast<uint16_t*>(pages));
  };
  one(p.k, p.k_sn, p.k_sh, p.k_pages, p.k_esize);
  one(p.v, p.v_sn, p.v_sh, p.v_pages, p.v_esize);
  return cudaGetLastError();
}

cudaError_t launch_kv_rows_gather(const void* pool, const int32_t* slots, int64_t M, int64_t width,
                                  int32_t esize, void* tmp, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (M > 0x7FFFFFFF) return cudaErrorInvalidValue;
  if (esize == 4)
    gather_kernel<uint32_t><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
        static_cast<const uint32_t*>(pool), slots, width, static_cast<uint32_t*>(tmp));
  else
    gather_kernel<uint16_t><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(pool), slots, width, static_cast<uint16_t*>(tmp));
  return cudaGetLastError();
}

cudaError_t launch_kv_rows_scatter(void* pool, const int32_t* slots, int64_t M, int64_t width,
                                   int32_t esize, const void* tmp, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (M > 0x7FFFFFFF) return cudaErrorInvalidValue;
  if (esize == 4)
    scatter_kernel<uint32_t><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
        static_cast<uint32_t*>(pool), slots, width, static_cast<const uint32_t*>(tmp));
  else
    scatter_kernel<uint16_t><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
        static_cast<uint16_t*>(pool), slots, width, static_cast<const uint16_t*>(tmp));
  return cudaGetLastError();
}

}  // namespace fastadapt
