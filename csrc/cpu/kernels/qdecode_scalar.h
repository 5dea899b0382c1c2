// Scalar pieces shared by every ISA's qlinear kernel: fp16/bf16 widening and the affine map
// w = a[h] * code + b[h] of each 32-code chunk (h: which 16-value half). Everything here has
// internal linkage (static) because TUs built with different ISA flags include it: a shared
// inline definition could be resolved to the AVX2 build and run on a CPU without AVX2.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu/kernels/elem_convert.h"
#include "cpu/kernels/qlinear_kernels.h"

namespace fastadapt::cpu {

static inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

static inline float load_scale(const QLinearProblem& p, int64_t index) {
  switch (p.scale_type) {
    case ScaleType::F32: return static_cast<const float*>(p.scales)[index];
    case ScaleType::F16: return half_to_f32(static_cast<const uint16_t*>(p.scales)[index]);
    case ScaleType::BF16: return bf16_bits_to_f32(static_cast<const uint16_t*>(p.scales)[index]);
  }
  return 0.f;
}

// 8-bit formats decode to signed codes (code - 128 for int8, the stored int8 for Q8_0) so that
// the int8 path can use the sign trick without 16-bit overflow; their offsets b account for it.
template <QFormat F> constexpr bool kSignedCodes = (F == QFormat::INT8 || F == QFormat::Q8_0);
template <QFormat F> constexpr bool is_gguf_format = static_cast<int32_t>(F) >= 100;
// Only Q6_K changes scale inside a 32-value chunk.
template <QFormat F> constexpr bool kHalfScales = (F == QFormat::Q6_K);

// Q4_K packs eight 6-bit (scale, min) pairs into 12 bytes.
static inline void q4k_scale_min(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Affine map of chunk c (values 32c .. 32c+31) of weight row n, whose bytes start at `row`;
// g is the chunk's group within the row (int formats; callers track it to avoid a division).
// kSigned: the codes the caller multiplies are signed (see kSignedCodes) or, when false, the
// stored unsigned bytes (int8 format only; Q8_0 is always signed).
template <QFormat F, bool kSigned = kSignedCodes<F>>
static inline void chunk_affine(const QLinearProblem& p, const uint8_t* row, int64_t n, int64_t c,
                                int64_t g, float a[2], float b[2]) {
  if constexpr (F == QFormat::Q4_0) {
    const float d = half_to_f32(load_u16(row + c * 18));
    a[0] = a[1] = d;
    b[0] = b[1] = -8.f * d;
  } else if constexpr (F == QFormat::Q4_1) {
    const uint8_t* blk = row + c * 20;
    a[0] = a[1] = half_to_f32(load_u16(blk));
    b[0] = b[1] = half_to_f32(load_u16(blk + 2));
  } else if constexpr (F == QFormat::Q8_0) {
    a[0] = a[1] = half_to_f32(load_u16(row + c * 34));
    b[0] = b[1] = 0.f;
  } else if constexpr (F == QFormat::Q4_K) {
    const uint8_t* blk = row + (c >> 3) * 144;
    int sc, mn;
    q4k_scale_min(blk + 4, static_cast<int>(c & 7), &sc, &mn);
    a[0] = a[1] = half_to_f32(load_u16(blk)) * sc;
    b[0] = b[1] = -half_to_f32(load_u16(blk + 2)) * mn;
  } else if constexpr (F == QFormat::Q6_K) {
    const uint8_t* blk = row + (c >> 3) * 210;
    const float d = half_to_f32(load_u16(blk + 208));
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const int k = static_cast<int>(c & 7);           // chunk within the 256-value block
    const int base = (k >> 2) * 8 + (k & 3) * 2;      // scale index of its first half
    a[0] = d * sc[base];
    a[1] = d * sc[base + 1];
    b[0] = -32.f * a[0];
    b[1] = -32.f * a[1];
  } else {  // int formats
    const int64_t gi = n * p.groups + g;
    const float s = load_scale(p, gi);
    const float z = p.zeros ? static_cast<float>(p.zeros[gi])
                            : static_cast<float>(1 << (static_cast<int>(F) - 1));
    a[0] = a[1] = s;
    b[0] = b[1] = kSigned ? s * (128.f - z) : -s * z;
  }
}

}  // namespace fastadapt::cpu

// Compile-time format switch with a loud default: an unknown format is a bug in the caller.
#define FASTADAPT_DISPATCH_QFORMAT(FMT, NAME, ...)                                    \
  [&] {                                                                               \
    switch (FMT) {                                                                    \
      case ::fastadapt::QFormat::INT2: { constexpr auto NAME = ::fastadapt::QFormat::INT2; return __VA_ARGS__(); } \
      case ::fastadapt::QFormat::INT3: { constexpr auto NAME = ::fastadapt::QFormat::INT3; return __VA_ARGS__(); } \
      case ::fastadapt::QFormat::INT4: { constexpr auto NAME = ::fastadapt::QFormat::INT4; return __VA_ARGS__(); } \
      case ::fastadapt::QFormat::INT8: { constexpr auto NAME = ::fastadapt::QFormat::INT8; return __VA_ARGS__(); } \
      case ::fastadapt::QFormat::Q4_0: { constexpr auto NAME = ::fastadapt::QFormat::Q4_0; return __VA_ARGS__(); } \
      case ::fastadapt::QFormat::Q4_1: { constexpr auto NAME = ::fastadapt::QFormat::Q4_1; return __VA_ARGS__(); } \
      case ::fastadapt::QFormat::Q8_0: { constexpr auto NAME = ::fastadapt::QFormat::Q8_0; return __VA_ARGS__(); } \
      case ::fastadapt::QFormat::Q4_K: { constexpr auto NAME = ::fastadapt::QFormat::Q4_K; return __VA_ARGS__(); } \
      case ::fastadapt::QFormat::Q6_K: { constexpr auto NAME = ::fastadapt::QFormat::Q6_K; return __VA_ARGS__(); } \
    }                                                                                 \
    __builtin_trap(); /* unreachable: the glue validated the format */                \
  }()
