// Torch-free launchers of the CUDA token merging and pruning kernels (tokens.cu). Every pointer
// is a contiguous device buffer; shapes in the comments. Index contents (dest ranges, protected
// counts) are not validated here: see tokens_checks.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapt {

enum class TokDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// ToMe matching + plan. metric [B, N, C] (dtype), prot [B, N] uint8 or null; scratch: best
// [B, ceil(N/2)] fp32, best_idx [B, ceil(N/2)] int32, inv [B, N] fp32. dest [B, N] int32 out.
// With fewer than r mergeable tokens in an item, that item merges what it can and its dest
// names rows >= N - r (merge_tokens skips them).
struct TokensMatchParams {
  const void* metric = nullptr;
  const uint8_t* prot = nullptr;
  float* inv = nullptr;
  float* best = nullptr;
  int32_t* best_idx = nullptr;
  int32_t* dest = nullptr;
  int64_t B = 0, N = 0, C = 0, r = 0;
  TokDType dtype = TokDType::F32;
};
cudaError_t launch_bipartite_soft_matching(const TokensMatchParams& p, cudaStream_t stream);

// Size-weighted merge. x [B, N, C] (dtype), sizes [B, N] fp32 or null, dest [B, N] int32;
// scratch acc [B, M, C] fp32; out [B, M, C] (dtype), out_sizes [B, M] fp32. Rows are summed
// with fp32 atomics (summation order not fixed).
struct TokensMergeParams {
  const void* x = nullptr;
  const float* sizes = nullptr;
  const int32_t* dest = nullptr;
  float* acc = nullptr;
  void* out = nullptr;
  float* out_sizes = nullptr;
  int64_t B = 0, N = 0, M = 0, C = 0;
  TokDType dtype = TokDType::F32;
};
cudaError_t launch_merge_tokens(const TokensMergeParams& p, cudaStream_t stream);

// Row gather: out[b, n] = x[b, idx[b, n]] (idx in [0, M)), else fill[b, n] (fill may be null:
// zeros). x [B, M, C], idx [B, N], fill/out [B, N, C]; elem_size 2 or 4 bytes.
cudaError_t launch_gather_rows(const void* x, const int32_t* idx, const void* fill, void* out, int64_t B,
                               int64_t N, int64_t M, int64_t C, int64_t elem_size, cudaStream_t stream);

// Top-`keep` selection per item, order-preserving. scores [B, N] fp32, prot [B, N] uint8 or
// null; kept [B, keep] int32 out (ascending positions).
cudaError_t launch_prune_select(const float* scores, const uint8_t* prot, int32_t* kept, int64_t B, int64_t N,
                                int64_t keep, cudaStream_t stream);

// Flash-style proportional attention. q [B, H, Nq, D], k/v [B, H, Nk, D] (dtype), sizes [B, Nk]
// fp32 or null, out [B, H, Nq, D] (dtype). D <= 256.
struct PropAttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* sizes = nullptr;
  void* out = nullptr;
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, D = 0;
  float scale = 1.f;
  TokDType dtype = TokDType::F32;
};
cudaError_t launch_proportional_attention(const PropAttnParams& p, cudaStream_t stream);

}  // namespace fastadapt
