// CUDA confidence kernels. logit_confidence: one block per logits row; each thread keeps online
// softmax statistics (max, sum e^(x-m), sum e^(x-m)(x-m), first argmax, second-best value) over a
// strided slice, then the states merge exactly through warp shuffles and one shared-memory step.
// hidden_cosine: one block per row, three fp32 sums. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "cuda/confidence_cuda.h"
#include "cuda/elem_convert.cuh"

namespace fastadapt {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct State {
  float m, s, t, v2;
  long long i1;
};

__device__ __forceinline__ State merge(const State& a, const State& b) {
  // a and b cover disjoint index sets; ties keep the smaller index
  const bool b_wins = b.m > a.m || (b.m == a.m && b.i1 < a.i1);
  State r;
  r.m = b_wins ? b.m : a.m;
  r.i1 = b_wins ? b.i1 : a.i1;
  r.v2 = fmaxf(fmaxf(a.v2, b.v2), b_wins ? a.m : b.m);
  r.s = 0.f;
  r.t = 0.f;
  if (a.s > 0.f) {
    const float d = a.m - r.m, f = __expf(d);
    r.s += a.s * f;
    r.t += (a.t + a.s * d) * f;
  }
  if (b.s > 0.f) {
    const float d = b.m - r.m, f = __expf(d);
    r.s += b.s * f;
    r.t += (b.t + b.s * d) * f;
  }
  return r;
}

__device__ __forceinline__ State shfl_state(const State& st, int o) {
  State r;
  r.m = __shfl_xor_sync(0xffffffffu, st.m, o);
  r.s = __shfl_xor_sync(0xffffffffu, st.s, o);
  r.t = __shfl_xor_sync(0xffffffffu, st.t, o);
  r.v2 = __shfl_xor_sync(0xffffffffu, st.v2, o);
  r.i1 = __shfl_xor_sync(0xffffffffu, st.i1, o);
  return r;
}

template <typename T>
__global__ void logit_confidence_kernel(const T* __restrict__ logits, float* __restrict__ stats,
                                        int64_t* __restrict__ argmax, int64_t V, float inv_temp) {
  const T* row = logits + static_cast<int64_t>(blockIdx.x) * V;
  State st{-FLT_MAX * 2.f, 0.f, 0.f, -FLT_MAX * 2.f, 0x7fffffffffffffffLL};  // -inf, empty
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float x = to_f(row[i]) * inv_temp;
    if (x > st.m || st.i1 == 0x7fffffffffffffffLL) {  // new max: rescale the sums
      if (st.s > 0.f) {
        const float d = st.m - x, f = __expf(d);
        st.t = (st.t + st.s * d) * f;
        st.s *= f;
      }
      st.v2 = fmaxf(st.v2, st.m);
      st.m = x;
      st.i1 = i;
      st.s += 1.f;  // e^0; t += 0
    } else {
      st.v2 = fmaxf(st.v2, x);
      const float d = fmaxf(x - st.m, -104.f), e = __expf(d);
      st.s += e;
      st.t += e * d;
    }
  }
  for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_state(st, o));
  __shared__ State warp_states[kWarps];
  if ((threadIdx.x & 31) == 0) warp_states[threadIdx.x >> 5] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    State r = warp_states[0];
    for (int w = 1; w < kWarps; ++w) r = merge(r, warp_states[w]);
    const float inv = 1.f / r.s;
    float* o = stats + 3 * static_cast<int64_t>(blockIdx.x);
    o[0] = inv;
    o[1] = (1.f - expf(r.v2 - r.m)) * inv;
    o[2] = fmaxf(0.f, logf(r.s) - r.t * inv);
    argmax[blockIdx.x] = r.i1;
  }
}

template <typename T>
__global__ void hidden_cosine_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                                     int64_t H, float eps) {
  const int64_t off = static_cast<int64_t>(blockIdx.x) * H;
  float dot = 0.f, na = 0.f, nb = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += kThreads) {
    const float x = to_f(a[off + i]), y = to_f(b[off + i]);
    dot += x * y;
    na += x * x;
    nb += y * y;
  }
  for (int o = 16; o > 0; o >>= 1) {
    dot += __shfl_xor_sync(0xffffffffu, dot, o);
    na += __shfl_xor_sync(0xffffffffu, na, o);
    nb += __shfl_xor_sync(0xffffffffu, nb, o);
  }
  __shared__ float sums[3][kWarps];
  if ((threadIdx.x & 31) == 0) {
    sums[0][threadIdx.x >> 5] = dot;
    sums[1][threadIdx.x >> 5] = na;
    sums[2][threadIdx.x >> 5] = nb;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float d = 0.f, x = 0.f, y = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      d += sums[0][w];
      x += sums[1][w];
      y += sums[2][w];
    }
    out[blockIdx.x] = d / fmaxf(sqrtf(x) * sqrtf(y), eps);
  }
}

}  // namespace

cudaError_t launch_logit_confidence(const LogitConfidenceCudaParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  if (p.B > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(p.B);
  switch (p.dtype) {
    case ConfDType::F32:
      logit_confidence_kernel<float><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(p.logits), p.stats, p.argmax, p.V, p.inv_temp);
      break;
    case ConfDType::F16:
      logit_confidence_kernel<__half><<<grid, kThreads, 0, stream>>>(
          static_cast<const __half*>(p.logits), p.stats, p.argmax, p.V, p.inv_temp);
      break;
    case ConfDType::BF16:
      logit_confidence_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(p.logits), p.stats, p.argmax, p.V, p.inv_temp);
      break;
    default: return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t launch_hidden_cosine(const HiddenCosineCudaParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(p.rows);
  switch (p.dtype) {
    case ConfDType::F32:
      hidden_cosine_kernel<float><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(p.a), static_cast<const float*>(p.b), p.out, p.H, p.eps);
      break;
    case ConfDType::F16:
      hidden_cosine_kernel<__half><<<grid, kThreads, 0, stream>>>(
          static_cast<const __half*>(p.a), static_cast<const __half*>(p.b), p.out, p.H, p.eps);
      break;
    case ConfDType::BF16:
      hidden_cosine_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(p.a), static_cast<const __nv_bfloat16*>(p.b), p.out, p.H,
          p.eps);
      break;
    default: return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

}  // namespace fastadapt
