// Token merging kernel bodies, included once per ISA TU (tokens_generic.cpp, tokens_avx2.cpp)
// with FASTADAPT_TOKENS_SUFFIX set: the loops are written for the vectoriser (omp simd), so each
// TU's own flags pick the vector width. Internal linkage for everything but the suffixed entry
// points (see qdecode_scalar.h for why: two TUs, one body, different flags).
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifndef FASTADAPT_TOKENS_SUFFIX
#error "define FASTADAPT_TOKENS_SUFFIX before including tokens_impl.h"
#endif

namespace fastadapt::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (softmax arguments), vectorisable: 2^n * p(r) with r = x - n ln2, |r| <= ln2/2,
// a degree-6 polynomial (rel. error ~2e-7). Arguments below -87 flush to 0.
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.f);
  // round to nearest for y <= 0 by truncation of y - 0.5 (no floor call: vectorises everywhere)
  const int32_t ni = static_cast<int32_t>(xc * 1.44269504088896341f - 0.5f);
  const float n = static_cast<float>(ni);
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float scale = std::bit_cast<float>((ni + 127) << 23);
  return p * scale * static_cast<float>(x >= -87.f);  // branch-free: the loop vectorises
}

inline void inv_norms_impl(const float* x, int64_t C, int64_t r0, int64_t r1, float* inv) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * C;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    inv[r] = 1.f / std::max(std::sqrt(ss), 1e-12f);
  }
}

// Running row max of cos(A_i, B_j) over the B tokens for T A rows at a time, in chunks of 16
// B tokens: dots from a register-blocked micro-kernel over the transposed B half (no horizontal
// sums), then a per-lane running max/argmax (strict >: each lane keeps its earliest maximum),
// combined at the end with ties to the smallest j, i.e. the first maximum in token order.
template <int T>
inline void match_tile(const float* metric, const float* inv, int64_t C, const float* bT, int64_t ldb,
                       const float* wb, const float* addb, int64_t i, float* best, int32_t* best_idx) {
  const float* a[T];
  float ia[T];
  alignas(32) float bv[T][16];
  alignas(32) int32_t bj[T][16];
  for (int t = 0; t < T; ++t) {
    a[t] = metric + 2 * (i + t) * C;
    ia[t] = inv[2 * (i + t)];
    for (int u = 0; u < 16; ++u) {
      bv[t][u] = kNegInf;
      bj[t][u] = -1;
    }
  }
  for (int64_t jc = 0; jc < ldb; jc += 16) {
    float acc[T][16];
    for (int t = 0; t < T; ++t)
      for (int u = 0; u < 16; ++u) acc[t][u] = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const float* bc = bT + c * ldb + jc;
      for (int t = 0; t < T; ++t) {
        const float av = a[t][c];
#pragma omp simd
        for (int u = 0; u < 16; ++u) acc[t][u] += av * bc[u];
      }
    }
    for (int t = 0; t < T; ++t) {
#pragma omp simd
      for (int u = 0; u < 16; ++u) {
        const float cs = acc[t][u] * ia[t] * wb[jc + u] + addb[jc + u];
        const bool better = cs > bv[t][u];
        bv[t][u] = better ? cs : bv[t][u];
        bj[t][u] = better ? static_cast<int32_t>(jc + u) : bj[t][u];
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    float v = kNegInf;
    int32_t j = -1;
    for (int u = 0; u < 16; ++u) {
      if (bj[t][u] >= 0 && (bv[t][u] > v || (bv[t][u] == v && (j < 0 || bj[t][u] < j)))) {
        v = bv[t][u];
        j = bj[t][u];
      }
    }
    best[i + t] = v;
    best_idx[i + t] = j < 0 ? -1 : 2 * j + 1;
  }
}

inline void match_rows_impl(const float* metric, const float* inv, int64_t C, const float* bT, int64_t ldb,
                            const float* wb, const float* addb, int64_t i0, int64_t i1, float* best,
                            int32_t* best_idx) {
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) match_tile<4>(metric, inv, C, bT, ldb, wb, addb, i, best, best_idx);
  for (; i < i1; ++i) match_tile<1>(metric, inv, C, bT, ldb, wb, addb, i, best, best_idx);
}

inline void merge_rows_impl(const float* x, const float* sizes, const int32_t* src_ptr,
                            const int32_t* src_idx, int64_t C, int64_t m0, int64_t m1, float* out,
                            float* out_sizes) {
  for (int64_t m = m0; m < m1; ++m) {
    float* o = out + m * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = 0.f;
    float total = 0.f;
    for (int32_t p = src_ptr[m]; p < src_ptr[m + 1]; ++p) {
      const int32_t n = src_idx[p];
      const float s = sizes ? sizes[n] : 1.f;
      total += s;
      const float* xr = x + static_cast<int64_t>(n) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] += s * xr[c];
    }
    const float inv = total != 0.f ? 1.f / total : 0.f;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] *= inv;
    out_sizes[m] = total;
  }
}

constexpr int64_t kKeyBlock = 64;  // keys per online-softmax step (a multiple of 16)

// T query rows against all keys, key blocks of kKeyBlock, online softmax (running max m, running
// sum l, accumulator rescaled by exp(m_old - m_new) when the max grows). Both products are
// register-blocked 16-wide micro-kernels with no horizontal sums:
//   scores: s[t][j..j+16] += q[t][d] * kT[d][j..j+16] over d (K transposed, keys padded to 16)
//   values: acc[t][d..d+16] += p[t][j] * v[j][d..d+16] over the block's keys (then 8, then 1)
template <int T>
inline void attn_tile(const float* q, const float* kT, int64_t ldk, const float* v, const float* bias,
                      int64_t Nk, int64_t D, float scale, int64_t r, float* out) {
  alignas(32) float s[T][kKeyBlock];
  alignas(32) float acc[T][256];  // D <= 256 (checked by the glue)
  alignas(32) float qs[T][256];   // q rows pre-multiplied by scale
  alignas(32) float bb[kKeyBlock];  // the block's key bias: log size, -inf past the last key
  float mx[T], l[T];
  for (int t = 0; t < T; ++t) {
    const float* qr = q + (r + t) * D;
    for (int64_t d = 0; d < D; ++d) qs[t][d] = qr[d] * scale;
    mx[t] = kNegInf;
    l[t] = 0.f;
    for (int64_t d = 0; d < D; ++d) acc[t][d] = 0.f;
  }
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t j0 = 0; j0 < Nk; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, Nk - j0);
    const int64_t nb8 = (nb + 15) & ~int64_t(15);  // kT is zero-padded to a multiple of 16 keys
    for (int64_t jj = 0; jj < nb8; ++jj) bb[jj] = jj < nb ? (bias ? bias[j0 + jj] : 0.f) : kNegInf;
    for (int64_t jc = 0; jc < nb8; jc += 16) {  // 16 keys x T rows: 2T independent FMA chains
      float a[T][16];
      for (int t = 0; t < T; ++t)
        for (int u = 0; u < 16; ++u) a[t][u] = bb[jc + u];
      for (int64_t d = 0; d < D; ++d) {
        const float* kd = kT + d * ldk + j0 + jc;
        for (int t = 0; t < T; ++t) {
          const float qv = qs[t][d];
#pragma omp simd
          for (int u = 0; u < 16; ++u) a[t][u] += qv * kd[u];
        }
      }
      for (int t = 0; t < T; ++t)
        for (int u = 0; u < 16; ++u) s[t][jc + u] = a[t][u];
    }
    // online softmax update per row; s becomes the block's probabilities (unnormalised)
    bool any = false;
    for (int t = 0; t < T; ++t) {
      float* st = s[t];
      float bm = kNegInf;
#pragma omp simd reduction(max : bm)
      for (int64_t jj = 0; jj < nb8; ++jj) bm = std::max(bm, st[jj]);
      const float m_new = std::max(mx[t], bm);
      if (m_new == kNegInf) {  // every key so far masked: nothing to add
        for (int64_t jj = 0; jj < nb8; ++jj) st[jj] = 0.f;
        continue;
      }
      any = true;
      const float corr = mx[t] == kNegInf ? 0.f : exp_nonpos(mx[t] - m_new);
      float bsum = 0.f;
#pragma omp simd reduction(+ : bsum)
      for (int64_t jj = 0; jj < nb8; ++jj) {
        const float p = exp_nonpos(st[jj] - m_new);  // -inf - m_new -> 0
        st[jj] = p;
        bsum += p;
      }
      l[t] = l[t] * corr + bsum;
      mx[t] = m_new;
      if (corr != 1.f) {
        float* at = acc[t];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) at[d] *= corr;
      }
    }
    if (!any) continue;
    const float* vb = v + j0 * D;
    int64_t dc = 0;
    for (; dc + 16 <= D; dc += 16) {  // 16 dims x T rows: 2T independent FMA chains
      float a[T][16];
      for (int t = 0; t < T; ++t)
        for (int u = 0; u < 16; ++u) a[t][u] = acc[t][dc + u];
      for (int64_t jj = 0; jj < nb; ++jj) {
        const float* vr = vb + jj * D + dc;
        for (int t = 0; t < T; ++t) {
          const float p = s[t][jj];
#pragma omp simd
          for (int u = 0; u < 16; ++u) a[t][u] += p * vr[u];
        }
      }
      for (int t = 0; t < T; ++t)
        for (int u = 0; u < 16; ++u) acc[t][dc + u] = a[t][u];
    }
    for (; dc < D8; dc += 8) {
      float a[T][8];
      for (int t = 0; t < T; ++t)
        for (int u = 0; u < 8; ++u) a[t][u] = acc[t][dc + u];
      for (int64_t jj = 0; jj < nb; ++jj) {
        const float* vr = vb + jj * D + dc;
        for (int t = 0; t < T; ++t) {
          const float p = s[t][jj];
#pragma omp simd
          for (int u = 0; u < 8; ++u) a[t][u] += p * vr[u];
        }
      }
      for (int t = 0; t < T; ++t)
        for (int u = 0; u < 8; ++u) acc[t][dc + u] = a[t][u];
    }
    for (int64_t d = D8; d < D; ++d)  // head dims beyond the last multiple of 8
      for (int64_t jj = 0; jj < nb; ++jj)
        for (int t = 0; t < T; ++t) acc[t][d] += s[t][jj] * vb[jj * D + d];
  }
  for (int t = 0; t < T; ++t) {
    float* o = out + (r + t) * D;
    const float inv = l[t] > 0.f ? 1.f / l[t] : 0.f;
    const float* at = acc[t];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = at[d] * inv;
  }
}

inline void prop_attn_rows_impl(const float* q, const float* kT, int64_t ldk, const float* v, const float* bias,
                                int64_t Nk, int64_t D, float scale, int64_t q0, int64_t q1, float* out) {
  int64_t r = q0;
  for (; r + 4 <= q1; r += 4) attn_tile<4>(q, kT, ldk, v, bias, Nk, D, scale, r, out);
  for (; r < q1; ++r) attn_tile<1>(q, kT, ldk, v, bias, Nk, D, scale, r, out);
}

}  // namespace

#define FASTADAPT_TOKENS_CAT2(a, b) a##_##b
#define FASTADAPT_TOKENS_CAT(a, b) FASTADAPT_TOKENS_CAT2(a, b)
#define FASTADAPT_TOKENS_FN(name) FASTADAPT_TOKENS_CAT(name, FASTADAPT_TOKENS_SUFFIX)

void FASTADAPT_TOKENS_FN(tokens_inv_norms)(const float* x, int64_t C, int64_t r0, int64_t r1, float* inv) {
  inv_norms_impl(x, C, r0, r1, inv);
}

void FASTADAPT_TOKENS_FN(tokens_match_rows)(const float* metric, const float* inv, int64_t C, const float* bT,
                                            int64_t ldb, const float* wb, const float* addb, int64_t i0,
                                            int64_t i1, float* best, int32_t* best_idx) {
  match_rows_impl(metric, inv, C, bT, ldb, wb, addb, i0, i1, best, best_idx);
}

void FASTADAPT_TOKENS_FN(tokens_merge_rows)(const float* x, const float* sizes, const int32_t* src_ptr,
                                            const int32_t* src_idx, int64_t C, int64_t m0, int64_t m1,
                                            float* out, float* out_sizes) {
  merge_rows_impl(x, sizes, src_ptr, src_idx, C, m0, m1, out, out_sizes);
}

void FASTADAPT_TOKENS_FN(tokens_prop_attn_rows)(const float* q, const float* kT, int64_t ldk, const float* v,
                                                const float* bias, int64_t Nk, int64_t D, float scale,
                                                int64_t q0, int64_t q1, float* out) {
  prop_attn_rows_impl(q, kT, ldk, v, bias, Nk, D, scale, q0, q1, out);
}

}  // namespace fastadapt::cpu
