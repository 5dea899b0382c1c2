// Loads and stores of fp32 / fp16 / bf16 elements as fp32, scalar and (in TUs built with AVX2 and
// F16C) 8 at a time. Stores round to nearest even, as torch's conversions do (NaN stays NaN; bf16
// NaN is stored as torch does, 0x7FC0). Internal linkage only (static / anonymous namespace):
// TUs built with different ISA flags include this, see qdecode_scalar.h.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastadapt::cpu {
namespace {

// Storage types of the 16-bit elements (bit patterns; no arithmetic on them).
struct Fp16 { uint16_t bits; };
struct Bf16 { uint16_t bits; };

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half -> float, branch-free: normal halves are rebiased by one multiply; subnormal halves
// are built as a float with the mantissa in its low bits minus the matching power of two.
inline float fp16_bits_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // sign shifted out
  // exponent and mantissa into float position, exponent rebiased by 2^-112 (inf/NaN stay so,
  // because (0x1F + 0x70) << 23 scaled by 2^-112 lands on the float inf/NaN exponent)
  const float normal = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = two_w < (1u << 27) ? f32_bits(subnormal) : f32_bits(normal);
  return f32_from_bits(sign | mag);
}

// float -> IEEE half, round to nearest even, branch-free: the magnitude is scaled so that the
// float adder rounds the mantissa at the half's precision (also for half subnormals), overflow
// goes to inf, NaN to the quiet NaN 0x7E00.
inline uint16_t f32_to_fp16_bits(float f) {
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;  // overflow -> inf
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;  // half subnormals share one rounding position
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mant_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mant_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// IEEE half bits -> float: the F16C instruction in TUs built with it, else the portable path.
inline float half_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return fp16_bits_to_f32(h);
#endif
}

inline float bf16_bits_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float load_f32(const float* p) { return *p; }
inline float load_f32(const Bf16* p) { return bf16_bits_to_f32(p->bits); }
inline void store_f32(float* p, float v) { *p = v; }
#if defined(__F16C__)
inline float load_f32(const Fp16* p) { return _cvtsh_ss(p->bits); }
inline void store_f32(Fp16* p, float v) { p->bits = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
#else
inline float load_f32(const Fp16* p) { return fp16_bits_to_f32(p->bits); }
inline void store_f32(Fp16* p, float v) { p->bits = f32_to_fp16_bits(v); }
#endif
inline void store_f32(Bf16* p, float v) { p->bits = f32_to_bf16_bits(v); }

#if defined(__AVX2__) && defined(__F16C__)
// 8 elements at a time (unaligned).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Fp16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const Bf16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(Fp16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(Bf16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // 32 -> 16 bits: packus works per 128-bit lane, so gather lanes 0 and 2 afterwards
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#endif

}  // namespace
}  // namespace fastadapt::cpu
