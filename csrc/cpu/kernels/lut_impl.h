// lut_linear kernel bodies, included by one TU per ISA (lut_generic.cpp, lut_avx2.cpp). The
// portable code is the definition of the numerics (lut_format.h); the AVX2 code computes the same
// integers with vpshufb lookups. Internal linkage only (see qdecode_scalar.h for why).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/lut_kernels.h"

namespace fastadapt::cpu {
namespace {

// ---- activation quantization + tables (portable) ------------------------------------------
inline int32_t lut_quant1(float v, float a) {
  if (!(a > 0.f)) return 0;
  const float r = std::nearbyint(v / a);  // round half to even (default rounding mode)
  return static_cast<int32_t>(std::min(127.f, std::max(-127.f, r)));
}

// One chunk's 16 int16 entries from its 4 int8 activations, stored as low/high byte tables.
// Only the 8 entries with bit 3 clear are summed: T[15 - p] = -T[p].
inline void lut_store_table(const int32_t* q, uint8_t* t) {
  for (int p = 0; p < 8; ++p) {
    int32_t v = -q[3];
    for (int e = 0; e < 3; ++e) v += (p >> e & 1) ? q[e] : -q[e];
    const int32_t lo[2] = {v, -v};
    const int idx[2] = {p, 15 - p};
    for (int h = 0; h < 2; ++h) {
      const uint16_t u = static_cast<uint16_t>(static_cast<int16_t>(lo[h]));
      t[idx[h]] = static_cast<uint8_t>(u & 0xFF);
      t[16 + idx[h]] = static_cast<uint8_t>(u >> 8);
    }
  }
}

inline void lut_prepare_impl_scalar(const LutProblem& p, int64_t m0, int64_t m1) {
  const int64_t gs = p.group_size, G = p.groups, K = p.K;
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.x + m * p.x_stride;
    uint8_t* tab = p.tables + m * (K / 4) * 32;
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + g * gs;
      float amax = 0.f;
      for (int64_t k = 0; k < gs; ++k) amax = std::max(amax, std::fabs(xg[k]));
      const float a = amax / 127.f;
      int32_t sum = 0;
      for (int64_t c = 0; c < gs / 4; ++c) {
        int32_t q[4];
        for (int e = 0; e < 4; ++e) {
          q[e] = lut_quant1(xg[4 * c + e], a);
          sum += q[e];
        }
        lut_store_table(q, tab + (g * gs / 4 + c) * 32);
      }
      p.half_scale[m * G + g] = 0.5f * a;
      p.xq_sum[m * G + g] = sum;
    }
  }
}

inline int32_t lut_entry(const uint8_t* t, int idx) {
  return static_cast<int16_t>(static_cast<uint16_t>(t[idx] | (t[16 + idx] << 8)));
}

// ---- gemv (portable): the same integers, one row at a time ----------------------------------
inline void lut_gemv_impl_scalar(const LutProblem& p, int64_t rb0, int64_t rb1) {
  const int64_t K = p.K, gs = p.group_size, G = p.groups, B = p.bits;
  int rows[32];
  for (int j = 0; j < 32; ++j) rows[j] = lut_row_of_byte(j);
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = p.planes + rb * (K / 8) * B * 32;
    const float* sc = p.scales + rb * G * 32;
    const int8_t* zo = p.zoffs ? p.zoffs + rb * G * 32 : nullptr;
    for (int64_t m = 0; m < p.M; ++m) {
      const uint8_t* tab = p.tables + m * (K / 4) * 32;
      float acc[32] = {};
      for (int64_t g = 0; g < G; ++g) {
        int32_t P[32] = {};
        for (int64_t cp = g * gs / 8; cp < (g + 1) * gs / 8; ++cp) {
          const uint8_t* t0 = tab + cp * 64;
          for (int64_t i = 0; i < B; ++i) {
            const uint8_t* w = wp + (cp * B + i) * 32;
            for (int j = 0; j < 32; ++j) {
              const int32_t A = lut_entry(t0, w[j] & 15) + lut_entry(t0 + 32, w[j] >> 4);
              P[rows[j]] += A * (1 << i);
            }
          }
        }
        const int32_t sq = p.xq_sum[m * G + g];
        const float ha = p.half_scale[m * G + g];
        for (int r = 0; r < 32; ++r) {
          const int32_t z = zo ? zo[g * 32 + r] : p.zoff;
          const int32_t I = P[r] + z * sq;
          acc[r] += (sc[g * 32 + r] * ha) * static_cast<float>(I);
        }
      }
      float* y = p.y + m * p.y_stride;
      for (int r = 0; r < 32 && rb * 32 + r < p.N; ++r) {
        const int64_t n = rb * 32 + r;
        y[n] = acc[r] + (p.bias ? p.bias[n] : 0.f);
      }
    }
  }
}

#if defined(__AVX2__)
// ---- AVX2 ---------------------------------------------------------------------------------
inline int32_t lut_hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline void lut_prepare_impl_avx2(const LutProblem& p, int64_t m0, int64_t m1) {
  const int64_t gs = p.group_size, G = p.groups, K = p.K;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // sign patterns: entry p gets +xq_e where bit e of p is set, else -xq_e
  __m256i sgn[4];
  for (int e = 0; e < 4; ++e) {
    alignas(32) int16_t s[16];
    for (int q = 0; q < 16; ++q) s[q] = (q >> e & 1) ? 1 : -1;
    sgn[e] = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
  }
  // within each 128-bit lane: even bytes (low halves) to bytes 0..7, odd (high) to 8..15
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.x + m * p.x_stride;
    uint8_t* tab = p.tables + m * (K / 4) * 32;
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + g * gs;
      __m256 mx = _mm256_setzero_ps();
      for (int64_t k = 0; k < gs; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xg + k), absmask));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float a = _mm_cvtss_f32(m4) / 127.f;
      __m256i vsum = _mm256_setzero_si256();
      const __m256 va = _mm256_set1_ps(a);
      for (int64_t k = 0; k < gs; k += 8) {
        alignas(32) int32_t q[8];
        __m256i qi = _mm256_setzero_si256();
        if (a > 0.f) {
          qi = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xg + k), va));  // half to even
          qi = _mm256_max_epi32(nlim, _mm256_min_epi32(lim, qi));
        }
        vsum = _mm256_add_epi32(vsum, qi);
        _mm256_store_si256(reinterpret_cast<__m256i*>(q), qi);
        for (int c = 0; c < 2; ++c) {
          const int32_t* qc = q + 4 * c;
          __m256i t = _mm256_sign_epi16(_mm256_set1_epi16(static_cast<int16_t>(qc[0])), sgn[0]);
          for (int e = 1; e < 4; ++e)
            t = _mm256_add_epi16(t, _mm256_sign_epi16(_mm256_set1_epi16(static_cast<int16_t>(qc[e])), sgn[e]));
          t = _mm256_shuffle_epi8(t, split);           // [lo0-7 hi0-7 | lo8-15 hi8-15]
          t = _mm256_permute4x64_epi64(t, 0xD8);       // [lo0-15 | hi0-15]
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(tab + ((g * gs + k) / 4 + c) * 32), t);
        }
      }
      p.half_scale[m * G + g] = 0.5f * a;
      p.xq_sum[m * G + g] = lut_hsum_epi32(vsum);
    }
  }
}

// One row block, one row of x. B = bits (compile-time: the plane loop unrolls, accumulators stay
// in registers).
template <int B>
inline void lut_block_avx2(const LutProblem& p, int64_t rb, int64_t m) {
  const int64_t K = p.K, gs = p.group_size, G = p.groups;
  const uint8_t* wp = p.planes + rb * (K / 8) * B * 32;
  const uint8_t* tab = p.tables + m * (K / 4) * 32;
  const float* sc = p.scales + rb * G * 32;
  const int8_t* zo = p.zoffs ? p.zoffs + rb * G * 32 : nullptr;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256 y[4];
  for (int r = 0; r < 4; ++r) y[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i P[4];
    for (int r = 0; r < 4; ++r) P[r] = _mm256_setzero_si256();
    const int64_t cp_end = (g + 1) * gs / 8;
    for (int64_t s = g * gs / 8; s < cp_end; s += kLutChunkPairsPerSpan) {
      const int64_t se = std::min(s + kLutChunkPairsPerSpan, cp_end);
      __m256i acc[B][2];
      for (int i = 0; i < B; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
      for (int64_t cp = s; cp < se; ++cp) {
        const uint8_t* t = tab + cp * 64;
        const __m256i tl0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
        const __m256i th0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
        const __m256i tl1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32)));
        const __m256i th1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 48)));
        const uint8_t* w = wp + cp * B * 32;
        for (int i = 0; i < B; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * 32));
          const __m256i i0 = _mm256_and_si256(v, nib);
          const __m256i i1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
          const __m256i l0 = _mm256_shuffle_epi8(tl0, i0), h0 = _mm256_shuffle_epi8(th0, i0);
          const __m256i l1 = _mm256_shuffle_epi8(tl1, i1), h1 = _mm256_shuffle_epi8(th1, i1);
          // (low byte, high byte) pairs -> exact int16 entries
          acc[i][0] = _mm256_add_epi16(acc[i][0], _mm256_add_epi16(_mm256_unpacklo_epi8(l0, h0),
                                                                   _mm256_unpacklo_epi8(l1, h1)));
          acc[i][1] = _mm256_add_epi16(acc[i][1], _mm256_add_epi16(_mm256_unpackhi_epi8(l0, h0),
                                                                   _mm256_unpackhi_epi8(l1, h1)));
        }
      }
      // widen: planes in pairs (i, i+1) interleaved per row, vpmaddwd by (2^i, 2^(i+1))
      for (int i = 0; i < B; i += 2) {
        const int hiw = i + 1 < B ? (1 << (i + 1)) : 0;
        const __m256i wts = _mm256_set1_epi32((hiw << 16) | (1 << i));
        for (int h = 0; h < 2; ++h) {
          const __m256i a0 = acc[i][h];
          const __m256i a1 = i + 1 < B ? acc[i + 1 < B ? i + 1 : i][h] : _mm256_setzero_si256();
          P[2 * h] = _mm256_add_epi32(P[2 * h], _mm256_madd_epi16(_mm256_unpacklo_epi16(a0, a1), wts));
          P[2 * h + 1] = _mm256_add_epi32(P[2 * h + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(a0, a1), wts));
        }
      }
    }
    const int32_t sq = p.xq_sum[m * G + g];
    const __m256 ha = _mm256_set1_ps(p.half_scale[m * G + g]);
    const __m256i zc = _mm256_set1_epi32(p.zoff * sq);
    for (int r = 0; r < 4; ++r) {
      __m256i I;
      if (zo) {
        const __m256i z = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zo + g * 32 + 8 * r)));
        I = _mm256_add_epi32(P[r], _mm256_mullo_epi32(z, _mm256_set1_epi32(sq)));
      } else {
        I = _mm256_add_epi32(P[r], zc);
      }
      const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(sc + g * 32 + 8 * r), ha);
      y[r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(I), y[r]);
    }
  }
  float* yo = p.y + m * p.y_stride + rb * 32;
  const int64_t nvalid = std::min<int64_t>(32, p.N - rb * 32);
  alignas(32) float tmp[32];
  float* dst = nvalid == 32 ? yo : tmp;
  for (int r = 0; r < 4; ++r) {
    __m256 v = y[r];
    if (p.bias && nvalid == 32) v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias + rb * 32 + 8 * r));
    _mm256_storeu_ps(dst + 8 * r, v);
  }
  if (nvalid < 32)
    for (int64_t r = 0; r < nvalid; ++r) yo[r] = tmp[r] + (p.bias ? p.bias[rb * 32 + r] : 0.f);
}

inline void lut_gemv_impl_avx2(const LutProblem& p, int64_t rb0, int64_t rb1) {
  for (int64_t rb = rb0; rb < rb1; ++rb)
    for (int64_t m = 0; m < p.M; ++m) {
      switch (p.bits) {
        case 1: lut_block_avx2<1>(p, rb, m); break;
        case 2: lut_block_avx2<2>(p, rb, m); break;
        case 3: lut_block_avx2<3>(p, rb, m); break;
        default: lut_block_avx2<4>(p, rb, m); break;
      }
    }
}
#endif  // __AVX2__

}  // namespace
}  // namespace fastadapt::cpu
