// CUDA block-sparse prefill attention and pattern estimators. No torch headers.
//
// Attention: one CTA of 128 threads per BSR row (64 queries of one head), two threads per query,
// each holding half of the query (pre-scaled) and half of its fp32 output accumulator in
// registers; the pair's partial dot products meet through one shuffle. K/V tiles of 64 keys are
// widened to fp32 in shared memory (listed blocks read in place, vertical columns gathered); the
// online softmax runs per sub-tile of 16 keys. Diagonals (key = position - o) are read straight
// from global memory, one key per query. Union semantics as the CPU kernel: a column inside a
// listed block and a diagonal key inside a listed block or on a listed column are masked.
// CUDA-core FP32 math (no tensor cores yet): correct on sm_80/sm_90a, not tuned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/block_sparse_cuda.h"
#include "cuda/elem_convert.cuh"

namespace fastadapt {
namespace {

constexpr int kBlk = 64;       // layout block size (queries and keys)
constexpr int kThreads = 128;  // two per query
constexpr int kSub = 16;       // keys per online-softmax step

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ __forceinline__ bool in_sorted(const int32_t* a, int n, int key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo < n && a[lo] == key;
}

template <int DH>
struct QState {
  float q[DH];
  float o[DH];
  float mx, l;
};

// Online-softmax step for kSub logits s (-inf = masked) with V rows vrow(jj) (fp32, this half).
template <int DH, typename VRow>
__device__ __forceinline__ void softmax_step(QState<DH>& st, const float (&s)[kSub], int n, VRow vrow) {
  float tmax = neg_inf();
#pragma unroll
  for (int jj = 0; jj < kSub; ++jj)
    if (jj < n) tmax = fmaxf(tmax, s[jj]);
  const float mnew = fmaxf(st.mx, tmax);
  if (mnew == neg_inf()) return;  // nothing visible yet
  const float alpha = __expf(st.mx - mnew);  // mx = -inf gives 0
  st.l *= alpha;
#pragma unroll
  for (int d = 0; d < DH; ++d) st.o[d] *= alpha;
#pragma unroll
  for (int jj = 0; jj < kSub; ++jj) {
    if (jj >= n) break;
    const float pj = s[jj] == neg_inf() ? 0.f : __expf(s[jj] - mnew);
    if (pj == 0.f) continue;
    st.l += pj;
    const float* v = vrow(jj);
#pragma unroll
    for (int d = 0; d < DH; ++d) st.o[d] = fmaf(pj, v[d], st.o[d]);
  }
  st.mx = mnew;
}

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) bs_attn_kernel(BsCudaParams p) {
  constexpr int D = 2 * DH;
  extern __shared__ float smem[];
  float* Ks = smem;                                              // [64][D]
  float* Vs = Ks + kBlk * D;                                     // [64][D]
  int* kidx = reinterpret_cast<int*>(Vs + kBlk * D);            // [64]
  unsigned char* blk = reinterpret_cast<unsigned char*>(kidx + kBlk);  // [max_nkb]

  const BsCudaRow rw = p.rows[blockIdx.x];
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int64_t Hq = p.Hq, Hkv = p.Hkv;
  const int64_t q0 = p.q_indptr[rw.b], T_ = p.q_indptr[rw.b + 1] - q0;
  const int64_t k0 = p.k_indptr[rw.b], Tk = p.k_indptr[rw.b + 1] - k0;
  const int64_t off = Tk - T_, i0 = static_cast<int64_t>(rw.r) * kBlk;
  const int M = static_cast<int>(imin64(kBlk, T_ - i0));
  const int tid = threadIdx.x, m = tid >> 1, half = tid & 1;
  const bool active = m < M;
  const int64_t pos = off + i0 + m;
  const int64_t p_last = off + i0 + M - 1;
  const int64_t hk = rw.h / (Hq / Hkv);
  const int64_t ks = Hkv * D;
  const T* kh = k + (k0 * Hkv + hk) * D;
  const T* vh = v + (k0 * Hkv + hk) * D;

  QState<DH> st;
  {
    const T* qr = q + ((q0 + i0 + (active ? m : 0)) * Hq + rw.h) * D + half * DH;
#pragma unroll
    for (int d = 0; d < DH; ++d) {
      st.q[d] = active ? to_f(qr[d]) * p.scale : 0.f;
      st.o[d] = 0.f;
    }
    st.mx = neg_inf();
    st.l = 0.f;
  }
  const int nkb = static_cast<int>((Tk + kBlk - 1) / kBlk);
  for (int i = tid; i < nkb; i += kThreads) blk[i] = 0;
  __syncthreads();
  const int rs = p.row_ptr[rw.row], re = p.row_ptr[rw.row + 1];
  for (int t = rs + tid; t < re; t += kThreads) blk[p.col_idx[t]] = 1;
  __syncthreads();

  // a tile in Ks/Vs of nb keys with positions key_of(j) (-1: skip)
  auto run_tile = [&](int nb, auto key_of) {
    for (int s0 = 0; s0 < nb; s0 += kSub) {
      float s[kSub];
      const int n = min(kSub, nb - s0);
#pragma unroll
      for (int jj = 0; jj < kSub; ++jj) {
        if (jj < n) {
          const float* kr = Ks + (s0 + jj) * D + half * DH;
          float dot = 0.f;
#pragma unroll
          for (int d = 0; d < DH; ++d) dot = fmaf(st.q[d], kr[d], dot);
          dot += __shfl_xor_sync(0xffffffffu, dot, 1);
          const int64_t key = key_of(s0 + jj);
          s[jj] = (active && key >= 0 && key <= pos) ? dot : neg_inf();
        } else {
          s[jj] = neg_inf();
        }
      }
      softmax_step<DH>(st, s, n, [&](int jj) { return Vs + (s0 + jj) * D + half * DH; });
    }
  };

  for (int t = rs; t < re; ++t) {
    const int64_t ks0 = static_cast<int64_t>(p.col_idx[t]) * kBlk;
    if (ks0 > p_last) continue;
    const int nb = static_cast<int>(imin64(kBlk, Tk - ks0));
    for (int e = tid; e < nb * D; e += kThreads) {
      const int j = e / D, d = e - j * D;
      Ks[e] = to_f(kh[(ks0 + j) * ks + d]);
      Vs[e] = to_f(vh[(ks0 + j) * ks + d]);
    }
    __syncthreads();
    run_tile(nb, [&](int j) { return ks0 + j; });
    __syncthreads();
  }

  const int32_t* cols = nullptr;
  int ncols = 0;
  if (p.col_indptr) {
    const int64_t bh = static_cast<int64_t>(rw.b) * Hq + rw.h;
    cols = p.cols + p.col_indptr[bh];
    ncols = p.col_indptr[bh + 1] - p.col_indptr[bh];
    for (int c0 = 0; c0 < ncols; c0 += kBlk) {
      if (cols[c0] > p_last) break;
      const int nb = min(kBlk, ncols - c0);
      if (tid < nb) {
        const int key = cols[c0 + tid];
        kidx[tid] = (key <= p_last && !blk[key / kBlk]) ? key : -1;
      }
      __syncthreads();
      for (int e = tid; e < nb * D; e += kThreads) {
        const int j = e / D, d = e - j * D;
        const int key = kidx[j];
        Ks[e] = key >= 0 ? to_f(kh[key * ks + d]) : 0.f;
        Vs[e] = key >= 0 ? to_f(vh[key * ks + d]) : 0.f;
      }
      __syncthreads();
      run_tile(nb, [&](int j) { return static_cast<int64_t>(kidx[j]); });
      __syncthreads();
    }
  }

  if (p.diag_indptr) {
    const int64_t bh = static_cast<int64_t>(rw.b) * Hq + rw.h;
    const int32_t* dg = p.diags + p.diag_indptr[bh];
    const int nd = p.diag_indptr[bh + 1] - p.diag_indptr[bh];
    for (int s0 = 0; s0 < nd; s0 += kSub) {
      if (dg[s0] > p_last) break;
      const int n = min(kSub, nd - s0);
      float s[kSub];
      int64_t keys[kSub];
#pragma unroll
      for (int jj = 0; jj < kSub; ++jj) {
        keys[jj] = -1;
        s[jj] = neg_inf();
        if (jj < n) {
          const int64_t key = pos - dg[s0 + jj];
          const bool ok = active && key >= 0 && !blk[key / kBlk] && !(ncols && in_sorted(cols, ncols, static_cast<int>(key)));
          const T* kr = kh + (ok ? key : 0) * ks + half * DH;
          float dot = 0.f;
#pragma unroll
          for (int d = 0; d < DH; ++d) dot = fmaf(st.q[d], to_f(kr[d]), dot);
          dot += __shfl_xor_sync(0xffffffffu, dot, 1);
          if (ok) {
            s[jj] = dot;
            keys[jj] = key;
          }
        }
      }
      // V rows straight from global memory: widen into a small per-thread buffer per key
      float tmax = neg_inf();
#pragma unroll
      for (int jj = 0; jj < kSub; ++jj) tmax = fmaxf(tmax, s[jj]);
      const float mnew = fmaxf(st.mx, tmax);
      if (mnew == neg_inf()) continue;
      const float alpha = __expf(st.mx - mnew);
      st.l *= alpha;
#pragma unroll
      for (int d = 0; d < DH; ++d) st.o[d] *= alpha;
#pragma unroll
      for (int jj = 0; jj < kSub; ++jj) {
        if (keys[jj] < 0) continue;
        const float pj = __expf(s[jj] - mnew);
        st.l += pj;
        const T* vr = vh + keys[jj] * ks + half * DH;
#pragma unroll
        for (int d = 0; d < DH; ++d) st.o[d] = fmaf(pj, to_f(vr[d]), st.o[d]);
      }
      st.mx = mnew;
    }
  }

  if (!active) return;
  T* out = static_cast<T*>(p.out) + ((q0 + i0 + m) * Hq + rw.h) * D + half * DH;
  const bool any = st.l > 0.f;
  const float inv = any ? 1.f / st.l : 0.f;
#pragma unroll
  for (int d = 0; d < DH; ++d) out[d] = from_f<T>(st.o[d] * inv);
  if (half == 0) p.lse[(q0 + i0 + m) * Hq + rw.h] = any ? st.mx + logf(st.l) : neg_inf();
}

template <typename T, int DH>
cudaError_t launch_attn_typed(const BsCudaParams& p, cudaStream_t stream) {
  if (p.nrows == 0) return cudaSuccess;
  if (p.nrows > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const size_t smem = 2 * kBlk * 2 * DH * sizeof(float) + kBlk * sizeof(int) + static_cast<size_t>(p.max_nkb) + 16;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(bs_attn_kernel<T, DH>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  bs_attn_kernel<T, DH><<<static_cast<unsigned>(p.nrows), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_attn_d(const BsCudaParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: return launch_attn_typed<T, 32>(p, stream);
    case 128: return launch_attn_typed<T, 64>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ---- vertical-slash estimator ----------------------------------------------------------------

constexpr int kEstThreads = 256;

// lse of query m (of the last n) of head h: one CTA per (m, h).
template <typename T>
__global__ void vs_lse_kernel(VsCudaParams p) {
  extern __shared__ float qs[];  // [D]
  __shared__ float red_m[kEstThreads / 32], red_l[kEstThreads / 32];
  const int64_t n = imin64(p.n_last, p.T);
  const int64_t m = blockIdx.x, h = blockIdx.y, D = p.D;
  const int64_t i = p.T - n + m, pos = p.Tk - p.T + i, hk = h / (p.Hq / p.Hkv);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  for (int64_t d = threadIdx.x; d < D; d += kEstThreads) qs[d] = to_f(q[(i * p.Hq + h) * D + d]) * p.scale;
  __syncthreads();
  float mx = neg_inf(), l = 0.f;
  for (int64_t j = threadIdx.x; j <= pos; j += kEstThreads) {
    const T* kr = k + (j * p.Hkv + hk) * D;
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s = fmaf(qs[d], to_f(kr[d]), s);
    const float mn = fmaxf(mx, s);
    l = l * __expf(mx - mn) + __expf(s - mn);
    mx = mn;
  }
  // combine (mx, l) pairs: warp, then CTA
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, mx, o), ol = __shfl_xor_sync(0xffffffffu, l, o);
    const float mn = fmaxf(mx, om);
    if (mn != neg_inf()) {
      l = l * __expf(mx - mn) + ol * __expf(om - mn);
      mx = mn;
    }
  }
  if ((threadIdx.x & 31) == 0) {
    red_m[threadIdx.x >> 5] = mx;
    red_l[threadIdx.x >> 5] = l;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = neg_inf(), L = 0.f;
    for (int w = 0; w < kEstThreads / 32; ++w) {
      const float mn = fmaxf(M, red_m[w]);
      if (mn == neg_inf()) continue;
      L = L * __expf(M - mn) + red_l[w] * __expf(red_m[w] - mn);
      M = mn;
    }
    p.lse_buf[h * kBlk + m] = M + logf(L);
  }
}

// One thread per key: its column mass, and each query's mass added to the query's diagonal.
template <typename T>
__global__ void vs_mass_kernel(VsCudaParams p) {
  extern __shared__ float qs[];  // [n][D]
  const int64_t n = imin64(p.n_last, p.T);
  const int64_t h = blockIdx.y, D = p.D, hk = h / (p.Hq / p.Hkv);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  for (int64_t e = threadIdx.x; e < n * D; e += kEstThreads) {
    const int64_t m = e / D, d = e - m * D;
    qs[e] = to_f(q[((p.T - n + m) * p.Hq + h) * D + d]) * p.scale;
  }
  __syncthreads();
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kEstThreads + threadIdx.x;
  if (j >= p.Tk) return;
  const T* kr = k + (j * p.Hkv + hk) * D;
  float col = 0.f;
  const int64_t pos0 = p.Tk - n;  // position of the first of the last n queries
  for (int64_t m = 0; m < n; ++m) {
    const int64_t pos = pos0 + m;
    if (j > pos) continue;
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s = fmaf(qs[m * D + d], to_f(kr[d]), s);
    const float pm = __expf(s - p.lse_buf[h * kBlk + m]);
    col += pm;
    atomicAdd(p.slash + h * p.Tk + (pos - j), pm);
  }
  p.vert[h * p.Tk + j] = col;
}

template <typename T>
cudaError_t launch_vs_typed(const VsCudaParams& p, cudaStream_t stream) {
  const int64_t n = p.n_last < p.T ? p.n_last : p.T;
  if (n <= 0 || p.Tk == 0) return cudaSuccess;
  const dim3 g1(static_cast<unsigned>(n), static_cast<unsigned>(p.Hq));
  vs_lse_kernel<T><<<g1, kEstThreads, p.D * sizeof(float), stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const dim3 g2(static_cast<unsigned>((p.Tk + kEstThreads - 1) / kEstThreads), static_cast<unsigned>(p.Hq));
  vs_mass_kernel<T><<<g2, kEstThreads, n * p.D * sizeof(float), stream>>>(p);
  return cudaGetLastError();
}

// ---- block-pooled estimator ------------------------------------------------------------------

// dst[(h * nblk + c) * D + d] = mul * mean of rows [64 c, 64 c + 64) of head h (rows < N)
template <typename T>
__global__ void pool_kernel(const T* src, int64_t N, int64_t H, int64_t D, float mul, float* dst) {
  const int64_t c = blockIdx.x, h = blockIdx.y, nblk = gridDim.x;
  const int64_t r0 = c * kBlk, r1 = imin64(N, r0 + kBlk);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int64_t r = r0; r < r1; ++r) s += to_f(src[(r * H + h) * D + d]);
    dst[(h * nblk + c) * D + d] = s * mul / static_cast<float>(r1 - r0);
  }
}

__global__ void pool_scores_kernel(const float* qm, const float* km, int64_t T, int64_t Tk, int64_t Hq,
                                   int64_t Hkv, int64_t D, int64_t nqb, int64_t nkb, float* scores) {
  const int64_t r = blockIdx.x, h = blockIdx.y, hk = h / (Hq / Hkv);
  const int64_t p_last = Tk - T + imin64(T, (r + 1) * kBlk) - 1;
  const float* a = qm + (h * nqb + r) * D;
  for (int64_t c = threadIdx.x; c < nkb; c += blockDim.x) {
    float s = neg_inf();
    if (c * kBlk <= p_last) {
      const float* b = km + (hk * nkb + c) * D;
      s = 0.f;
      for (int64_t d = 0; d < D; ++d) s = fmaf(a[d], b[d], s);
    }
    scores[(h * nqb + r) * nkb + c] = s;
  }
}

template <typename T>
cudaError_t launch_bp_typed(const BpCudaParams& p, cudaStream_t stream) {
  const int64_t nqb = (p.T + kBlk - 1) / kBlk, nkb = (p.Tk + kBlk - 1) / kBlk;
  if (nqb == 0 || nkb == 0) return cudaSuccess;
  float* qm = p.scratch;
  float* km = qm + p.Hq * nqb * p.D;
  pool_kernel<T><<<dim3(static_cast<unsigned>(nqb), static_cast<unsigned>(p.Hq)), 64, 0, stream>>>(
      static_cast<const T*>(p.q), p.T, p.Hq, p.D, p.scale, qm);
  pool_kernel<T><<<dim3(static_cast<unsigned>(nkb), static_cast<unsigned>(p.Hkv)), 64, 0, stream>>>(
      static_cast<const T*>(p.k), p.Tk, p.Hkv, p.D, 1.f, km);
  pool_scores_kernel<<<dim3(static_cast<unsigned>(nqb), static_cast<unsigned>(p.Hq)), 128, 0, stream>>>(
      qm, km, p.T, p.Tk, p.Hq, p.Hkv, p.D, nqb, nkb, p.scores);
  return cudaGetLastError();
}

}  // namespace

bool block_sparse_cuda_supports_d(int64_t D) { return D == 64 || D == 128; }

cudaError_t launch_block_sparse_attention(const BsCudaParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case BsCudaDType::F16: return launch_attn_d<__half>(p, stream);
    case BsCudaDType::BF16: return launch_attn_d<__nv_bfloat16>(p, stream);
    default: return launch_attn_d<float>(p, stream);
  }
}

cudaError_t launch_vertical_slash_scores(const VsCudaParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case BsCudaDType::F16: return launch_vs_typed<__half>(p, stream);
    case BsCudaDType::BF16: return launch_vs_typed<__nv_bfloat16>(p, stream);
    default: return launch_vs_typed<float>(p, stream);
  }
}

cudaError_t launch_block_pool_scores(const BpCudaParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case BsCudaDType::F16: return launch_bp_typed<__half>(p, stream);
    case BsCudaDType::BF16: return launch_bp_typed<__nv_bfloat16>(p, stream);
    default: return launch_bp_typed<float>(p, stream);
  }
}

}  // namespace fastadapt
