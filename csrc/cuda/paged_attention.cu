// CUDA paged attention (decode with T_q causal queries, shared prefix) and merge of attention
// states. No torch headers.
//
// Split-K: one CTA per (page-table row, chunk of up to kMQ queries, split z). Split z takes the
// row's key tiles z, z + Z, z + 2Z, ... (so every split of every row gets an equal share whatever
// the row's length, and the grid is sized without reading kv_lens on the host), keeps an online
// softmax state per query in shared memory, and writes one partial (acc, max, sum) per query.
// A merge kernel combines the Z partials of each query into out and lse. With score_acc, a third
// kernel recomputes each tile's logits, turns them into probabilities with the final lse and adds
// each key's mass (summed over the CTA's queries) to its slot with atomicAdd.
// Per tile of kTile keys: K and V rows are widened to fp32 in shared memory once and used by
// all of the CTA's queries; logits are (query, key) dot products over shared memory; each warp
// runs the softmax update of some queries with shuffles; threads over (query, d) accumulate P.V.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/elem_convert.cuh"
#include "cuda/paged_attention_cuda.h"

namespace fastadapt {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;    // keys per tile (one per lane in the softmax step)
constexpr int kMQ = 16;      // queries per CTA
constexpr int kMaxSplits = 64;


__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Plan {
  int64_t rows, qpr, qchunks, Z;
};

Plan make_plan(const PagedAttnCudaParams& p) {
  Plan pl;
  const int64_t G = p.Hkv > 0 ? p.Hq / p.Hkv : 0;
  pl.rows = p.prefix ? p.Hkv : p.B * p.Hkv;
  pl.qpr = p.prefix ? p.B * p.Tq * G : p.Tq * G;  // queries per row
  pl.qchunks = (pl.qpr + kMQ - 1) / kMQ;
  const int64_t base = std::max<int64_t>(1, pl.rows * pl.qchunks);
  int64_t Z = (4 * static_cast<int64_t>(p.num_sms) + base - 1) / base;
  Z = std::min<int64_t>(Z, std::max<int64_t>(1, (p.avg_row_capacity + kTile - 1) / kTile));
  pl.Z = std::max<int64_t>(1, std::min<int64_t>(Z, kMaxSplits));
  return pl;
}

// Query m of a row: its flat index in [B * T_q * H_q] and its last visible key.
__device__ __forceinline__ void query_of(const PagedAttnCudaParams& p, int64_t row, int64_t m,
                                         int64_t n, int64_t* flat, int64_t* lim) {
  const int64_t G = p.Hq / p.Hkv;
  if (p.prefix) {  // row = KV head; m = (b * T_q + t) * G + g
    *flat = (m / G) * p.Hq + row * G + m % G;
    *lim = n - 1;
  } else {  // row = b * H_kv + h; m = t * G + g
    const int64_t b = row / p.Hkv, h = row % p.Hkv, t = m / G;
    *flat = (b * p.Tq + t) * p.Hq + h * G + m % G;
    *lim = n - p.Tq + t;  // causal among the T_q new tokens
  }
}

// Widens kVec contiguous elements (16 bytes) to fp32.
template <typename T> struct Vec16 {
  static constexpr int n = 16 / sizeof(T);
};
template <typename T>
__device__ __forceinline__ void widen16(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::n; ++i) out[i] = to_f(e[i]);
}

// Rows kb .. kb + kTile - 1 of a row's keys into k_s [kTile, D + 1] (and v_s [kTile, D] when V
// is given) as fp32; keys at or beyond kend are zero. With `vec`, 16-byte loads (D a multiple
// of the vector width and 16-byte aligned rows); otherwise one element per thread and step.
template <typename TKV>
__device__ __forceinline__ void load_tile(const TKV* __restrict__ K, const TKV* __restrict__ V,
                                          const int32_t* __restrict__ pages, int S, int D,
                                          int kb, int kend, bool vec, float* k_s, float* v_s) {
  const int Dk = D + 1;
  if (vec) {
    constexpr int W = Vec16<TKV>::n;
    const int per_row = D / W;
    for (int i = threadIdx.x; i < kTile * per_row; i += kThreads) {
      const int j = i / per_row, d = (i % per_row) * W, key = kb + j;
      float kf[W], vf[W];
      if (key < kend) {
        const int64_t off = (static_cast<int64_t>(pages[key / S]) * S + key % S) * D + d;
        widen16<TKV>(*reinterpret_cast<const uint4*>(K + off), kf);
        if (V != nullptr) widen16<TKV>(*reinterpret_cast<const uint4*>(V + off), vf);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) kf[e] = vf[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < W; ++e) k_s[j * Dk + d + e] = kf[e];
      if (V != nullptr) {
#pragma unroll
        for (int e = 0; e < W; ++e) v_s[j * D + d + e] = vf[e];
      }
    }
    return;
  }
  for (int i = threadIdx.x; i < kTile * D; i += kThreads) {
    const int j = i / D, d = i % D, key = kb + j;
    float kv = 0.f, vv = 0.f;
    if (key < kend) {
      const int64_t off = (static_cast<int64_t>(pages[key / S]) * S + key % S) * D + d;
      kv = to_f(K[off]);
      if (V != nullptr) vv = to_f(V[off]);
    }
    k_s[j * Dk + d] = kv;
    if (V != nullptr) v_s[j * D + d] = vv;
  }
}

__host__ __device__ constexpr int64_t smem_floats_main(int64_t D) {
  return 2 * kMQ * D + kTile * (D + 1) + kTile * D + kMQ * kTile + 3 * kMQ;
}
__host__ __device__ constexpr int64_t smem_floats_scores(int64_t D) {
  return kMQ * D + kTile * (D + 1) + kMQ * kTile + kMQ;
}

template <typename TQ, typename TKV>
__global__ void __launch_bounds__(kThreads)
paged_attn_split_kernel(const PagedAttnCudaParams p, int64_t qpr, int64_t qchunks, int64_t Z) {
  extern __shared__ float smem[];
  __shared__ int64_t lim_s[kMQ];
  const int D = static_cast<int>(p.D), Dk = D + 1, S = static_cast<int>(p.page_size);
  const bool vec = p.vec_loads;
  float* q_s = smem;                 // [kMQ, D] scaled queries
  float* acc_s = q_s + kMQ * D;      // [kMQ, D]
  float* k_s = acc_s + kMQ * D;      // [kTile, D + 1] (padded: no bank conflicts in the dots)
  float* v_s = k_s + kTile * Dk;     // [kTile, D]
  float* p_s = v_s + kTile * D;      // [kMQ, kTile] logits, then probabilities
  float* m_s = p_s + kMQ * kTile;    // [kMQ] running max
  float* l_s = m_s + kMQ;            // [kMQ] running sum
  float* a_s = l_s + kMQ;            // [kMQ] this tile's rescale factor
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x / qchunks, qc = blockIdx.x % qchunks, z = blockIdx.y;
  const int64_t n = p.lens[row];
  const int32_t* pages = p.indices + p.indptr[row];
  const int64_t m0 = qc * kMQ;
  const int mq = static_cast<int>(min(static_cast<int64_t>(kMQ), qpr - m0));
  const TQ* q = static_cast<const TQ*>(p.q);
  const TKV* K = static_cast<const TKV*>(p.k_pages);
  const TKV* V = static_cast<const TKV*>(p.v_pages);

  for (int i = tid; i < mq * D; i += kThreads) {
    const int mi = i / D, d = i % D;
    int64_t flat, lim;
    query_of(p, row, m0 + mi, n, &flat, &lim);
    q_s[i] = to_f(q[flat * D + d]) * p.scale;
    acc_s[i] = 0.f;
  }
  if (tid < kMQ) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
    int64_t flat, lim = -1;
    if (tid < mq) query_of(p, row, m0 + tid, n, &flat, &lim);
    lim_s[tid] = lim;
  }
  __syncthreads();
  int64_t kend = 0;  // keys nobody in this CTA sees are never read
  for (int i = 0; i < mq; ++i) kend = max(kend, lim_s[i] + 1);
  kend = min(kend, n);
  const int64_t ntiles = (kend + kTile - 1) / kTile;

  for (int64_t t = z; t < ntiles; t += Z) {
    const int64_t kb = t * kTile;
    load_tile<TKV>(K, V, pages, S, D, static_cast<int>(kb), static_cast<int>(kend), vec, k_s, v_s);
    __syncthreads();
    for (int i = tid; i < kMQ * kTile; i += kThreads) {
      const int mi = i / kTile, j = i % kTile;
      float s = -INFINITY;
      if (mi < mq && kb + j <= lim_s[mi] && kb + j < kend) {
        const float* qr = q_s + mi * D;
        const float* kr = k_s + j * Dk;
        float a = 0.f;
        for (int d = 0; d < D; ++d) a = fmaf(qr[d], kr[d], a);
        s = a;
      }
      p_s[i] = s;
    }
    __syncthreads();
    for (int mi = warp; mi < mq; mi += kWarps) {
      const float s = p_s[mi * kTile + lane];
      const float mold = m_s[mi];
      const float mnew = fmaxf(mold, warp_max(s));
      const float pr = mnew == -INFINITY ? 0.f : expf(s - mnew);
      const float alpha = mnew == -INFINITY ? 1.f : expf(mold - mnew);
      const float ps = warp_sum(pr);
      p_s[mi * kTile + lane] = pr;
      __syncwarp();
      if (lane == 0) {
        l_s[mi] = l_s[mi] * alpha + ps;
        m_s[mi] = mnew;
        a_s[mi] = alpha;
      }
    }
    __syncthreads();
    for (int i = tid; i < mq * D; i += kThreads) {
      const int mi = i / D, d = i % D;
      const float* pr = p_s + mi * kTile;
      float a = acc_s[i] * a_s[mi];
#pragma unroll 8
      for (int j = 0; j < kTile; ++j) a = fmaf(pr[j], v_s[j * D + d], a);
      acc_s[i] = a;
    }
    __syncthreads();
  }
  // partial state of (row, qc, z): [kMQ][D + 2] = acc, max, sum
  float* ws = p.workspace + ((row * qchunks + qc) * Z + z) * kMQ * (D + 2);
  for (int i = tid; i < mq * D; i += kThreads) ws[(i / D) * (D + 2) + i % D] = acc_s[i];
  if (tid < mq) {
    ws[tid * (D + 2) + D] = m_s[tid];
    ws[tid * (D + 2) + D + 1] = l_s[tid];
  }
}

template <typename TQ>
__global__ void __launch_bounds__(kThreads)
paged_attn_merge_kernel(const PagedAttnCudaParams p, int64_t qpr, int64_t qchunks, int64_t Z) {
  const int64_t D = p.D;
  const int64_t row = blockIdx.x / qpr, m = blockIdx.x % qpr;
  const int64_t qc = m / kMQ, mi = m % kMQ;
  int64_t flat, lim;
  query_of(p, row, m, p.lens[row], &flat, &lim);
  const int64_t stride = kMQ * (D + 2);
  const float* base = p.workspace + (row * qchunks + qc) * Z * stride + mi * (D + 2);
  TQ* out = static_cast<TQ*>(p.out) + flat * D;
  float mstar = -INFINITY;
  for (int64_t z = 0; z < Z; ++z) mstar = fmaxf(mstar, base[z * stride + D]);
  if (mstar == -INFINITY) {  // the query sees no key
    for (int64_t d = threadIdx.x; d < D; d += kThreads) out[d] = from_f<TQ>(0.f);
    if (threadIdx.x == 0) p.lse[flat] = -INFINITY;
    return;
  }
  __shared__ float w_s[kMaxSplits];
  for (int64_t z = threadIdx.x; z < Z; z += kThreads) {
    const float mz = base[z * stride + D];
    w_s[z] = mz == -INFINITY ? 0.f : expf(mz - mstar);
  }
  __syncthreads();
  float L = 0.f;
  for (int64_t z = 0; z < Z; ++z) L += w_s[z] * base[z * stride + D + 1];
  const float inv = 1.f / L;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float o = 0.f;
    for (int64_t z = 0; z < Z; ++z) o += w_s[z] * base[z * stride + d];
    out[d] = from_f<TQ>(o * inv);
  }
  if (threadIdx.x == 0) p.lse[flat] = mstar + logf(L);
}

template <typename TQ, typename TKV>
__global__ void __launch_bounds__(kThreads)
paged_attn_scores_kernel(const PagedAttnCudaParams p, int64_t qpr, int64_t qchunks, int64_t Z) {
  extern __shared__ float smem[];
  __shared__ int64_t lim_s[kMQ];
  const int D = static_cast<int>(p.D), Dk = D + 1, S = static_cast<int>(p.page_size);
  const bool vec = p.vec_loads;
  float* q_s = smem;                 // [kMQ, D]
  float* k_s = q_s + kMQ * D;        // [kTile, D + 1]
  float* p_s = k_s + kTile * Dk;     // [kMQ, kTile]
  float* lse_s = p_s + kMQ * kTile;  // [kMQ]
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x / qchunks, qc = blockIdx.x % qchunks, z = blockIdx.y;
  const int64_t n = p.lens[row];
  const int32_t* pages = p.indices + p.indptr[row];
  const int64_t m0 = qc * kMQ;
  const int mq = static_cast<int>(min(static_cast<int64_t>(kMQ), qpr - m0));
  const TQ* q = static_cast<const TQ*>(p.q);
  const TKV* K = static_cast<const TKV*>(p.k_pages);
  for (int i = tid; i < mq * D; i += kThreads) {
    int64_t flat, lim;
    query_of(p, row, m0 + i / D, n, &flat, &lim);
    q_s[i] = to_f(q[flat * D + i % D]) * p.scale;
  }
  if (tid < kMQ) {
    int64_t flat = 0, lim = -1;
    float l = -INFINITY;
    if (tid < mq) {
      query_of(p, row, m0 + tid, n, &flat, &lim);
      l = p.lse[flat];
      if (l == -INFINITY) lim = -1;
    }
    lim_s[tid] = lim;
    lse_s[tid] = l;
  }
  __syncthreads();
  int64_t kend = 0;
  for (int i = 0; i < mq; ++i) kend = max(kend, lim_s[i] + 1);
  kend = min(kend, n);
  const int64_t ntiles = (kend + kTile - 1) / kTile;
  for (int64_t t = z; t < ntiles; t += Z) {
    const int64_t kb = t * kTile;
    load_tile<TKV>(K, nullptr, pages, S, D, static_cast<int>(kb), static_cast<int>(kend), vec,
                   k_s, nullptr);
    __syncthreads();
    for (int i = tid; i < kMQ * kTile; i += kThreads) {
      const int mi = i / kTile, j = i % kTile;
      float pr = 0.f;
      if (mi < mq && kb + j <= lim_s[mi] && kb + j < kend) {
        const float* qr = q_s + mi * D;
        const float* kr = k_s + j * Dk;
        float a = 0.f;
        for (int d = 0; d < D; ++d) a = fmaf(qr[d], kr[d], a);
        pr = expf(a - lse_s[mi]);
      }
      p_s[i] = pr;
    }
    __syncthreads();
    if (tid < kTile && kb + tid < kend) {
      float c = 0.f;
      for (int mi = 0; mi < mq; ++mi) c += p_s[mi * kTile + tid];
      const int64_t key = kb + tid;
      if (c != 0.f) atomicAdd(p.score_acc + static_cast<int64_t>(pages[key / S]) * S + key % S, c);
    }
    __syncthreads();
  }
}

template <typename TQ, typename TKV>
cudaError_t launch_typed(const PagedAttnCudaParams& p, const Plan& pl, cudaStream_t stream) {
  const int64_t grid_x = pl.rows * pl.qchunks;
  if (grid_x > 0x7FFFFFFF || pl.rows * pl.qpr > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(pl.Z));
  const size_t smem = static_cast<size_t>(smem_floats_main(p.D)) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(paged_attn_split_kernel<TQ, TKV>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  paged_attn_split_kernel<TQ, TKV><<<grid, kThreads, smem, stream>>>(p, pl.qpr, pl.qchunks, pl.Z);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  paged_attn_merge_kernel<TQ><<<static_cast<unsigned>(pl.rows * pl.qpr), kThreads, 0, stream>>>(
      p, pl.qpr, pl.qchunks, pl.Z);
  e = cudaGetLastError();
  if (e != cudaSuccess || p.score_acc == nullptr) return e;
  const size_t smem_s = static_cast<size_t>(smem_floats_scores(p.D)) * sizeof(float);
  if (smem_s > 48 * 1024) {
    e = cudaFuncSetAttribute(paged_attn_scores_kernel<TQ, TKV>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_s));
    if (e != cudaSuccess) return e;
  }
  paged_attn_scores_kernel<TQ, TKV><<<grid, kThreads, smem_s, stream>>>(p, pl.qpr, pl.qchunks, pl.Z);
  return cudaGetLastError();
}

template <typename TQ>
cudaError_t launch_kv(const PagedAttnCudaParams& p, const Plan& pl, cudaStream_t stream) {
  switch (p.kv_dtype) {
    case AttnDType::F32: return launch_typed<TQ, float>(p, pl, stream);
    case AttnDType::F16: return launch_typed<TQ, __half>(p, pl, stream);
    case AttnDType::BF16: return launch_typed<TQ, __nv_bfloat16>(p, pl, stream);
  }
  return cudaErrorNotSupported;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
merge_states_kernel(const T* __restrict__ a, const float* __restrict__ la,
                    const T* __restrict__ b, const float* __restrict__ lb, T* __restrict__ out,
                    float* __restrict__ lse, int64_t D) {
  const int64_t r = blockIdx.x;
  const float xa = la[r], xb = lb[r];
  const float m = fmaxf(xa, xb);
  if (m == -INFINITY) {
    for (int64_t d = threadIdx.x; d < D; d += kThreads) out[r * D + d] = from_f<T>(0.f);
    if (threadIdx.x == 0) lse[r] = -INFINITY;
    return;
  }
  const float wa = xa == -INFINITY ? 0.f : expf(xa - m);
  const float wb = xb == -INFINITY ? 0.f : expf(xb - m);
  const float L = wa + wb, ia = wa / L, ib = wb / L;
  for (int64_t d = threadIdx.x; d < D; d += kThreads)
    out[r * D + d] = from_f<T>(ia * to_f(a[r * D + d]) + ib * to_f(b[r * D + d]));
  if (threadIdx.x == 0) lse[r] = m + logf(L);
}

template <typename T>
cudaError_t launch_merge_typed(const MergeStatesCudaParams& p, cudaStream_t stream) {
  merge_states_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
      static_cast<const T*>(p.out_a), p.lse_a, static_cast<const T*>(p.out_b), p.lse_b,
      static_cast<T*>(p.out), p.lse, p.D);
  return cudaGetLastError();
}

}  // namespace

int64_t paged_attention_workspace_floats(const PagedAttnCudaParams& p) {
  const Plan pl = make_plan(p);
  return pl.rows * pl.qchunks * pl.Z * kMQ * (p.D + 2);
}

cudaError_t launch_paged_attention(const PagedAttnCudaParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Tq == 0 || p.Hq == 0 || p.Hkv == 0) return cudaSuccess;
  const Plan pl = make_plan(p);
  switch (p.q_dtype) {
    case AttnDType::F32: return launch_kv<float>(p, pl, stream);
    case AttnDType::F16: return launch_kv<__half>(p, pl, stream);
    case AttnDType::BF16: return launch_kv<__nv_bfloat16>(p, pl, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t launch_merge_attention_states(const MergeStatesCudaParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7FFFFFFF) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case AttnDType::F32: return launch_merge_typed<float>(p, stream);
    case AttnDType::F16: return launch_merge_typed<__half>(p, stream);
    case AttnDType::BF16: return launch_merge_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace fastadapt
