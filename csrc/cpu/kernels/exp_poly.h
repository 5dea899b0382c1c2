// fp32 exp for the CPU kernels: exp(x) = 2^n * P(r), n = round(x / ln 2), r = x - n ln 2 (two-part
// ln 2, so r is exact to ~1e-11), P the degree-6 minimax polynomial of e^r on [-ln2/2, ln2/2] for
// relative error (coefficients from scripts/fit_exp_poly.py: 1.7e-8 with fp32 coefficients).
// 2^n is applied as two factors 2^(n/2) * 2^(n - n/2), so the whole range works without special
// cases: results below FLT_MIN come out as correctly scaled subnormals, x > ln(FLT_MAX) overflows
// to +inf, x < -104 gives 0, NaN stays NaN. tests/test_rope_swiglu.py measures it through
// silu_mul: within 4 ulp of float64 wherever the result is a normal float (3.3 ulp measured).
// Internal linkage only, see elem_convert.h.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace fastadapt::cpu {
namespace {

constexpr float kExpLog2e = 1.44269504088896341f;
constexpr float kExpLn2Hi = 0.693359375f;         // 355/512: n * kExpLn2Hi is exact for |n| < 2^15
constexpr float kExpLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kExpLn2Hi
constexpr float kExpMin = -104.f;  // e^-104 < FLT_TRUE_MIN / 2: rounds to 0
constexpr float kExpMax = 89.f;    // e^89 > FLT_MAX: overflows to inf in the last multiply
constexpr float kExpC0 = 1.0f, kExpC1 = 1.0f, kExpC2 = 0.49999991059303284f,
                kExpC3 = 0.16666419804096222f, kExpC4 = 0.04166822507977486f,
                kExpC5 = 0.008374815806746483f, kExpC6 = 0.0013836845755577087f;

// e^x = (p * s1) * s2 (see the file comment). m * e^x computed as ((m * p) * s1) * s2 rounds once
// at the end even when e^x alone would be subnormal (and lose bits) but m * e^x is not.
struct ExpParts {
  float p, s1, s2;
};

inline ExpParts exp_poly_parts(float x) {
  // clamp (comparisons are false for NaN, which passes through)
  x = x < kExpMin ? kExpMin : x;
  x = x > kExpMax ? kExpMax : x;
  // round to nearest with the 1.5 * 2^23 trick (|x log2e| < 2^22); no libm call, vectorisable
  const float nf = (x * kExpLog2e + 12582912.f) - 12582912.f;
  float r = x - nf * kExpLn2Hi;
  r = r - nf * kExpLn2Lo;
  float p = kExpC6;
  p = p * r + kExpC5;
  p = p * r + kExpC4;
  p = p * r + kExpC3;
  p = p * r + kExpC2;
  p = p * r + kExpC1;
  p = p * r + kExpC0;
  const int32_t n = nf == nf ? static_cast<int32_t>(nf) : 0;  // NaN: p is NaN already
  const int32_t n1 = n >> 1, n2 = n - n1;                      // each in [-75, 64]
  const uint32_t b1 = static_cast<uint32_t>(n1 + 127) << 23, b2 = static_cast<uint32_t>(n2 + 127) << 23;
  ExpParts e{p, 0.f, 0.f};
  std::memcpy(&e.s1, &b1, 4);
  std::memcpy(&e.s2, &b2, 4);
  return e;
}

inline float exp_poly(float x) {
  const ExpParts e = exp_poly_parts(x);
  return e.p * e.s1 * e.s2;
}

#if defined(__AVX2__) && defined(__FMA__)
struct ExpParts8 {
  __m256 p, s1, s2;
};

inline ExpParts8 exp_poly8_parts(__m256 x) {
  // min/max return their second operand when either is NaN: NaN passes through
  x = _mm256_min_ps(_mm256_set1_ps(kExpMax), x);
  x = _mm256_max_ps(_mm256_set1_ps(kExpMin), x);
  const __m256 nf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kExpLog2e)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(kExpLn2Hi), x);
  r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(kExpLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC6);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC0));
  const __m256i n = _mm256_cvtps_epi32(nf);  // NaN lanes: garbage scale, but p is NaN
  const __m256i n1 = _mm256_srai_epi32(n, 1);
  const __m256i n2 = _mm256_sub_epi32(n, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return {p, s1, s2};
}

inline __m256 exp_poly8(__m256 x) {
  const ExpParts8 e = exp_poly8_parts(x);
  return _mm256_mul_ps(_mm256_mul_ps(e.p, e.s1), e.s2);
}
#endif

}  // namespace
}  // namespace fastadapt::cpu
