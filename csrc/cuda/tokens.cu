// CUDA kernels of the token merging and pruning family. No torch headers (tokens_cuda.h).
//   matching : one warp per A token, a running max/argmax of the cosine over the B tokens
//              (B rows stream through L1/L2 shared by the block's warps; nothing N x N stored)
//   plan     : one block per batch item: rank of each edge (O(Na^2) compares, parallel), then a
//              block-wide scan numbers the kept rows in token order
//   merge    : fp32 atomics into an accumulator, then a finalize pass (divide, convert)
//   gather   : rows by index (unmerge, prune)
//   prune    : one block per item: rank by (protected, score, position), then a scan compacts
//   attention: flash style, one warp per query row, 8 rows per block sharing K/V tiles of 32
//              keys in shared memory, online softmax in fp32
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/elem_convert.cuh"
#include "cuda/tokens_cuda.h"

namespace fastadapt {
namespace {


__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Exclusive scan of one int per thread across the block (blockDim.x a multiple of 32, <= 1024).
// Returns the thread's prefix; *total gets the block sum. smem: 33 ints.
__device__ int block_exclusive_scan(int v, int* smem, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) smem[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? smem[lane] : 0;
    int wi = w;
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += t;
    }
    if (lane < nwarps) smem[lane] = wi - w;  // exclusive warp offsets
    if (lane == 31) smem[32] = wi;
  }
  __syncthreads();
  const int res = smem[warp] + incl - v;
  *total = smem[32];
  __syncthreads();  // smem reusable by the caller's next scan
  return res;
}

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// ---- matching ----------------------------------------------------------------------------------
template <typename T>
__global__ void inv_norm_kernel(const T* __restrict__ x, float* __restrict__ inv, int64_t rows, int64_t C) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * C;
  float ss = 0.f;
  for (int64_t c = threadIdx.x & 31; c < C; c += 32) {
    const float v = to_f(xr[c]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) inv[row] = 1.f / fmaxf(sqrtf(ss), 1e-12f);
}

template <typename T>
__global__ void match_kernel(const T* __restrict__ metric, const float* __restrict__ inv,
                             const uint8_t* __restrict__ prot, float* __restrict__ best,
                             int32_t* __restrict__ best_idx, int64_t N, int64_t C) {
  const int64_t Na = (N + 1) / 2;
  const int64_t b = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= Na) return;
  const T* mb = metric + b * N * C;
  const float* ib = inv + b * N;
  const uint8_t* pb = prot ? prot + b * N : nullptr;
  const T* a = mb + 2 * i * C;
  const float ia = ib[2 * i];
  float bv = -INFINITY;
  int32_t bj = -1;
  for (int64_t j = 1; j < N; j += 2) {
    if (pb && pb[j]) continue;
    const T* br = mb + j * C;
    float s = 0.f;
    for (int64_t c = lane; c < C; c += 32) s += to_f(a[c]) * to_f(br[c]);
    s = warp_sum(s) * ia * ib[j];
    if (s > bv) {  // every lane holds the same s: the warp agrees; first maximum wins ties
      bv = s;
      bj = static_cast<int32_t>(j);
    }
  }
  if (lane == 0) {
    best[b * Na + i] = bv;
    best_idx[b * Na + i] = bj;
  }
}

// One block per batch item. dest doubles as scratch: first -1 (kept) or -2 - target (merged).
__global__ void plan_kernel(const float* __restrict__ best, const int32_t* __restrict__ best_idx,
                            const uint8_t* __restrict__ prot, int32_t* __restrict__ dest, int64_t N, int64_t r) {
  __shared__ int scan_smem[33];
  const int64_t Na = (N + 1) / 2;
  const int64_t b = blockIdx.x;
  const float* sb = best + b * Na;
  const int32_t* ib = best_idx + b * Na;
  const uint8_t* pb = prot ? prot + b * N : nullptr;
  int32_t* db = dest + b * N;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) db[n] = -1;
  __syncthreads();
  for (int64_t i = threadIdx.x; r > 0 && i < Na; i += blockDim.x) {
    const bool cand = !(pb && pb[2 * i]) && ib[i] >= 0;
    if (!cand) continue;
    const float si = sb[i];
    int64_t rank = 0;
    for (int64_t k = 0; k < Na && rank < r; ++k) {
      if (k == i || (pb && pb[2 * k]) || ib[k] < 0) continue;
      const float sk = sb[k];
      rank += (sk > si || (sk == si && k < i)) ? 1 : 0;
    }
    if (rank < r) db[2 * i] = -2 - ib[i];
  }
  __syncthreads();
  int carry = 0;
  for (int64_t base = 0; base < N; base += blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const int keep = (n < N && db[n] == -1) ? 1 : 0;
    int total;
    const int pos = block_exclusive_scan(keep, scan_smem, &total);
    if (keep) db[n] = carry + pos;
    carry += total;
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int32_t v = db[n];
    if (v <= -2) db[n] = db[-2 - v];  // targets are odd positions, never merged: final already
  }
}

// ---- merge ---------------------------------------------------------------------------------------
template <typename T>
__global__ void merge_accum_kernel(const T* __restrict__ x, const float* __restrict__ sizes,
                                   const int32_t* __restrict__ dest, float* __restrict__ acc,
                                   float* __restrict__ out_sizes, int64_t N, int64_t M, int64_t C) {
  const int64_t b = blockIdx.y, n = blockIdx.x;
  const int32_t m = dest[b * N + n];
  if (m < 0 || m >= M) return;
  const float s = sizes ? sizes[b * N + n] : 1.f;
  const T* xr = x + (b * N + n) * C;
  float* ar = acc + (b * M + m) * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) atomicAdd(ar + c, s * to_f(xr[c]));
  if (threadIdx.x == 0) atomicAdd(out_sizes + b * M + m, s);
}

template <typename T>
__global__ void merge_finalize_kernel(const float* __restrict__ acc, const float* __restrict__ out_sizes,
                                      T* __restrict__ out, int64_t M, int64_t C) {
  const int64_t row = static_cast<int64_t>(blockIdx.y) * M + blockIdx.x;
  const float tot = out_sizes[row];
  const float inv = tot != 0.f ? 1.f / tot : 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) out[row * C + c] = from_f<T>(acc[row * C + c] * inv);
}

// ---- gather ---------------------------------------------------------------------------------------
template <typename W>
__global__ void gather_rows_kernel(const W* __restrict__ x, const int32_t* __restrict__ idx,
                                   const W* __restrict__ fill, W* __restrict__ out, int64_t N, int64_t M,
                                   int64_t C) {
  const int64_t b = blockIdx.y, n = blockIdx.x;
  const int32_t m = idx[b * N + n];
  W* o = out + (b * N + n) * C;
  if (m >= 0 && m < M) {
    const W* xr = x + (b * M + m) * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = xr[c];
  } else if (fill) {
    const W* fr = fill + (b * N + n) * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = fr[c];
  } else {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = W(0);
  }
}

// ---- prune selection ----------------------------------------------------------------------------
__device__ __forceinline__ bool prune_better(float sa, bool pa, int64_t a, float sc, bool pc, int64_t c) {
  if (pa != pc) return pa;
  const bool na = isnan(sa), nc = isnan(sc);
  if (na != nc) return nc;
  if (!na && sa != sc) return sa > sc;
  return a < c;
}

__global__ void prune_select_kernel(const float* __restrict__ scores, const uint8_t* __restrict__ prot,
                                    int32_t* __restrict__ kept, int64_t N, int64_t keep) {
  __shared__ int scan_smem[33];
  const int64_t b = blockIdx.x;
  const float* sb = scores + b * N;
  const uint8_t* pb = prot ? prot + b * N : nullptr;
  int carry = 0;
  for (int64_t base = 0; base < N; base += blockDim.x) {
    const int64_t n = base + threadIdx.x;
    int sel = 0;
    if (n < N) {
      const float sn = sb[n];
      const bool pn = pb && pb[n];
      int64_t rank = 0;
      for (int64_t k = 0; k < N && rank < keep; ++k)
        if (k != n) rank += prune_better(sb[k], pb && pb[k], k, sn, pn, n) ? 1 : 0;
      sel = rank < keep ? 1 : 0;
    }
    int total;
    const int pos = block_exclusive_scan(sel, scan_smem, &total);
    if (sel) kept[b * keep + carry + pos] = static_cast<int32_t>(n);
    carry += total;
  }
}

// ---- proportional attention ---------------------------------------------------------------------
constexpr int kKeyTile = 32;

template <typename T>
__global__ void prop_attn_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 const float* __restrict__ sizes, T* __restrict__ out, int64_t H, int64_t Nq,
                                 int64_t Nk, int D, float scale) {
  extern __shared__ float smem[];
  const int ldk = D + 1;                       // padded K rows: lanes read different rows
  float* ks = smem;                            // [kKeyTile][D + 1]
  float* vs = ks + kKeyTile * ldk;             // [kKeyTile][D]
  float* qs = vs + kKeyTile * D;               // [kWarps][D]
  const int64_t bh = blockIdx.y, b = bh / H;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = row < Nq;
  const T* qb = q + bh * Nq * D;
  const T* kb = k + bh * Nk * D;
  const T* vb = v + bh * Nk * D;
  const float* szb = sizes ? sizes + b * Nk : nullptr;
  float* qw = qs + warp * D;
  for (int d = lane; d < D; d += 32) qw[d] = active ? to_f(qb[row * D + d]) * scale : 0.f;
  constexpr int kMaxPer = 256 / 32;
  float acc[kMaxPer];
#pragma unroll
  for (int t = 0; t < kMaxPer; ++t) acc[t] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int64_t j0 = 0; j0 < Nk; j0 += kKeyTile) {
    const int nb = Nk - j0 < kKeyTile ? static_cast<int>(Nk - j0) : kKeyTile;
    __syncthreads();  // previous tile consumed (and qs written, first time)
    for (int e = threadIdx.x; e < kKeyTile * D; e += blockDim.x) {
      const int jj = e / D, d = e % D;
      const bool in = jj < nb;
      ks[jj * ldk + d] = in ? to_f(kb[(j0 + jj) * D + d]) : 0.f;
      vs[jj * D + d] = in ? to_f(vb[(j0 + jj) * D + d]) : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    // lane jj scores key j0 + jj
    float s = -INFINITY;
    if (lane < nb) {
      const float* kr = ks + lane * ldk;
      float a = 0.f;
      for (int d = 0; d < D; ++d) a += qw[d] * kr[d];
      const float bias = szb ? logf(szb[j0 + lane]) : 0.f;  // log 0 = -inf: masked
      s = a + bias;
    }
    const float m_new = fmaxf(m, warp_max(s));
    if (m_new == -INFINITY) continue;  // all keys so far masked
    const float corr = m == -INFINITY ? 0.f : expf(m - m_new);
    const float p = s == -INFINITY ? 0.f : expf(s - m_new);
    l = l * corr + warp_sum(p);
    m = m_new;
#pragma unroll
    for (int t = 0; t < kMaxPer; ++t) acc[t] *= corr;
    for (int jj = 0; jj < nb; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
      const float* vr = vs + jj * D;
#pragma unroll
      for (int t = 0; t < kMaxPer; ++t) {
        const int d = lane + 32 * t;
        if (d < D) acc[t] += pj * vr[d];
      }
    }
  }
  if (!active) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* o = out + (bh * Nq + row) * D;
#pragma unroll
  for (int t = 0; t < kMaxPer; ++t) {
    const int d = lane + 32 * t;
    if (d < D) o[d] = from_f<T>(acc[t] * inv);
  }
}

template <typename F>
cudaError_t dispatch(TokDType dt, F&& f) {
  switch (dt) {
    case TokDType::F32: return f(float{});
    case TokDType::F16: return f(__half{});
    case TokDType::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorNotSupported;
}

bool grid_ok(int64_t x, int64_t y) { return x <= 0x7FFFFFFF && y <= 65535; }

}  // namespace

cudaError_t launch_bipartite_soft_matching(const TokensMatchParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  const int64_t Na = (p.N + 1) / 2;
  if (!grid_ok((Na + kWarps - 1) / kWarps, p.B) || p.B > 0x7FFFFFFF) return cudaErrorInvalidValue;
  if (p.r > 0) {
    const cudaError_t e = dispatch(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      const int64_t rows = p.B * p.N;
      inv_norm_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
          static_cast<const T*>(p.metric), p.inv, rows, p.C);
      const dim3 grid(static_cast<unsigned>((Na + kWarps - 1) / kWarps), static_cast<unsigned>(p.B));
      match_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(p.metric), p.inv, p.prot, p.best,
                                                      p.best_idx, p.N, p.C);
      return cudaGetLastError();
    });
    if (e != cudaSuccess) return e;
  }
  plan_kernel<<<static_cast<unsigned>(p.B), 1024, 0, stream>>>(p.best, p.best_idx, p.prot, p.dest, p.N,
                                                                 p.r);
  return cudaGetLastError();
}

cudaError_t launch_merge_tokens(const TokensMergeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.M == 0) return cudaSuccess;
  if (!grid_ok(p.N, p.B) || !grid_ok(p.M, p.B)) return cudaErrorInvalidValue;
  cudaError_t e = cudaMemsetAsync(p.acc, 0, sizeof(float) * p.B * p.M * p.C, stream);
  if (e != cudaSuccess) return e;
  e = cudaMemsetAsync(p.out_sizes, 0, sizeof(float) * p.B * p.M, stream);
  if (e != cudaSuccess) return e;
  const int threads = p.C >= 256 ? 256 : 128;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.N > 0) {
      merge_accum_kernel<T><<<dim3(static_cast<unsigned>(p.N), static_cast<unsigned>(p.B)), threads, 0, stream>>>(
          static_cast<const T*>(p.x), p.sizes, p.dest, p.acc, p.out_sizes, p.N, p.M, p.C);
    }
    merge_finalize_kernel<T><<<dim3(static_cast<unsigned>(p.M), static_cast<unsigned>(p.B)), threads, 0, stream>>>(
        p.acc, p.out_sizes, static_cast<T*>(p.out), p.M, p.C);
    return cudaGetLastError();
  });
}

cudaError_t launch_gather_rows(const void* x, const int32_t* idx, const void* fill, void* out, int64_t B,
                               int64_t N, int64_t M, int64_t C, int64_t elem_size, cudaStream_t stream) {
  if (B == 0 || N == 0 || C == 0) return cudaSuccess;
  if (!grid_ok(N, B)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(B));
  const int threads = C >= 256 ? 256 : 128;
  if (elem_size == 4) {
    gather_rows_kernel<uint32_t><<<grid, threads, 0, stream>>>(
        static_cast<const uint32_t*>(x), idx, static_cast<const uint32_t*>(fill), static_cast<uint32_t*>(out), N, M, C);
  } else if (elem_size == 2) {
    gather_rows_kernel<uint16_t><<<grid, threads, 0, stream>>>(
        static_cast<const uint16_t*>(x), idx, static_cast<const uint16_t*>(fill), static_cast<uint16_t*>(out), N, M, C);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_prune_select(const float* scores, const uint8_t* prot, int32_t* kept, int64_t B, int64_t N,
                                int64_t keep, cudaStream_t stream) {
  if (B == 0 || keep == 0) return cudaSuccess;
  if (B > 0x7FFFFFFF) return cudaErrorInvalidValue;
  prune_select_kernel<<<static_cast<unsigned>(B), 1024, 0, stream>>>(scores, prot, kept, N, keep);
  return cudaGetLastError();
}

cudaError_t launch_proportional_attention(const PropAttnParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.Nq == 0 || p.D == 0) return cudaSuccess;
  if (p.D > 256) return cudaErrorInvalidValue;
  const int64_t bh = p.B * p.H;
  const int64_t tiles = (p.Nq + kWarps - 1) / kWarps;
  if (!grid_ok(tiles, bh)) return cudaErrorInvalidValue;
  const int D = static_cast<int>(p.D);
  const size_t smem = sizeof(float) * (static_cast<size_t>(kKeyTile) * (D + 1) + kKeyTile * D + kWarps * D);
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(prop_attn_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    prop_attn_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(bh)), kThreads, smem, stream>>>(
        static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v), p.sizes,
        static_cast<T*>(p.out), p.H, p.Nq, p.Nk, D, p.scale);
    return cudaGetLastError();
  });
}

}  // namespace fastadapt
