// Block-sparse prefill attention and pattern-estimator kernel bodies, included by one TU per ISA
// (block_sparse_generic.cpp, block_sparse_avx2.cpp). Internal linkage only (an inline definition
// shared between the two TUs could resolve to the AVX2 build on a CPU without it).
//
// Work unit: one query block (up to 64 queries) of one head. Its queries are packed once,
// pre-scaled, transposed (Qt [D][64]), so the logits of a 64-key tile come out transposed too,
// St [key][query]: the QK^T micro-kernel broadcasts one key element and multiplies it into two
// registers of 16 queries (6 keys x 16 queries of accumulators), the online softmax runs down the
// key axis with 8 queries per register (max, exp, sums: no horizontal reductions), and the PV
// micro-kernel broadcasts P[key][query] against 16 output columns of 6 queries. The K and V rows
// of a block are read in place (row stride Hkv * D); vertical columns are gathered into a tile
// of up to 64 keys; diagonals (key = query position - o) are a tile whose key differs per query.
// Union semantics with no double counting: a column inside a listed block, or a diagonal key
// inside a listed block or on a listed column, is masked out of that tile.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/block_sparse_kernels.h"
#include "cpu/kernels/exp_poly.h"

namespace fastadapt::cpu {
namespace {

constexpr int64_t kB = kBsBlock;  // 64: queries per work unit and keys per tile
constexpr float kBsNegInf = -std::numeric_limits<float>::infinity();

// Scratch of one thread (floats): Qt [D][64], Qr [64][D], St [64][64], O [64][D], mx, l, alpha
// [64] each, Kb, Vb [64][D], key indices of a diagonal tile [64][64] (int32), block bitmap [nkb].
struct BsScratch {
  float *qt, *qr, *st, *o, *mx, *l, *alpha, *kb, *vb;
  int32_t* keyidx;
  uint8_t* blk;
};

inline int64_t bs_scratch_floats_impl(int64_t D, int64_t nkb) {
  return 5 * kB * D + 2 * kB * kB + 3 * kB + nkb + 64;
}

inline BsScratch bs_carve(float* s, int64_t D) {
  BsScratch c;
  c.qt = s;
  c.qr = c.qt + kB * D;
  c.st = c.qr + kB * D;
  c.o = c.st + kB * kB;
  c.mx = c.o + kB * D;
  c.l = c.mx + kB;
  c.alpha = c.l + kB;
  c.kb = c.alpha + kB;
  c.vb = c.kb + kB * D;
  c.keyidx = reinterpret_cast<int32_t*>(c.vb + kB * D);
  c.blk = reinterpret_cast<uint8_t*>(c.keyidx + kB * kB);
  return c;
}

// ---- micro-kernels ---------------------------------------------------------------------------

#if defined(__AVX2__)
// St[j][m] = sum_d K[j][d] Qt[d][m] for JR keys (rows ks apart) and queries m < Mc (Mc % 16 == 0).
template <int JR>
inline void bs_qk_jr(const float* K, int64_t ks, const float* Qt, int64_t D, int64_t m_begin, int64_t Mc,
                     float* St) {
  for (int64_t m0 = m_begin; m0 < Mc; m0 += 16) {
    __m256 c0[JR], c1[JR];
#pragma GCC unroll 8
    for (int jj = 0; jj < JR; ++jj) {
      c0[jj] = _mm256_setzero_ps();
      c1[jj] = _mm256_setzero_ps();
    }
    const float* qd = Qt + m0;
    for (int64_t d = 0; d < D; ++d, qd += kB) {
      const __m256 a0 = _mm256_loadu_ps(qd), a1 = _mm256_loadu_ps(qd + 8);
#pragma GCC unroll 8
      for (int jj = 0; jj < JR; ++jj) {
        const __m256 b = _mm256_broadcast_ss(K + jj * ks + d);
        c0[jj] = _mm256_fmadd_ps(b, a0, c0[jj]);
        c1[jj] = _mm256_fmadd_ps(b, a1, c1[jj]);
      }
    }
#pragma GCC unroll 8
    for (int jj = 0; jj < JR; ++jj) {
      _mm256_storeu_ps(St + jj * kB + m0, c0[jj]);
      _mm256_storeu_ps(St + jj * kB + m0 + 8, c1[jj]);
    }
  }
}

// O[m0 + mm][d] += sum_j P[j][m0 + mm] V[j][d] for MR queries.
template <int MR>
inline void bs_pv_mr(const float* P, int64_t nb, const float* V, int64_t vs, int64_t D, float* O,
                     int64_t m0) {
  const int64_t D16 = D & ~int64_t{15};
  for (int64_t d = 0; d < D16; d += 16) {
    __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
    for (int mm = 0; mm < MR; ++mm) {
      c0[mm] = _mm256_loadu_ps(O + (m0 + mm) * D + d);
      c1[mm] = _mm256_loadu_ps(O + (m0 + mm) * D + d + 8);
    }
    for (int64_t j = 0; j < nb; ++j) {
      const float* vj = V + j * vs + d;
      const __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_loadu_ps(vj + 8);
      const float* pj = P + j * kB + m0;
#pragma GCC unroll 8
      for (int mm = 0; mm < MR; ++mm) {
        const __m256 p = _mm256_broadcast_ss(pj + mm);
        c0[mm] = _mm256_fmadd_ps(p, v0, c0[mm]);
        c1[mm] = _mm256_fmadd_ps(p, v1, c1[mm]);
      }
    }
#pragma GCC unroll 8
    for (int mm = 0; mm < MR; ++mm) {
      _mm256_storeu_ps(O + (m0 + mm) * D + d, c0[mm]);
      _mm256_storeu_ps(O + (m0 + mm) * D + d + 8, c1[mm]);
    }
  }
  if (D16 < D) {
    for (int mm = 0; mm < MR; ++mm) {
      float* om = O + (m0 + mm) * D;
      for (int64_t j = 0; j < nb; ++j) {
        const float p = P[j * kB + m0 + mm];
        const float* vj = V + j * vs;
        for (int64_t d = D16; d < D; ++d) om[d] += p * vj[d];
      }
    }
  }
}
#endif

// A tile needs no causal limit: every key may be seen by every query.
constexpr int64_t kNoCausal = int64_t{1} << 40;

// St[j][m] = K[j] . Q[m] (pre-scaled) for j < nb, m < Mc. Causal tiles (query m sees key j iff
// j <= m + d0) skip the entries no query sees; the caller masks them (-inf) afterwards.
inline void bs_qk_tile(const float* K, int64_t ks, int64_t nb, const float* Qt, int64_t D, int64_t Mc,
                       float* St, int64_t d0 = kNoCausal) {
#if defined(__AVX2__)
  // first 16-query chunk in which some query sees key j: smallest m0 with m0 + 15 + d0 >= j
  auto mb = [&](int64_t j) { return j - d0 <= 0 ? int64_t{0} : (j - d0) / 16 * 16; };
  int64_t j = 0;
  for (; j + 6 <= nb; j += 6) bs_qk_jr<6>(K + j * ks, ks, Qt, D, mb(j), Mc, St + j * kB);
  switch (nb - j) {
    case 5: bs_qk_jr<5>(K + j * ks, ks, Qt, D, mb(j), Mc, St + j * kB); break;
    case 4: bs_qk_jr<4>(K + j * ks, ks, Qt, D, mb(j), Mc, St + j * kB); break;
    case 3: bs_qk_jr<3>(K + j * ks, ks, Qt, D, mb(j), Mc, St + j * kB); break;
    case 2: bs_qk_jr<2>(K + j * ks, ks, Qt, D, mb(j), Mc, St + j * kB); break;
    case 1: bs_qk_jr<1>(K + j * ks, ks, Qt, D, mb(j), Mc, St + j * kB); break;
    default: break;
  }
#else
  for (int64_t j = 0; j < nb; ++j) {
    float* sj = St + j * kB;
    const int64_t m_lo = std::min(Mc, std::max<int64_t>(0, j - d0));
    for (int64_t m = m_lo; m < Mc; ++m) sj[m] = 0.f;
    const float* kj = K + j * ks;
    for (int64_t d = 0; d < D; ++d) {
      const float kd = kj[d];
      const float* qd = Qt + d * kB;
#pragma omp simd
      for (int64_t m = m_lo; m < Mc; ++m) sj[m] += kd * qd[m];
    }
  }
#endif
}

// O[m] += sum_j P[j][m] V[j] for m < Mc (V rows vs apart). Causal tiles (see bs_qk_tile) stop
// each group of queries at the last key it sees (the rest of P is exactly 0).
inline void bs_pv_tile(const float* P, int64_t nb, const float* V, int64_t vs, int64_t D, int64_t Mc,
                       float* O, int64_t d0 = kNoCausal) {
#if defined(__AVX2__)
  auto ne = [&](int64_t m, int64_t mr) {
    const int64_t e = m + mr + d0;
    return e < 0 ? int64_t{0} : (e > nb ? nb : e);
  };
  int64_t m = 0;
  for (; m + 6 <= Mc; m += 6) bs_pv_mr<6>(P, ne(m, 6), V, vs, D, O, m);
  switch (Mc - m) {
    case 5: bs_pv_mr<5>(P, ne(m, 5), V, vs, D, O, m); break;
    case 4: bs_pv_mr<4>(P, ne(m, 4), V, vs, D, O, m); break;
    case 3: bs_pv_mr<3>(P, ne(m, 3), V, vs, D, O, m); break;
    case 2: bs_pv_mr<2>(P, ne(m, 2), V, vs, D, O, m); break;
    case 1: bs_pv_mr<1>(P, ne(m, 1), V, vs, D, O, m); break;
    default: break;
  }
#else
  for (int64_t m = 0; m < Mc; ++m) {
    float* om = O + m * D;
    for (int64_t j = 0; j < nb; ++j) {
      const float p = P[j * kB + m];
      if (p == 0.f) continue;
      const float* vj = V + j * vs;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) om[d] += p * vj[d];
    }
  }
#endif
}

// Online-softmax step over a tile St [nb][Mc] (masked logits are -inf): St becomes the tile's
// probabilities relative to the new running max, l and O are rescaled, mx updated.
inline void bs_softmax_tile(float* St, int64_t nb, int64_t Mc, float* mx, float* l, float* alpha,
                            float* O, int64_t D) {
  int64_t m = 0;
#if defined(__AVX2__)
  const __m256 ninf = _mm256_set1_ps(kBsNegInf);
  for (; m + 8 <= Mc; m += 8) {
    __m256 bmax = ninf;
    for (int64_t j = 0; j < nb; ++j) bmax = _mm256_max_ps(bmax, _mm256_loadu_ps(St + j * kB + m));
    const __m256 mo = _mm256_loadu_ps(mx + m);
    const __m256 mn = _mm256_max_ps(mo, bmax);
    // a query with no visible key yet keeps max -inf: shift by 0 so exp gives 0, not NaN
    const __m256 safe = _mm256_blendv_ps(mn, _mm256_setzero_ps(), _mm256_cmp_ps(mn, ninf, _CMP_EQ_OQ));
    const __m256 al = exp_poly8(_mm256_sub_ps(mo, safe));
    __m256 s = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; ++j) {
      const __m256 e = exp_poly8(_mm256_sub_ps(_mm256_loadu_ps(St + j * kB + m), safe));
      _mm256_storeu_ps(St + j * kB + m, e);
      s = _mm256_add_ps(s, e);
    }
    _mm256_storeu_ps(l + m, _mm256_fmadd_ps(_mm256_loadu_ps(l + m), al, s));
    _mm256_storeu_ps(mx + m, mn);
    _mm256_storeu_ps(alpha + m, al);
  }
#endif
  for (; m < Mc; ++m) {
    float bmax = kBsNegInf;
    for (int64_t j = 0; j < nb; ++j) bmax = std::max(bmax, St[j * kB + m]);
    const float mn = std::max(mx[m], bmax);
    const float safe = mn == kBsNegInf ? 0.f : mn;
    const float al = exp_poly(mx[m] - safe);
    float s = 0.f;
    for (int64_t j = 0; j < nb; ++j) {
      const float e = exp_poly(St[j * kB + m] - safe);
      St[j * kB + m] = e;
      s += e;
    }
    l[m] = l[m] * al + s;
    mx[m] = mn;
    alpha[m] = al;
  }
  for (int64_t q = 0; q < Mc; ++q) {
    const float al = alpha[q];
    if (al == 1.f) continue;
    float* oq = O + q * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) oq[d] *= al;
  }
}

inline float bs_dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#if defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; d + 16 <= D; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), a1);
  }
  a0 = _mm256_add_ps(a0, a1);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  s = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
#endif
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// true when key j is one of the sorted columns cols[0, n)
inline bool bs_in_cols(const int32_t* cols, int64_t n, int64_t j) {
  int64_t lo = 0, hi = n;  // hand-written: a std:: algorithm instantiated here would be weak
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cols[mid] < j) lo = mid + 1; else hi = mid;
  }
  return lo < n && cols[lo] == j;
}

// ---- attention -------------------------------------------------------------------------------

inline void bs_attn_row(const BsAttnArgs& a, const BsRow& row, const BsScratch& sc) {
  const int64_t D = a.D, Hq = a.Hq, Hkv = a.Hkv;
  const int64_t b = row.b, h = row.h, r = row.r;
  const int64_t q0 = a.q_indptr[b], T = a.q_indptr[b + 1] - q0;
  const int64_t k0 = a.k_indptr[b], Tk = a.k_indptr[b + 1] - k0;
  const int64_t off = Tk - T;  // position of query i is off + i
  const int64_t i0 = r * kB, M = std::min(kB, T - i0);
  const int64_t Mc = (M + 15) / 16 * 16;
  const int64_t p_first = off + i0, p_last = off + i0 + M - 1;
  const int64_t hk = h / (Hq / Hkv);
  const int64_t ks = Hkv * D;  // row stride of k and v
  const float* kh = a.k + (k0 * Hkv + hk) * D;
  const float* vh = a.v + (k0 * Hkv + hk) * D;
  const int64_t nkb = (Tk + kB - 1) / kB;

  // pack the queries (pre-scaled): Qt [D][64] for the tiles, Qr [64][D] for the diagonal dots
  std::fill(sc.qt, sc.qt + D * kB, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* qm = a.q + ((q0 + i0 + m) * Hq + h) * D;
    float* qr = sc.qr + m * D;
    for (int64_t d = 0; d < D; ++d) {
      const float x = qm[d] * a.scale;
      qr[d] = x;
      sc.qt[d * kB + m] = x;
    }
  }
  std::fill(sc.mx, sc.mx + kB, kBsNegInf);
  std::fill(sc.l, sc.l + kB, 0.f);
  std::fill(sc.o, sc.o + kB * D, 0.f);
  std::memset(sc.blk, 0, static_cast<size_t>(nkb));

  float* St = sc.st;
  // blocks
  const int32_t* bc = a.col_idx + a.row_ptr[row.row];
  const int64_t nbk = a.row_ptr[row.row + 1] - a.row_ptr[row.row];
  for (int64_t t = 0; t < nbk; ++t) {
    const int64_t c = bc[t];
    sc.blk[c] = 1;
    const int64_t ks0 = c * kB;
    if (ks0 > p_last) continue;  // above the causal diagonal for every query of the block
    const int64_t nb = std::min(kB, Tk - ks0);
    const bool diag = ks0 + nb - 1 > p_first;  // the tile crosses the diagonal
    const int64_t d0 = diag ? p_first - ks0 : kNoCausal;  // query m sees key j iff j <= m + d0
    bs_qk_tile(kh + ks0 * ks, ks, nb, sc.qt, D, Mc, St, d0);
    if (diag) {  // causal mask
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t m_min = ks0 + j - off - i0;  // first query (index in block) that sees key j
        for (int64_t m = 0; m < std::min(m_min, Mc); ++m) St[j * kB + m] = kBsNegInf;
      }
    }
    bs_softmax_tile(St, nb, Mc, sc.mx, sc.l, sc.alpha, sc.o, D);
    bs_pv_tile(St, nb, vh + ks0 * ks, ks, D, Mc, sc.o, d0);
  }
  // vertical columns outside the listed blocks, gathered 64 at a time
  const int32_t* cols = nullptr;
  int64_t ncols = 0;
  if (a.col_indptr) {
    const int64_t bh = b * Hq + h;
    cols = a.cols + a.col_indptr[bh];
    ncols = a.col_indptr[bh + 1] - a.col_indptr[bh];
    int64_t t = 0;
    int32_t kidx[kB];
    while (t < ncols) {
      int64_t nb = 0;
      for (; t < ncols && nb < kB; ++t) {
        const int64_t j = cols[t];
        if (j > p_last) {
          t = ncols;
          break;
        }
        if (sc.blk[j / kB]) continue;
        kidx[nb++] = static_cast<int32_t>(j);
      }
      if (nb == 0) break;
      for (int64_t j = 0; j < nb; ++j) {
        std::memcpy(sc.kb + j * D, kh + kidx[j] * ks, static_cast<size_t>(D) * 4);
        std::memcpy(sc.vb + j * D, vh + kidx[j] * ks, static_cast<size_t>(D) * 4);
      }
      bs_qk_tile(sc.kb, D, nb, sc.qt, D, Mc, St);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t m_min = kidx[j] - off - i0;
        for (int64_t m = 0; m < std::min(m_min, Mc); ++m) St[j * kB + m] = kBsNegInf;
      }
      bs_softmax_tile(St, nb, Mc, sc.mx, sc.l, sc.alpha, sc.o, D);
      bs_pv_tile(St, nb, sc.vb, D, D, Mc, sc.o);
    }
  }
  // diagonals: key = pos - o differs per query; tiles of up to 64 offsets
  if (a.diag_indptr) {
    const int64_t bh = b * Hq + h;
    const int32_t* dg = a.diags + a.diag_indptr[bh];
    const int64_t nd = a.diag_indptr[bh + 1] - a.diag_indptr[bh];
    for (int64_t t0 = 0; t0 < nd; t0 += kB) {
      const int64_t nb = std::min(kB, nd - t0);
      if (dg[t0] > p_last) break;
      bool any = false;
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t o = dg[t0 + j];
        float* sj = St + j * kB;
        int32_t* kj = sc.keyidx + j * kB;
        for (int64_t m = 0; m < Mc; ++m) {
          const int64_t key = p_first + m - o;
          if (m >= M || key < 0 || sc.blk[key / kB] || (ncols && bs_in_cols(cols, ncols, key))) {
            sj[m] = kBsNegInf;
            kj[m] = -1;
          } else {
            sj[m] = bs_dot(sc.qr + m * D, kh + key * ks, D);
            kj[m] = static_cast<int32_t>(key);
            any = true;
          }
        }
      }
      if (!any) continue;
      bs_softmax_tile(St, nb, Mc, sc.mx, sc.l, sc.alpha, sc.o, D);
      for (int64_t j = 0; j < nb; ++j) {
        for (int64_t m = 0; m < M; ++m) {
          const int32_t key = sc.keyidx[j * kB + m];
          if (key < 0) continue;
          const float p = St[j * kB + m];
          const float* vr = vh + key * ks;
          float* om = sc.o + m * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) om[d] += p * vr[d];
        }
      }
    }
  }
  // normalise and write
  for (int64_t m = 0; m < M; ++m) {
    float* o = a.out + ((q0 + i0 + m) * Hq + h) * D;
    float* lse = a.lse + (q0 + i0 + m) * Hq + h;
    const float L = sc.l[m];
    if (!(L > 0.f)) {
      std::fill(o, o + D, 0.f);
      *lse = kBsNegInf;
      continue;
    }
    const float inv = 1.f / L;
    const float* om = sc.o + m * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = om[d] * inv;
    *lse = sc.mx[m] + std::log(L);
  }
}

inline void bs_attn_rows_impl(const BsAttnArgs& a, const BsRow* rows, int64_t i0, int64_t i1,
                              float* scratch) {
  const BsScratch sc = bs_carve(scratch, a.D);
  for (int64_t i = i0; i < i1; ++i) bs_attn_row(a, rows[i], sc);
}

// ---- estimators ------------------------------------------------------------------------------

inline void vs_scores_head_impl(const float* q, const float* k, int64_t T, int64_t Tk, int64_t Hq,
                                int64_t Hkv, int64_t D, float scale, int64_t n_last, int64_t h,
                                float* vert, float* slash, float* scratch) {
  const int64_t n = std::min(std::min(n_last, T), kB);
  const int64_t Mc = (n + 15) / 16 * 16;
  const int64_t off = Tk - T, i0 = T - n;  // the last n queries, positions off + i0 + m
  const int64_t hk = h / (Hq / Hkv), ks = Hkv * D;
  const float* kh = k + hk * D;
  float* qt = scratch;
  float* St = qt + D * kB;
  float* mx = St + kB * kB;
  float* l = mx + kB;
  float* vrow = vert + h * Tk;
  float* srow = slash + h * Tk;
  std::fill(vrow, vrow + Tk, 0.f);
  std::fill(srow, srow + Tk, 0.f);
  if (n <= 0) return;
  std::fill(qt, qt + D * kB, 0.f);
  for (int64_t m = 0; m < n; ++m) {
    const float* qm = q + ((i0 + m) * Hq + h) * D;
    for (int64_t d = 0; d < D; ++d) qt[d * kB + m] = qm[d] * scale;
  }
  const int64_t p_first = off + i0, p_last = off + T - 1;
  auto tile = [&](int64_t ks0, int64_t nb) {
    bs_qk_tile(kh + ks0 * ks, ks, nb, qt, D, Mc, St);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t m_min = std::max<int64_t>(0, ks0 + j - p_first);
      for (int64_t m = 0; m < Mc; ++m)
        if (m < m_min || m >= n) St[j * kB + m] = kBsNegInf;
    }
  };
  // pass 1: row max and sum of every query (the online-softmax step with no output: D = 0)
  float* alpha = l + kB;
  std::fill(mx, mx + kB, kBsNegInf);
  std::fill(l, l + kB, 0.f);
  for (int64_t ks0 = 0; ks0 <= p_last; ks0 += kB) {
    const int64_t nb = std::min(kB, Tk - ks0);
    tile(ks0, nb);
    bs_softmax_tile(St, nb, Mc, mx, l, alpha, nullptr, 0);
  }
  for (int64_t m = 0; m < Mc; ++m) mx[m] = m < n ? mx[m] + std::log(l[m]) : 0.f;  // row LSE
  // pass 2: normalised probabilities summed per key column and per diagonal
  for (int64_t ks0 = 0; ks0 <= p_last; ks0 += kB) {
    const int64_t nb = std::min(kB, Tk - ks0);
    tile(ks0, nb);
    for (int64_t j = 0; j < nb; ++j) {
      float* sj = St + j * kB;
      int64_t m = 0;
#if defined(__AVX2__)
      for (; m + 8 <= Mc; m += 8)
        _mm256_storeu_ps(sj + m, exp_poly8(_mm256_sub_ps(_mm256_loadu_ps(sj + m), _mm256_loadu_ps(mx + m))));
#endif
      for (; m < Mc; ++m) sj[m] = exp_poly(sj[m] - mx[m]);  // masked: exp(-inf) = 0
      const int64_t key = ks0 + j;
      float cs = 0.f;
      const int64_t m0 = std::max<int64_t>(0, key - p_first);  // first query that sees the key
      float* sl = srow + (p_first + m0 - key);  // query m adds to diagonal p_first + m - key
      for (int64_t q = m0; q < n; ++q) {
        cs += sj[q];
        sl[q - m0] += sj[q];
      }
      vrow[key] += cs;
    }
  }
}

inline void block_pool_head_impl(const float* q, const float* k, int64_t T, int64_t Tk, int64_t Hq,
                                 int64_t Hkv, int64_t D, float scale, int64_t h, float* scores,
                                 float* scratch) {
  const int64_t nqb = (T + kB - 1) / kB, nkb = (Tk + kB - 1) / kB;
  const int64_t off = Tk - T, hk = h / (Hq / Hkv);
  float* qm = scratch;       // [nqb][D]
  float* km = qm + nqb * D;  // [nkb][D]
  for (int64_t r = 0; r < nqb; ++r) {
    float* dst = qm + r * D;
    std::fill(dst, dst + D, 0.f);
    const int64_t e = std::min(T, (r + 1) * kB);
    for (int64_t i = r * kB; i < e; ++i) {
      const float* src = q + (i * Hq + h) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    }
    const float inv = scale / static_cast<float>(e - r * kB);  // mean, and the softmax scale
    for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
  }
  for (int64_t c = 0; c < nkb; ++c) {
    float* dst = km + c * D;
    std::fill(dst, dst + D, 0.f);
    const int64_t e = std::min(Tk, (c + 1) * kB);
    for (int64_t j = c * kB; j < e; ++j) {
      const float* src = k + (j * Hkv + hk) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    }
    const float inv = 1.f / static_cast<float>(e - c * kB);
    for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
  }
  float* out = scores + h * nqb * nkb;
  for (int64_t r = 0; r < nqb; ++r) {
    const int64_t p_last = off + std::min(T, (r + 1) * kB) - 1;
    for (int64_t c = 0; c < nkb; ++c)
      out[r * nkb + c] = c * kB <= p_last ? bs_dot(qm + r * D, km + c * D, D) : kBsNegInf;
  }
}

}  // namespace
}  // namespace fastadapt::cpu
