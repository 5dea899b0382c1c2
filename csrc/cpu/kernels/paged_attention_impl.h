// Paged attention kernel bodies, included by one TU per ISA (paged_attention_generic.cpp,
// paged_attention_avx2.cpp). The AVX2 TU gets hand-written dot / axpy / exp micro-kernels under
// `#if defined(__AVX2__)`; the generic TU gets loops written for the vectoriser. Internal
// linkage only (a shared inline definition could resolve to the AVX2 build on a CPU without it).
//
// Work unit: M queries (fp32, pre-scaled) of one page-table row against keys [k0, k1). Keys go
// by blocks of kBlockKeys: the block's K rows are widened to fp32 once (L1-resident), the block's
// logits S[M, nb] form a small matrix product, the online softmax rescales each query's
// accumulator once per block, and V rows are widened once and added into all M accumulators.
// So every K/V page is read once per work unit, whatever M is.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/elem_convert.h"
#include "cpu/kernels/paged_kernels.h"

namespace fastadapt::cpu {
namespace {

constexpr int64_t kBlockKeys = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// dst[0, n) = fp32(src[0, n))
static inline void pa_widen(const char* src, KvDType dt, int64_t n, float* dst) {
  if (dt == KvDType::F32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
    return;
  }
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__AVX2__)
  if (dt == KvDType::F16) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  } else {
    for (; i + 8 <= n; i += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
#endif
  if (dt == KvDType::F16) {
    for (; i < n; ++i) dst[i] = half_to_f32(s[i]);
  } else {
#pragma omp simd
    for (int64_t t = i; t < n; ++t) dst[t] = bf16_bits_to_f32(s[t]);
  }
}

// Keys [j0, j0 + nb) of a row from one pool into dst [nb, D] fp32; runs inside a page are
// contiguous in the pool and are widened in one call.
static inline void pa_load_rows(const PagedRow& row, const void* pool, int64_t j0, int64_t nb,
                                float* dst) {
  const int64_t S = row.page_size, D = row.D;
  const int64_t es = row.dtype == KvDType::F32 ? 4 : 2;
  const char* base = static_cast<const char*>(pool);
  int64_t j = j0;
  const int64_t end = j0 + nb;
  while (j < end) {
    const int64_t page = row.pages[j / S], off = j % S;
    const int64_t run = std::min(S - off, end - j);
    pa_widen(base + (page * S + off) * D * es, row.dtype, run * D, dst + (j - j0) * D);
    j += run;
  }
}

// Prefetch keys [j0, j0 + nb) of a row from one pool. Pages sit anywhere in the pool, so the
// hardware prefetcher loses the stream at every page boundary; the next block is requested
// while the current one is computed.
static inline void pa_prefetch_rows(const PagedRow& row, const void* pool, int64_t j0, int64_t nb) {
  const int64_t S = row.page_size, D = row.D;
  const int64_t es = row.dtype == KvDType::F32 ? 4 : 2;
  const char* base = static_cast<const char*>(pool);
  int64_t j = j0;
  const int64_t end = j0 + nb;
  while (j < end) {
    const int64_t page = row.pages[j / S], off = j % S;
    const int64_t run = std::min(S - off, end - j);
    const char* p = base + (page * S + off) * D * es;
    for (int64_t o = 0, bytes = run * D * es; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
    j += run;
  }
}

static inline float pa_dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

#if defined(__AVX2__)
static inline __m128 pa_hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// e^x for x <= ~88; x < -87.3 (and -inf) gives 0. Range reduction x = n ln2 + r, |r| <= ln2/2,
// degree-6 Taylor polynomial for e^r (relative error ~1e-7), 2^n through the exponent bits.
static inline __m256 pa_exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.3888889e-3f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3333333e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1666668e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.16666667f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}
#endif

// x[j] = exp(x[j] - shift) for j < n; returns the sum.
static inline float pa_exp_shift(float* x, int64_t n, float shift) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX2__)
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = pa_exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  for (int i = 0; i < 8; ++i) s += t[i];
#endif
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    s += x[j];
  }
  return s;
}

// S[m * kBlockKeys + j] = q[m] . K[j] for m < M, j < nb (K [nb, D] fp32).
static inline void pa_qk_block(const float* q, int64_t M, int64_t D, const float* K, int64_t nb,
                               float* S) {
#if defined(__AVX2__)
  const int64_t D8 = D & ~int64_t{7};
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    const float* qa = q + m * D;
    const float* qb = qa + D;
    float* sa = S + m * kBlockKeys;
    float* sb = sa + kBlockKeys;
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
      const float* k0 = K + j * D;
      const float* k1 = k0 + D;
      const float* k2 = k1 + D;
      const float* k3 = k2 + D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t d = 0; d < D8; d += 8) {
        const __m256 va = _mm256_loadu_ps(qa + d), vb = _mm256_loadu_ps(qb + d);
        const __m256 x0 = _mm256_loadu_ps(k0 + d), x1 = _mm256_loadu_ps(k1 + d);
        const __m256 x2 = _mm256_loadu_ps(k2 + d), x3 = _mm256_loadu_ps(k3 + d);
        a0 = _mm256_fmadd_ps(va, x0, a0);
        a1 = _mm256_fmadd_ps(va, x1, a1);
        a2 = _mm256_fmadd_ps(va, x2, a2);
        a3 = _mm256_fmadd_ps(va, x3, a3);
        b0 = _mm256_fmadd_ps(vb, x0, b0);
        b1 = _mm256_fmadd_ps(vb, x1, b1);
        b2 = _mm256_fmadd_ps(vb, x2, b2);
        b3 = _mm256_fmadd_ps(vb, x3, b3);
      }
      _mm_storeu_ps(sa + j, pa_hsum4x8(a0, a1, a2, a3));
      _mm_storeu_ps(sb + j, pa_hsum4x8(b0, b1, b2, b3));
      for (int64_t d = D8; d < D; ++d) {
        for (int i = 0; i < 4; ++i) {
          sa[j + i] += qa[d] * K[(j + i) * D + d];
          sb[j + i] += qb[d] * K[(j + i) * D + d];
        }
      }
    }
    for (; j < nb; ++j) {
      sa[j] = pa_dot(qa, K + j * D, D);
      sb[j] = pa_dot(qb, K + j * D, D);
    }
  }
  for (; m < M; ++m) {
    const float* qa = q + m * D;
    float* sa = S + m * kBlockKeys;
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
      const float* k0 = K + j * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D8; d += 8) {
        const __m256 va = _mm256_loadu_ps(qa + d);
        a0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(k0 + D + d), a1);
        a2 = _mm256_fmadd_ps(va, _mm256_loadu_ps(k0 + 2 * D + d), a2);
        a3 = _mm256_fmadd_ps(va, _mm256_loadu_ps(k0 + 3 * D + d), a3);
      }
      _mm_storeu_ps(sa + j, pa_hsum4x8(a0, a1, a2, a3));
      for (int64_t d = D8; d < D; ++d)
        for (int i = 0; i < 4; ++i) sa[j + i] += qa[d] * K[(j + i) * D + d];
    }
    for (; j < nb; ++j) sa[j] = pa_dot(qa, K + j * D, D);
  }
#else
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < nb; ++j) S[m * kBlockKeys + j] = pa_dot(q + m * D, K + j * D, D);
#endif
}

// acc[m] += sum_{j < cnt[m]} P[m * kBlockKeys + j] * V[j] for every m (V [nb, D] fp32).
static inline void pa_pv_block(const float* P, const int64_t* cnt, int64_t M, const float* V,
                               int64_t D, float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t c = cnt[m];
    if (c <= 0) continue;
    float* am = acc + m * D;
    const float* pm = P + m * kBlockKeys;
    int64_t d = 0;
#if defined(__AVX2__)
    for (; d + 64 <= D; d += 64) {
      __m256 r0 = _mm256_loadu_ps(am + d), r1 = _mm256_loadu_ps(am + d + 8);
      __m256 r2 = _mm256_loadu_ps(am + d + 16), r3 = _mm256_loadu_ps(am + d + 24);
      __m256 r4 = _mm256_loadu_ps(am + d + 32), r5 = _mm256_loadu_ps(am + d + 40);
      __m256 r6 = _mm256_loadu_ps(am + d + 48), r7 = _mm256_loadu_ps(am + d + 56);
      for (int64_t j = 0; j < c; ++j) {
        const __m256 p = _mm256_broadcast_ss(pm + j);
        const float* v = V + j * D + d;
        r0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), r0);
        r1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), r1);
        r2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 16), r2);
        r3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 24), r3);
        r4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 32), r4);
        r5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 40), r5);
        r6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 48), r6);
        r7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 56), r7);
      }
      _mm256_storeu_ps(am + d, r0);
      _mm256_storeu_ps(am + d + 8, r1);
      _mm256_storeu_ps(am + d + 16, r2);
      _mm256_storeu_ps(am + d + 24, r3);
      _mm256_storeu_ps(am + d + 32, r4);
      _mm256_storeu_ps(am + d + 40, r5);
      _mm256_storeu_ps(am + d + 48, r6);
      _mm256_storeu_ps(am + d + 56, r7);
    }
    for (; d + 8 <= D; d += 8) {
      __m256 r0 = _mm256_loadu_ps(am + d);
      for (int64_t j = 0; j < c; ++j)
        r0 = _mm256_fmadd_ps(_mm256_broadcast_ss(pm + j), _mm256_loadu_ps(V + j * D + d), r0);
      _mm256_storeu_ps(am + d, r0);
    }
#endif
    if (d < D) {
      for (int64_t j = 0; j < c; ++j) {
        const float p = pm[j];
        const float* v = V + j * D;
#pragma omp simd
        for (int64_t t = d; t < D; ++t) am[t] += p * v[t];
      }
    }
  }
}

// Per-thread scratch of the work units (reused across calls; grows to the largest unit).
struct PaScratch {
  std::vector<float> kb, vb, s;
  std::vector<int64_t> cnt;
  void reserve(int64_t M, int64_t D) {
    if (static_cast<int64_t>(kb.size()) < kBlockKeys * D) {
      kb.resize(kBlockKeys * D);
      vb.resize(kBlockKeys * D);
    }
    if (static_cast<int64_t>(s.size()) < M * kBlockKeys) s.resize(M * kBlockKeys);
    if (static_cast<int64_t>(cnt.size()) < 2 * M) cnt.resize(2 * M);  // counts, run counts
  }
};

static inline PaScratch& pa_scratch() {
  thread_local PaScratch sc;
  return sc;
}

// Number of keys of block [kb, kb + nb) that query limit `lim` sees.
static inline int64_t pa_visible(int64_t lim, int64_t kb, int64_t nb) {
  return std::clamp<int64_t>(lim - kb + 1, 0, nb);
}

inline void paged_attn_partial_impl(const PagedRow& row, const float* q, const int64_t* lim,
                                    int64_t M, int64_t k0, int64_t k1, float* acc, float* mx,
                                    float* sum) {
  const int64_t D = row.D;
  int64_t max_lim = -1;
  for (int64_t m = 0; m < M; ++m) {
    mx[m] = kNegInf;
    sum[m] = 0.f;
    max_lim = std::max(max_lim, lim[m]);
  }
  std::fill(acc, acc + M * D, 0.f);
  k1 = std::min({k1, row.n, max_lim + 1});  // keys nobody sees are never read
  if (k0 >= k1) return;
  PaScratch& sc = pa_scratch();
  sc.reserve(M, D);
  float* Kb = sc.kb.data();
  float* Vb = sc.vb.data();
  float* S = sc.s.data();
  int64_t* cnt = sc.cnt.data();
  // fp32 pools are read in place, one run of page-contiguous rows at a time (same 32-key
  // blocks, same arithmetic order as the copy): copying every K/V row into scratch first cost
  // more than the attention itself (13% against 7% of a SmolLM2 decode step, perf). 16-bit
  // pools are widened block by block.
  const bool in_place = row.dtype == KvDType::F32;
  const int64_t PS = row.page_size;
  auto rows_at = [&](const void* pool, int64_t j) {
    return static_cast<const float*>(pool) + (row.pages[j / PS] * PS + j % PS) * D;
  };
  for (int64_t kb = k0; kb < k1; kb += kBlockKeys) {
    const int64_t nb = std::min(kBlockKeys, k1 - kb);
    if (kb + nb < k1) {
      const int64_t nn = std::min(kBlockKeys, k1 - kb - nb);
      pa_prefetch_rows(row, row.k_pages, kb + nb, nn);
      pa_prefetch_rows(row, row.v_pages, kb + nb, nn);
    }
    if (in_place) {
      for (int64_t j = 0, run = 0; j < nb; j += run) {
        run = std::min(nb - j, PS - (kb + j) % PS);
        pa_qk_block(q, M, D, rows_at(row.k_pages, kb + j), run, S + j);
      }
    } else {
      pa_load_rows(row, row.k_pages, kb, nb, Kb);
      pa_qk_block(q, M, D, Kb, nb, S);
    }
    bool any = false;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t c = pa_visible(lim[m], kb, nb);
      cnt[m] = c;
      if (c == 0) continue;
      float* sm = S + m * kBlockKeys;
      float bmax = sm[0];
      for (int64_t j = 1; j < c; ++j) bmax = std::max(bmax, sm[j]);
      const float mold = mx[m];
      const float mnew = std::max(mold, bmax);
      const float s = pa_exp_shift(sm, c, mnew);
      if (mold != kNegInf && mold != mnew) {
        const float alpha = std::exp(mold - mnew);
        sum[m] *= alpha;
        float* am = acc + m * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) am[d] *= alpha;
      }
      sum[m] += s;
      mx[m] = mnew;
      any = true;
    }
    if (!any) continue;
    if (in_place) {
      int64_t* rc = cnt + M;  // the visible keys of each query within the run
      for (int64_t j = 0, run = 0; j < nb; j += run) {
        run = std::min(nb - j, PS - (kb + j) % PS);
        for (int64_t m = 0; m < M; ++m) rc[m] = std::clamp<int64_t>(cnt[m] - j, 0, run);
        pa_pv_block(S + j, rc, M, rows_at(row.v_pages, kb + j), D, acc);
      }
    } else {
      pa_load_rows(row, row.v_pages, kb, nb, Vb);
      pa_pv_block(S, cnt, M, Vb, D, acc);
    }
  }
}

inline void paged_attn_scores_impl(const PagedRow& row, const float* q, const int64_t* lim,
                                   const float* lse, int64_t M, int64_t k0, int64_t k1,
                                   float* score_acc) {
  const int64_t D = row.D, PS = row.page_size;
  int64_t max_lim = -1;
  for (int64_t m = 0; m < M; ++m)
    if (lse[m] != kNegInf) max_lim = std::max(max_lim, lim[m]);
  k1 = std::min({k1, row.n, max_lim + 1});
  if (k0 >= k1) return;
  PaScratch& sc = pa_scratch();
  sc.reserve(M, D);
  float* Kb = sc.kb.data();
  float* S = sc.s.data();
  float col[kBlockKeys];
  for (int64_t kb = k0; kb < k1; kb += kBlockKeys) {
    const int64_t nb = std::min(kBlockKeys, k1 - kb);
    if (kb + nb < k1) pa_prefetch_rows(row, row.k_pages, kb + nb, std::min(kBlockKeys, k1 - kb - nb));
    pa_load_rows(row, row.k_pages, kb, nb, Kb);
    pa_qk_block(q, M, D, Kb, nb, S);
    std::fill(col, col + nb, 0.f);
    for (int64_t m = 0; m < M; ++m) {
      if (lse[m] == kNegInf) continue;
      const int64_t c = pa_visible(lim[m], kb, nb);
      if (c == 0) continue;
      float* sm = S + m * kBlockKeys;
      pa_exp_shift(sm, c, lse[m]);
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) col[j] += sm[j];
    }
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t t = kb + j;
      score_acc[static_cast<int64_t>(row.pages[t / PS]) * PS + t % PS] += col[j];
    }
  }
}

inline void paged_attn_merge_impl(const float* acc, const float* mx, const float* sum,
                                  int64_t nsplit, int64_t M, int64_t D, const int64_t* out_idx,
                                  float* out, float* lse) {
  for (int64_t m = 0; m < M; ++m) {
    float* o = out + out_idx[m] * D;
    float mstar = kNegInf;
    for (int64_t s = 0; s < nsplit; ++s) mstar = std::max(mstar, mx[s * M + m]);
    std::fill(o, o + D, 0.f);
    if (mstar == kNegInf) {
      lse[out_idx[m]] = kNegInf;
      continue;
    }
    float L = 0.f;
    for (int64_t s = 0; s < nsplit; ++s) {
      const float ms = mx[s * M + m];
      if (ms == kNegInf) continue;
      const float w = std::exp(ms - mstar);
      L += w * sum[s * M + m];
      const float* a = acc + (s * M + m) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
    }
    const float inv = 1.f / L;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    lse[out_idx[m]] = mstar + std::log(L);
  }
}

inline void merge_states_rows_impl(const float* out_a, const float* lse_a, const float* out_b,
                                   const float* lse_b, float* out, float* lse, int64_t D,
                                   int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float la = lse_a[r], lb = lse_b[r];
    const float m = std::max(la, lb);
    float* o = out + r * D;
    if (m == kNegInf || std::isnan(m)) {  // neither side has a key
      std::fill(o, o + D, 0.f);
      lse[r] = m;
      continue;
    }
    const float wa = la == kNegInf ? 0.f : std::exp(la - m);
    const float wb = lb == kNegInf ? 0.f : std::exp(lb - m);
    const float L = wa + wb, ia = wa / L, ib = wb / L;
    const float* a = out_a + r * D;
    const float* b = out_b + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = ia * a[d] + ib * b[d];
    lse[r] = m + std::log(L);
  }
}

}  // namespace
}  // namespace fastadapt::cpu
