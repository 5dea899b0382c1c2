// AVX2 + FMA qlinear kernels (this TU alone is built with -mavx2 -mfma -mf16c; it is only
// called after a CPUID check). Three paths:
//  gemv : small M. Each 32-code chunk is unpacked once into a ymm of bytes, widened to fp32
//         and dotted with up to 4 rows of x; scales are applied once per group.
//  gemm : larger M. A 16-row panel of W is dequantized into a thread-local fp32 tile (at most
//         16 x 2048 floats, L2-resident: never the whole weight), then a 3x4 register-blocked
//         micro-kernel of dot products runs over it for every 3 rows of x.
//  int8 : activations pre-quantized per 32-block; vpmaddubsw/vpmaddwd integer dot products per
//         chunk, converted and scaled in fp32 per chunk.
// GGUF 32-value blocks (Q4_0, Q4_1, Q8_0) take prologue-free variants of gemv and int8 that read
// each block header in place (decode rows are short; see gguf_block_rows).
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "cpu/kernels/qdecode_scalar.h"

namespace fastadapt::cpu {
namespace {

// A growable thread-local buffer with internal linkage. Not std::vector: its template members
// would be emitted from this -mavx2 TU as weak symbols, and the linker may then pick these AVX2
// copies for the generic code too (SIGILL on a CPU without AVX2).
template <typename T>
struct Scratch {
  T* ptr = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(ptr); }
  T* get(size_t n) {
    if (n > size) {
      std::free(ptr);
      ptr = static_cast<T*>(std::malloc(n * sizeof(T)));
      size = ptr ? n : 0;
    }
    return ptr;
  }
};

// The 32 codes of chunk c of a weight row, in order, one per byte (two's complement for the
// 8-bit formats, see kSignedCodes).
template <QFormat F>
inline __m256i chunk_codes(const uint8_t* row, int64_t c) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (F == QFormat::INT8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 32));
    return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (F == QFormat::Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 34 + 2));
  } else if constexpr (F == QFormat::INT4 || F == QFormat::Q4_0 || F == QFormat::Q4_1) {
    const uint8_t* s = F == QFormat::INT4 ? row + c * 16 : F == QFormat::Q4_0 ? row + c * 18 + 2
                                                                             : row + c * 20 + 4;
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
    return _mm256_set_m128i(hi, lo);
  } else if constexpr (F == QFormat::INT2 || F == QFormat::INT3) {
    const uint8_t* s = row + c * (F == QFormat::INT2 ? 8 : 12);
    int64_t lowbits;
    std::memcpy(&lowbits, s, 8);
    // 64-bit lane i holds the 8 bytes shifted right by 2i: byte j then carries code j + 8i.
    __m256i q = _mm256_srlv_epi64(_mm256_set1_epi64x(lowbits), _mm256_setr_epi64x(0, 2, 4, 6));
    q = _mm256_and_si256(q, _mm256_set1_epi8(3));
    if constexpr (F == QFormat::INT3) {
      int32_t hibits;
      std::memcpy(&hibits, s + 8, 4);
      // byte j takes byte j/8 of the bit plane, then tests bit j%8.
      const __m256i spread = _mm256_shuffle_epi8(
          _mm256_set1_epi32(hibits),
          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
      const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
      q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(4)));
    }
    return q;
  } else if constexpr (F == QFormat::Q4_K) {
    const int j = static_cast<int>(c & 7);
    const __m256i v = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(row + (c >> 3) * 144 + 16 + 32 * (j >> 1)));
    return _mm256_and_si256((j & 1) ? _mm256_srli_epi16(v, 4) : v, low4);
  } else {  // Q6_K
    const int k = static_cast<int>(c & 7), half = k >> 2, cc = k & 3;
    const uint8_t* blk = row + (c >> 3) * 210;
    __m256i lo = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(blk + 64 * half + ((cc & 1) ? 32 : 0)));
    if (cc & 2) lo = _mm256_srli_epi16(lo, 4);
    lo = _mm256_and_si256(lo, low4);
    __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * half));
    hi = _mm256_and_si256(_mm256_srl_epi16(hi, _mm_cvtsi32_si128(2 * cc)), _mm256_set1_epi8(3));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
  }
}

// The fp path multiplies codes as stored: unsigned, except Q8_0's int8.
template <QFormat F> constexpr bool kFloatSigned = (F == QFormat::Q8_0);

inline __m256i load8_u8_to_i32(const uint8_t* s) {  // 8 bytes -> 8 int32 (one load-folded uop)
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
}

// The 32 codes of chunk c as four vectors of 8 floats (codes 0-7, 8-15, 16-23, 24-31). Each
// format is widened straight from memory (vpmovzxbd with a folded load), then split with
// in-lane shifts and masks: no cross-lane shuffles on the decode path.
template <QFormat F>
inline void chunk_floats(const uint8_t* row, int64_t c, __m256 f[4]) {
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  if constexpr (F == QFormat::INT8) {
    const uint8_t* s = row + c * 32;
    for (int k = 0; k < 4; ++k) f[k] = _mm256_cvtepi32_ps(load8_u8_to_i32(s + 8 * k));
  } else if constexpr (F == QFormat::Q8_0) {
    const uint8_t* s = row + c * 34 + 2;
    for (int k = 0; k < 4; ++k)
      f[k] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + 8 * k))));
  } else if constexpr (F == QFormat::INT4 || F == QFormat::Q4_0 || F == QFormat::Q4_1 ||
                       F == QFormat::Q4_K) {
    // byte j holds code j (low nibble) and code j + 16 (high nibble); Q4_K reads 32 bytes of
    // which chunk parity picks the nibble
    const uint8_t* s;
    int shift = 0;
    if constexpr (F == QFormat::Q4_K) {
      const int j = static_cast<int>(c & 7);
      s = row + (c >> 3) * 144 + 16 + 32 * (j >> 1);
      shift = (j & 1) * 4;
      const __m128i sh = _mm_cvtsi32_si128(shift);
      for (int k = 0; k < 4; ++k)
        f[k] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(load8_u8_to_i32(s + 8 * k), sh), m4));
      return;
    } else {
      s = F == QFormat::INT4 ? row + c * 16 : F == QFormat::Q4_0 ? row + c * 18 + 2 : row + c * 20 + 4;
    }
    const __m256i v0 = load8_u8_to_i32(s), v1 = load8_u8_to_i32(s + 8);
    f[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m4));
    f[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m4));
    f[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    f[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
  } else if constexpr (F == QFormat::INT2 || F == QFormat::INT3) {
    const uint8_t* s = row + c * (F == QFormat::INT2 ? 8 : 12);
    const __m256i v = load8_u8_to_i32(s);  // lane j: byte j = codes j, j+8, j+16, j+24
    const __m256i m2 = _mm256_set1_epi32(3);
    __m256i q[4] = {_mm256_and_si256(v, m2), _mm256_and_si256(_mm256_srli_epi32(v, 2), m2),
                    _mm256_and_si256(_mm256_srli_epi32(v, 4), m2), _mm256_srli_epi32(v, 6)};
    if constexpr (F == QFormat::INT3) {
      int32_t hibits;
      std::memcpy(&hibits, s + 8, 4);
      const __m256i h = _mm256_set1_epi32(hibits);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int k = 0; k < 4; ++k) {
        // bit 8k + j of the plane, moved to bit 2 of lane j
        const __m256i bit = _mm256_and_si256(
            _mm256_srlv_epi32(h, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * k))),
            _mm256_set1_epi32(1));
        q[k] = _mm256_or_si256(q[k], _mm256_slli_epi32(bit, 2));
      }
    }
    for (int k = 0; k < 4; ++k) f[k] = _mm256_cvtepi32_ps(q[k]);
  } else {  // Q6_K: low nibble from ql, two high bits from qh
    const int k8 = static_cast<int>(c & 7), half = k8 >> 2, cc = k8 & 3;
    const uint8_t* blk = row + (c >> 3) * 210;
    const uint8_t* ql = blk + 64 * half + ((cc & 1) ? 32 : 0);
    const uint8_t* qh = blk + 128 + 32 * half;
    const __m128i lsh = _mm_cvtsi32_si128((cc & 2) ? 4 : 0), hsh = _mm_cvtsi32_si128(2 * cc);
    const __m256i m2 = _mm256_set1_epi32(3);
    for (int k = 0; k < 4; ++k) {
      const __m256i lo = _mm256_and_si256(_mm256_srl_epi32(load8_u8_to_i32(ql + 8 * k), lsh), m4);
      const __m256i hi = _mm256_and_si256(_mm256_srl_epi32(load8_u8_to_i32(qh + 8 * k), hsh), m2);
      f[k] = _mm256_cvtepi32_ps(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)));
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sums of four vectors, as one 4-lane vector.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// int8 path: chunks whose vpmaddubsw pair sums can be added in int16 without overflow.
template <QFormat F>
constexpr int kI16Chunks = (F == QFormat::INT2 || F == QFormat::INT3 || F == QFormat::INT4 ||
                            F == QFormat::Q4_0 || F == QFormat::Q4_1 || F == QFormat::Q4_K)
                               ? 8 : 1;

// Chunks that share one (a, b): a whole group for int formats, one chunk for GGUF formats.
template <QFormat F>
inline int64_t chunks_per_affine(const QLinearProblem& p) {
  return is_gguf_format<F> ? 1 : p.group_size / 32;
}

// ---- per-row affine prologue -------------------------------------------------------------------
// (a, b) of every affine unit of a weight row, computed once per row by a vectorised prologue so
// that the dot-product loops only read them: int formats have one pair per group, GGUF formats
// one per 16-value half (a[2c], a[2c + 1] for chunk c). Returns the number of units, which is
// also the length of that row of xsum (the glue sets xsum_unit to match).
template <QFormat F, bool kSigned>
int64_t row_affine(const QLinearProblem& p, const uint8_t* row, int64_t n, float* a, float* b) {
  if constexpr (is_gguf_format<F>) {
    // (Q4_0 / Q4_1 / Q8_0 never come here: gguf_block_rows reads their headers in place)
    const int64_t chunks = p.K / 32;
    for (int64_t c = 0; c < chunks; ++c) chunk_affine<F, kSigned>(p, row, n, c, 0, a + 2 * c, b + 2 * c);
    return 2 * chunks;
  } else {
    const int64_t G = p.groups, base = n * G;
    int64_t g = 0;
    if (p.scale_type == ScaleType::F32) {
      std::memcpy(a, static_cast<const float*>(p.scales) + base, sizeof(float) * G);
      g = G;
    } else {
      const uint16_t* s16 = static_cast<const uint16_t*>(p.scales) + base;
      for (; g + 8 <= G; g += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + g));
        const __m256 v = p.scale_type == ScaleType::F16
                             ? _mm256_cvtph_ps(h)
                             : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        _mm256_storeu_ps(a + g, v);
      }
    }
    for (; g < G; ++g) a[g] = load_scale(p, base + g);
    const float zsym = static_cast<float>(1 << (static_cast<int>(F) - 1));
    const uint8_t* z = p.zeros ? p.zeros + base : nullptr;
    for (g = 0; g < G; ++g) {
      const float zg = z ? static_cast<float>(z[g]) : zsym;
      b[g] = kSigned ? a[g] * (128.f - zg) : -a[g] * zg;
    }
    return G;
  }
}

inline float dot(const float* u, const float* v, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(u + i), _mm256_loadu_ps(v + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += u[i] * v[i];
  return s;
}

// Thread-local scratch for one row's affine pairs (the hot path allocates once per thread).
inline float* affine_scratch(const QLinearProblem& p) {
  thread_local Scratch<float> buf;
  return buf.get(3 * static_cast<size_t>(std::max(p.K / 16, p.groups)));
}

// ---- gemv / int8: MT (1..4) rows of x against weight rows [n0, n1) --------------------------
template <QFormat F, int MT, bool kInt8>
void rows_mt(const QLinearProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t chunks = p.K / 32, cpa = chunks_per_affine<F>(p);
  const int64_t units = p.K / p.xsum_unit;
  // Independent accumulation chains per row of x: FMA latency (4 cycles) must not serialise
  // the loop when MT is small. Half-scale formats keep each half in its own chains.
  constexpr int kChains = (MT <= 2 || kHalfScales<F>) ? 4 : 2;
  constexpr bool kSigned = kInt8 ? kSignedCodes<F> : kFloatSigned<F>;
  const float* xs[MT];
  const float* xr[MT];
  for (int m = 0; m < MT; ++m) {
    xs[m] = p.xsum + (m0 + m) * units;
    xr[m] = p.x + (m0 + m) * p.x_stride;
  }
  float* A = affine_scratch(p);
  float* B = A + std::max(p.K / 16, p.groups);
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qdata + n * p.row_bytes;
    row_affine<F, kSigned>(p, row, n, A, B);
    __m256 acc[MT];
    __m256 gacc[MT][kChains];  // GGUF fp path: per-chain accumulators
    for (int m = 0; m < MT; ++m) {
      acc[m] = _mm256_setzero_ps();
      for (int j = 0; j < kChains; ++j) gacc[m][j] = _mm256_setzero_ps();
    }
    for (int64_t c0 = 0, g = 0; c0 < chunks; c0 += cpa, ++g) {
      const float a0 = is_gguf_format<F> ? A[2 * c0] : A[g];
      const float a1 = is_gguf_format<F> ? A[2 * c0 + 1] : a0;
      if constexpr (kInt8) {
        // Integer dot product of the whole group, then its scale once (the token's at the end).
        // vpmaddubsw multiplies unsigned by signed bytes: 8-bit codes go through |q| and move
        // their sign onto x. Codes of at most 4 bits keep int16 pair sums for up to
        // kI16Chunks chunks (8 * 2 * 15 * 127 < 2^15) before widening to int32.
        __m256i isum[MT], psum[MT];
        for (int m = 0; m < MT; ++m) isum[m] = psum[m] = _mm256_setzero_si256();
        int pending = 0;
        for (int64_t c = c0; c < c0 + cpa; ++c) {
          const __m256i q = chunk_codes<F>(row, c);
          const __m256i qu = kSignedCodes<F> ? _mm256_sign_epi8(q, q) : q;
          for (int m = 0; m < MT; ++m) {
            __m256i xv = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(p.xq + (m0 + m) * p.K + 32 * c));
            if constexpr (kSignedCodes<F>) xv = _mm256_sign_epi8(xv, q);
            const __m256i pairs = _mm256_maddubs_epi16(qu, xv);
            if constexpr (kI16Chunks<F> > 1) {
              psum[m] = _mm256_add_epi16(psum[m], pairs);
            } else {
              isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(pairs, ones16));
            }
          }
          if constexpr (kI16Chunks<F> > 1) {
            if (++pending == kI16Chunks<F> || c + 1 == c0 + cpa) {
              for (int m = 0; m < MT; ++m) {
                isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(psum[m], ones16));
                psum[m] = _mm256_setzero_si256();
              }
              pending = 0;
            }
          }
        }
        // int32 lanes 0-3 hold the first 16 values of a chunk (Q6_K scales them apart)
        const __m256 scale = kHalfScales<F> ? _mm256_set_m128(_mm_set1_ps(a1), _mm_set1_ps(a0))
                                            : _mm256_set1_ps(a0);
        for (int m = 0; m < MT; ++m)
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), scale, acc[m]);
      } else if constexpr (is_gguf_format<F>) {
        // One chunk per (a, b): scale the widened codes, then one FMA per vector into
        // independent chains (no per-chunk reduction on the critical path).
        __m256 f[4];
        chunk_floats<F>(row, c0, f);
        if constexpr (kHalfScales<F>) {
          const __m256 va0 = _mm256_set1_ps(a0), va1 = _mm256_set1_ps(a1);
          for (int k = 0; k < 4; ++k) {
            const __m256 w = _mm256_mul_ps(f[k], k < 2 ? va0 : va1);
            for (int m = 0; m < MT; ++m) {
              __m256& dst = gacc[m][k % kChains];
              dst = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr[m] + 32 * c0 + 8 * k), dst);
            }
          }
        } else {  // two short chains per chunk, then one scaled FMA into alternating accumulators
          const __m256 va = _mm256_set1_ps(a0);
          for (int m = 0; m < MT; ++m) {
            const float* x = xr[m] + 32 * c0;
            __m256 t0 = _mm256_mul_ps(f[0], _mm256_loadu_ps(x));
            __m256 t1 = _mm256_mul_ps(f[1], _mm256_loadu_ps(x + 8));
            t0 = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(x + 16), t0);
            t1 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(x + 24), t1);
            gacc[m][0] = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), va, gacc[m][0]);
            std::swap(gacc[m][0], gacc[m][1]);  // alternate chains without a run-time index
          }
        }
      } else {
        // Dot products of the codes, summed over the chunks sharing (a, b), then scaled once.
        __m256 part[MT][kChains];
        for (int m = 0; m < MT; ++m)
          for (int j = 0; j < kChains; ++j) part[m][j] = _mm256_setzero_ps();
        for (int64_t c = c0; c < c0 + cpa; ++c) {
          __m256 f[4];
          chunk_floats<F>(row, c, f);
          for (int k = 0; k < 4; ++k)
            for (int m = 0; m < MT; ++m) {
              __m256& dst = part[m][k % kChains];
              dst = _mm256_fmadd_ps(f[k], _mm256_loadu_ps(xr[m] + 32 * c + 8 * k), dst);
            }
        }
        for (int m = 0; m < MT; ++m) {
          if constexpr (kHalfScales<F>) {  // chains 0-1: first 16 values, 2-3: second 16
            acc[m] = _mm256_fmadd_ps(_mm256_add_ps(part[m][0], part[m][1]), _mm256_set1_ps(a0), acc[m]);
            acc[m] = _mm256_fmadd_ps(_mm256_add_ps(part[m][2], part[m][3]), _mm256_set1_ps(a1), acc[m]);
          } else {
            __m256 sum = part[m][0];
            for (int j = 1; j < kChains; ++j) sum = _mm256_add_ps(sum, part[m][j]);
            acc[m] = _mm256_fmadd_ps(sum, _mm256_set1_ps(a0), acc[m]);
          }
        }
      }
    }
    const float bias = p.bias ? p.bias[n] : 0.f;
    for (int m = 0; m < MT; ++m) {
      // offsets: sum over units of b * sum(x), as one vector dot product
      __m256 total = acc[m];
      if constexpr (!kInt8 && is_gguf_format<F>)
        for (int j = 0; j < kChains; ++j) total = _mm256_add_ps(total, gacc[m][j]);
      const float dotq = hsum(total) * (kInt8 ? p.xscale[m0 + m] : 1.f);
      p.y[(m0 + m) * p.y_stride + n] = dotq + dot(B, xs[m], units) + bias;
    }
  }
}

// ---- GGUF 32-value blocks (Q4_0, Q4_1, Q8_0) without a per-row prologue -----------------------
// Decode rows are short (K = 576 for SmolLM2): a prologue gathering every block's fp16 header
// into arrays cost as much as the dot products. These paths read each header where the block
// is, widen it with one vcvtph2ps, and accumulate the offsets (Q4_1's m, Q4_0's -8 d, times the
// block sum of x) in a 4-lane vector against `xoff`, a per-call table of x block sums:
// per row of x and block c, 4 floats laid out against the widened header [d, m, 0, 0] (Q4_1:
// [0, xs_c, 0, 0]) or [d, 0, 0, 0] (Q4_0: [-8 xs_c, 0, 0, 0]). Q8_0 has no offsets.
template <QFormat F> constexpr bool kGgufBlock32 =
    F == QFormat::Q4_0 || F == QFormat::Q4_1 || F == QFormat::Q8_0;

template <QFormat F>
constexpr int64_t kGgufBlockBytes = F == QFormat::Q4_0 ? 18 : F == QFormat::Q4_1 ? 20 : 34;

// [d, m, 0, 0] for Q4_1, [d, 0, 0, 0] otherwise, of block c.
template <QFormat F>
inline __m128 gguf_header(const uint8_t* row, int64_t c) {
  if constexpr (F == QFormat::Q4_1) {
    uint32_t w;
    std::memcpy(&w, row + c * kGgufBlockBytes<F>, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(w)));
  } else {
    uint16_t d;
    std::memcpy(&d, row + c * kGgufBlockBytes<F>, 2);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(d));
  }
}

template <QFormat F>
void gguf_block_offsets(const QLinearProblem& p, float* xoff) {
  const int64_t chunks = p.K / 32, units = p.K / p.xsum_unit;
  for (int64_t m = 0; m < p.M; ++m) {
    const float* xs = p.xsum + m * units;
    float* o = xoff + m * chunks * 4;
    for (int64_t c = 0; c < chunks; ++c) {
      const float s = xs[2 * c] + xs[2 * c + 1];  // two 16-value units per block
      o[4 * c + 0] = F == QFormat::Q4_0 ? -8.f * s : 0.f;
      o[4 * c + 1] = F == QFormat::Q4_1 ? s : 0.f;
      o[4 * c + 2] = o[4 * c + 3] = 0.f;
    }
  }
}

template <QFormat F, int MT, bool kInt8>
void gguf_block_rows(const QLinearProblem& p, const float* xoff, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int64_t bs = kGgufBlockBytes<F>;
  constexpr bool kOffsets = F != QFormat::Q8_0;
  const int64_t chunks = p.K / 32;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const float* xr[MT];
  const int8_t* xq[MT];
  const float* xo[MT];
  for (int m = 0; m < MT; ++m) {
    xr[m] = p.x + (m0 + m) * p.x_stride;
    xq[m] = kInt8 ? p.xq + (m0 + m) * p.K : nullptr;
    xo[m] = xoff + (m0 + m) * chunks * 4;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qdata + n * p.row_bytes;
    __m256 acc[MT][2];
    __m128 off[MT];
    for (int m = 0; m < MT; ++m) {
      acc[m][0] = acc[m][1] = _mm256_setzero_ps();
      off[m] = _mm_setzero_ps();
    }
    for (int64_t c = 0; c < chunks; ++c) {
      __builtin_prefetch(row + (c + 6) * bs, 0, 3);
      const __m128 h = gguf_header<F>(row, c);
      const __m256 d = _mm256_broadcastss_ps(h);
      if constexpr (kInt8) {
        const __m256i q = chunk_codes<F>(row, c);
        const __m256i qu = kSignedCodes<F> ? _mm256_sign_epi8(q, q) : q;
        for (int m = 0; m < MT; ++m) {
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + 32 * c));
          if constexpr (kSignedCodes<F>) xv = _mm256_sign_epi8(xv, q);
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(qu, xv), ones16);
          acc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[m][0]);
        }
      } else {
        __m256 f[4];
        chunk_floats<F>(row, c, f);
        for (int m = 0; m < MT; ++m) {
          const float* x = xr[m] + 32 * c;
          __m256 t0 = _mm256_mul_ps(f[0], _mm256_loadu_ps(x));
          __m256 t1 = _mm256_mul_ps(f[1], _mm256_loadu_ps(x + 8));
          t0 = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(x + 16), t0);
          t1 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(x + 24), t1);
          acc[m][0] = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), d, acc[m][0]);
        }
      }
      // alternate the two chains by swapping them (renamed, free), not by indexing with c & 1:
      // a run-time index put the accumulators on the stack (a store and reload per chunk, the
      // hottest instructions in a perf profile)
      for (int m = 0; m < MT; ++m) std::swap(acc[m][0], acc[m][1]);
      if constexpr (kOffsets)
        for (int m = 0; m < MT; ++m) off[m] = _mm_fmadd_ps(h, _mm_loadu_ps(xo[m] + 4 * c), off[m]);
    }
    const float bias = p.bias ? p.bias[n] : 0.f;
    for (int m = 0; m < MT; ++m) {
      const __m256 a8 = _mm256_add_ps(acc[m][0], acc[m][1]);
      __m128 t = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
      if constexpr (kInt8) t = _mm_mul_ps(t, _mm_set1_ps(p.xscale[m0 + m]));
      t = _mm_add_ps(t, off[m]);
      t = _mm_add_ps(t, _mm_movehl_ps(t, t));
      t = _mm_add_ss(t, _mm_movehdup_ps(t));
      p.y[(m0 + m) * p.y_stride + n] = _mm_cvtss_f32(t) + bias;
    }
  }
}

// Decode (one row of x): two weight rows per pass. Each row's arithmetic is exactly
// gguf_block_rows<F, 1, kInt8>'s (same operations in the same order, so results do not depend on
// the pairing), but the two rows' chains interleave, which hides the latency of a chunk's
// widen-multiply-add chain and of the per-row reduction on rows of only K/32 chunks (18 for
// SmolLM2), and each x load of a chunk serves both rows.
template <QFormat F, bool kInt8>
void gguf_block_row_pairs(const QLinearProblem& p, const float* xoff, int64_t n0, int64_t n1) {
  constexpr int64_t bs = kGgufBlockBytes<F>;
  constexpr bool kOffsets = F != QFormat::Q8_0;
  constexpr int NR = 2;
  const int64_t chunks = p.K / 32;
  const __m256i ones16 = _mm256_set1_epi16(1);
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const uint8_t* row[NR];
    __m256 acc[NR][2];
    __m128 off[NR];
    for (int r = 0; r < NR; ++r) {
      row[r] = p.qdata + (n + r) * p.row_bytes;
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      off[r] = _mm_setzero_ps();
    }
    for (int64_t c = 0; c < chunks; ++c) {
      __m128 h[NR];
      for (int r = 0; r < NR; ++r) {
        __builtin_prefetch(row[r] + (c + 6) * bs, 0, 3);
        h[r] = gguf_header<F>(row[r], c);
      }
      if constexpr (kInt8) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + 32 * c));
        for (int r = 0; r < NR; ++r) {
          const __m256i q = chunk_codes<F>(row[r], c);
          const __m256i qu = kSignedCodes<F> ? _mm256_sign_epi8(q, q) : q;
          const __m256i xv = kSignedCodes<F> ? _mm256_sign_epi8(x, q) : x;
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(qu, xv), ones16);
          acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcastss_ps(h[r]), acc[r][0]);
        }
      } else {
        const float* x = p.x + 32 * c;
        const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
        const __m256 x2 = _mm256_loadu_ps(x + 16), x3 = _mm256_loadu_ps(x + 24);
        for (int r = 0; r < NR; ++r) {
          __m256 f[4];
          chunk_floats<F>(row[r], c, f);
          __m256 t0 = _mm256_mul_ps(f[0], x0), t1 = _mm256_mul_ps(f[1], x1);
          t0 = _mm256_fmadd_ps(f[2], x2, t0);
          t1 = _mm256_fmadd_ps(f[3], x3, t1);
          acc[r][0] = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_broadcastss_ps(h[r]), acc[r][0]);
        }
      }
      for (int r = 0; r < NR; ++r) {
        std::swap(acc[r][0], acc[r][1]);  // the two alternating chains per row, as in gguf_block_rows
        if constexpr (kOffsets) off[r] = _mm_fmadd_ps(h[r], _mm_loadu_ps(xoff + 4 * c), off[r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 a8 = _mm256_add_ps(acc[r][0], acc[r][1]);
      __m128 t = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
      if constexpr (kInt8) t = _mm_mul_ps(t, _mm_set1_ps(p.xscale[0]));
      t = _mm_add_ps(t, off[r]);
      t = _mm_add_ps(t, _mm_movehl_ps(t, t));
      t = _mm_add_ss(t, _mm_movehdup_ps(t));
      p.y[n + r] = _mm_cvtss_f32(t) + (p.bias ? p.bias[n + r] : 0.f);
    }
  }
  if (n < n1) gguf_block_rows<F, 1, kInt8>(p, xoff, 0, n, n1);
}

template <QFormat F, bool kInt8>
void gguf_block_all_m(const QLinearProblem& p, int64_t n0, int64_t n1) {
  thread_local Scratch<float> offs;
  float* xoff = offs.get(static_cast<size_t>(p.M * (p.K / 32) * 4));
  if constexpr (F != QFormat::Q8_0) gguf_block_offsets<F>(p, xoff);
  if (p.M == 1) return gguf_block_row_pairs<F, kInt8>(p, xoff, n0, n1);
  constexpr int64_t kRowBlock = 4;
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = std::min(n1, nb + kRowBlock);
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
      switch (std::min<int64_t>(4, p.M - m0)) {
        case 1: gguf_block_rows<F, 1, kInt8>(p, xoff, m0, nb, ne); break;
        case 2: gguf_block_rows<F, 2, kInt8>(p, xoff, m0, nb, ne); break;
        case 3: gguf_block_rows<F, 3, kInt8>(p, xoff, m0, nb, ne); break;
        default: gguf_block_rows<F, 4, kInt8>(p, xoff, m0, nb, ne); break;
      }
    }
  }
}

template <QFormat F, bool kInt8>
void rows_all_m(const QLinearProblem& p, int64_t n0, int64_t n1) {
  // Weight rows outermost in blocks, so a block stays in L1 while every 4 rows of x pass over it.
  constexpr int64_t kRowBlock = 4;
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = std::min(n1, nb + kRowBlock);
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
      switch (std::min<int64_t>(4, p.M - m0)) {
        case 1: rows_mt<F, 1, kInt8>(p, m0, nb, ne); break;
        case 2: rows_mt<F, 2, kInt8>(p, m0, nb, ne); break;
        case 3: rows_mt<F, 3, kInt8>(p, m0, nb, ne); break;
        default: rows_mt<F, 4, kInt8>(p, m0, nb, ne); break;
      }
    }
  }
}

// ---- int8 path for the nibble formats (int4, Q4_0, Q4_1): two chunks per step ---------------
// The 16 code bytes of chunks c and c+1 sit in one ymm (one lane each); `& 0xF` gives codes 0-15
// of both chunks, `>> 4` codes 16-31. Rather than shuffling the codes back into order, x is
// stored once per call in the matching order: per 64 values [c 0-15, c+1 0-15, c 16-31,
// c+1 16-31]. A lone last chunk (K/32 odd) keeps its natural order.
template <QFormat F> constexpr bool kNibbleFormat =
    F == QFormat::INT4 || F == QFormat::Q4_0 || F == QFormat::Q4_1;

inline void interleave_pairs(const int8_t* src, int64_t K, int8_t* dst) {
  const int64_t pairs = K / 64;
  for (int64_t i = 0; i < pairs; ++i) {
    const int8_t* s = src + 64 * i;
    int8_t* d = dst + 64 * i;
    std::memcpy(d, s, 16);
    std::memcpy(d + 16, s + 32, 16);
    std::memcpy(d + 32, s + 16, 16);
    std::memcpy(d + 48, s + 48, 16);
  }
  if (K % 64) std::memcpy(dst + 64 * pairs, src + 64 * pairs, 32);
}

template <QFormat F>
inline const uint8_t* nibble_bytes(const uint8_t* row, int64_t c) {
  return F == QFormat::INT4 ? row + c * 16 : F == QFormat::Q4_0 ? row + c * 18 + 2 : row + c * 20 + 4;
}

template <QFormat F, int MT>
void int8_nibble_rows(const QLinearProblem& p, const int8_t* xi, int64_t m0, int64_t n0,
                      int64_t n1) {
  const int64_t chunks = p.K / 32, cpa = chunks_per_affine<F>(p);
  const int64_t units = p.K / p.xsum_unit;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1);
  // Int formats whose groups hold an even number of chunks sum integers over the whole group;
  // otherwise (GGUF blocks, odd groups) each chunk of a pair keeps its own scale lane.
  const bool group_sums = !is_gguf_format<F> && cpa % 2 == 0;
  const int8_t* xr[MT];
  const float* xs[MT];
  for (int m = 0; m < MT; ++m) {
    xr[m] = xi + (m0 + m) * p.K;
    xs[m] = p.xsum + (m0 + m) * units;
  }
  const int64_t cap = std::max(p.K / 16, p.groups);
  float* A = affine_scratch(p);
  float* B = A + cap;
  float* Achunk = B + cap;  // the scale of every chunk (non-group_sums path)
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qdata + n * p.row_bytes;
    row_affine<F, false>(p, row, n, A, B);
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    auto pair_dot = [&](int64_t c, __m256i d[MT]) {  // int32 lanes 0-3: chunk c, 4-7: c + 1
      __m256i v;
      if constexpr (F == QFormat::INT4) {
        v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 16));
      } else {
        v = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(nibble_bytes<F>(row, c + 1)),
                                reinterpret_cast<const __m128i*>(nibble_bytes<F>(row, c)));
      }
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      for (int m = 0; m < MT; ++m) {
        const __m256i* x = reinterpret_cast<const __m256i*>(xr[m] + 32 * c);
        // pair sums stay below 2 * 2 * 15 * 127 < 2^15
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(x)),
                                             _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x + 1)));
        d[m] = _mm256_madd_epi16(s16, ones16);
      }
    };
    if (group_sums) {
      int64_t c = 0;
      for (int64_t g = 0; c < chunks; ++g) {
        __m256i isum[MT];
        for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
        for (const int64_t ce = c + cpa; c < ce; c += 2) {
          __m256i d[MT];
          pair_dot(c, d);
          for (int m = 0; m < MT; ++m) isum[m] = _mm256_add_epi32(isum[m], d[m]);
        }
        const __m256 av = _mm256_set1_ps(A[g]);
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), av, acc[m]);
      }
    } else {
      if constexpr (is_gguf_format<F>) {
        for (int64_t c = 0; c < chunks; ++c) Achunk[c] = A[2 * c];
      } else {
        for (int64_t g = 0, c = 0; g < p.groups; ++g)
          for (int64_t j = 0; j < cpa; ++j) Achunk[c++] = A[g];
      }
      int64_t c = 0;
      for (; c + 1 < chunks; c += 2) {
        const __m256 scale = _mm256_set_m128(_mm_set1_ps(Achunk[c + 1]), _mm_set1_ps(Achunk[c]));
        __m256i d[MT];
        pair_dot(c, d);
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[m]), scale, acc[m]);
      }
      if (c < chunks) {  // a lone last chunk, x in natural order
        const __m256i q = chunk_codes<F>(row, c);
        const __m256 av = _mm256_set1_ps(Achunk[c]);
        for (int m = 0; m < MT; ++m) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + 32 * c));
          const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones16);
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), av, acc[m]);
        }
      }
    }
    const float bias = p.bias ? p.bias[n] : 0.f;
    for (int m = 0; m < MT; ++m)
      p.y[(m0 + m) * p.y_stride + n] =
          hsum(acc[m]) * p.xscale[m0 + m] + dot(B, xs[m], units) + bias;
  }
}

// GGUF nibble blocks (Q4_0, Q4_1) without a per-row prologue: each pair of blocks reads its
// fp16 d (and Q4_1's m) straight from the block headers, widens them with one vcvtph2ps and
// spreads them over the pair's lanes with one permute; the offsets (m, or -8 d for Q4_0, times
// the block sums of x) accumulate in a 4-lane vector against a per-call table `xoff` of x block
// sums laid out to match. One horizontal sum per row at the end. For decode (M of 1 to 4) the
// prologue of the generic row path cost as much as the dot products of a 576-wide row.
// xoff, per row of x and pair of blocks (c, c+1), 4 floats:
//   Q4_1: [0, xs_c, 0, xs_c1]   (lanes of d_c, m_c, d_c1, m_c1)
//   Q4_0: [-8 xs_c, -8 xs_c1, 0, 0]   (lanes of d_c, d_c1, 0, 0)
// NR weight rows per pass (NR > 1 only with MT == 1, decode): each row's arithmetic is the
// single-row pass's, in the same order, so results do not depend on the grouping; the rows'
// latency chains (one accumulator per row, 18 chunks for SmolLM2) interleave, and each x load
// serves every row.
template <QFormat F, int MT, int NR = 1>
void int8_gguf_nibble_rows(const QLinearProblem& p, const int8_t* xi, const float* xoff, int64_t m0,
                           int64_t n0, int64_t n1) {
  static_assert(F == QFormat::Q4_0 || F == QFormat::Q4_1, "GGUF nibble formats only");
  static_assert(NR == 1 || MT == 1, "several weight rows per pass only for one row of x");
  constexpr int64_t bs = F == QFormat::Q4_0 ? 18 : 20;
  const int64_t chunks = p.K / 32, pairs = (chunks + 1) / 2;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1);
  // lanes of the widened header vector that scale chunk c (lanes 0-3) and c + 1 (lanes 4-7)
  const __m256i dsel = F == QFormat::Q4_1 ? _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)
                                          : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const int8_t* xr[MT];
  const float* xo[MT];
  for (int m = 0; m < MT; ++m) {
    xr[m] = xi + (m0 + m) * p.K;
    xo[m] = xoff + (m0 + m) * pairs * 4;
  }
  auto header = [&](const uint8_t* row, int64_t c, bool two) -> __m128 {
    uint32_t w0, w1 = 0;
    if constexpr (F == QFormat::Q4_1) {
      std::memcpy(&w0, row + c * bs, 4);  // d | m << 16
      if (two) std::memcpy(&w1, row + (c + 1) * bs, 4);
      return _mm_cvtph_ps(_mm_setr_epi32(static_cast<int>(w0), static_cast<int>(w1), 0, 0));
    } else {
      uint16_t d0, d1 = 0;
      std::memcpy(&d0, row + c * bs, 2);
      if (two) std::memcpy(&d1, row + (c + 1) * bs, 2);
      w0 = static_cast<uint32_t>(d0) | static_cast<uint32_t>(d1) << 16;
      return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(w0)));
    }
  };
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const uint8_t* row[NR];
    __m256 acc[NR][MT];
    __m128 off[NR][MT];
    for (int r = 0; r < NR; ++r) {
      row[r] = p.qdata + (n + r) * p.row_bytes;
      for (int m = 0; m < MT; ++m) {
        acc[r][m] = _mm256_setzero_ps();
        off[r][m] = _mm_setzero_ps();
      }
    }
    int64_t c = 0;
    for (; c + 1 < chunks; c += 2) {
      for (int r = 0; r < NR; ++r) {
        if (c + 2 < chunks) __builtin_prefetch(row[r] + (c + 8) * bs, 0, 3);
        const __m128 h = header(row[r], c, true);
        const __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(h), dsel);
        const __m256i v = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(row[r] + (c + 1) * bs + bs - 16),
                                              reinterpret_cast<const __m128i*>(row[r] + c * bs + bs - 16));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int m = 0; m < MT; ++m) {
          const __m256i* x = reinterpret_cast<const __m256i*>(xr[m] + 32 * c);
          // pair sums stay below 2 * 2 * 15 * 127 < 2^15
          const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(x)),
                                               _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x + 1)));
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones16)), scale, acc[r][m]);
          off[r][m] = _mm_fmadd_ps(h, _mm_loadu_ps(xo[m] + 2 * c), off[r][m]);
        }
      }
    }
    if (c < chunks) {  // a lone last chunk, x in natural order
      for (int r = 0; r < NR; ++r) {
        const __m128 h = header(row[r], c, false);
        const __m256 scale = _mm256_set1_ps(_mm_cvtss_f32(h));
        const __m256i q = chunk_codes<F>(row[r], c);
        for (int m = 0; m < MT; ++m) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + 32 * c));
          const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones16);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale, acc[r][m]);
          off[r][m] = _mm_fmadd_ps(h, _mm_loadu_ps(xo[m] + 2 * c), off[r][m]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const float bias = p.bias ? p.bias[n + r] : 0.f;
      for (int m = 0; m < MT; ++m) {
        const __m128 a = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
        __m128 t = _mm_add_ps(_mm_mul_ps(a, _mm_set1_ps(p.xscale[m0 + m])), off[r][m]);
        t = _mm_add_ps(t, _mm_movehl_ps(t, t));
        t = _mm_add_ss(t, _mm_movehdup_ps(t));
        p.y[(m0 + m) * p.y_stride + n + r] = _mm_cvtss_f32(t) + bias;
      }
    }
  }
  if constexpr (NR > 1) {
    if (n < n1) int8_gguf_nibble_rows<F, MT, 1>(p, xi, xoff, m0, n, n1);
  }
}

// The offset table of int8_gguf_nibble_rows for every row of x (xsum has two 16-value units per
// block for GGUF formats).
template <QFormat F>
void gguf_nibble_offsets(const QLinearProblem& p, float* xoff) {
  const int64_t chunks = p.K / 32, pairs = (chunks + 1) / 2, units = p.K / p.xsum_unit;
  for (int64_t m = 0; m < p.M; ++m) {
    const float* xs = p.xsum + m * units;
    float* o = xoff + m * pairs * 4;
    for (int64_t q = 0; q < pairs; ++q) {
      const int64_t c = 2 * q;
      const float s0 = xs[2 * c] + xs[2 * c + 1];
      const float s1 = c + 1 < chunks ? xs[2 * c + 2] + xs[2 * c + 3] : 0.f;
      if constexpr (F == QFormat::Q4_1) {
        o[4 * q + 0] = 0.f;
        o[4 * q + 1] = s0;
        o[4 * q + 2] = 0.f;
        o[4 * q + 3] = s1;
      } else {
        o[4 * q + 0] = -8.f * s0;
        o[4 * q + 1] = -8.f * s1;
        o[4 * q + 2] = 0.f;
        o[4 * q + 3] = 0.f;
      }
    }
  }
}

template <QFormat F>
void int8_nibble_all_m(const QLinearProblem& p, int64_t n0, int64_t n1) {
  thread_local Scratch<int8_t> scratch;  // x in pair-interleaved order, reused across calls
  int8_t* xbuf = scratch.get(static_cast<size_t>(p.M * p.K));
  for (int64_t m = 0; m < p.M; ++m) interleave_pairs(p.xq + m * p.K, p.K, xbuf + m * p.K);
  constexpr int64_t kRowBlock = 4;
  if constexpr (F == QFormat::Q4_0 || F == QFormat::Q4_1) {
    thread_local Scratch<float> offs;
    float* xoff = offs.get(static_cast<size_t>(p.M * ((p.K / 32 + 1) / 2) * 4));
    gguf_nibble_offsets<F>(p, xoff);
    if (p.M == 1) return int8_gguf_nibble_rows<F, 1, 2>(p, xbuf, xoff, 0, n0, n1);  // decode
    for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
      const int64_t ne = std::min(n1, nb + kRowBlock);
      for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
        switch (std::min<int64_t>(4, p.M - m0)) {
          case 1: int8_gguf_nibble_rows<F, 1>(p, xbuf, xoff, m0, nb, ne); break;
          case 2: int8_gguf_nibble_rows<F, 2>(p, xbuf, xoff, m0, nb, ne); break;
          case 3: int8_gguf_nibble_rows<F, 3>(p, xbuf, xoff, m0, nb, ne); break;
          default: int8_gguf_nibble_rows<F, 4>(p, xbuf, xoff, m0, nb, ne); break;
        }
      }
    }
  } else {
    for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
      const int64_t ne = std::min(n1, nb + kRowBlock);
      for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
        switch (std::min<int64_t>(4, p.M - m0)) {
          case 1: int8_nibble_rows<F, 1>(p, xbuf, m0, nb, ne); break;
          case 2: int8_nibble_rows<F, 2>(p, xbuf, m0, nb, ne); break;
          case 3: int8_nibble_rows<F, 3>(p, xbuf, m0, nb, ne); break;
          default: int8_nibble_rows<F, 4>(p, xbuf, m0, nb, ne); break;
        }
      }
    }
  }
}

// ---- gemm ------------------------------------------------------------------------------------
constexpr int64_t kMaxKc = 2048;  // K block: a 16 x 2048 fp32 panel is 128 KiB, inside L2

// Dequantize W[n, k0 : k0 + kc] into dst (kc floats). k0 and kc are multiples of 32 and, for
// int formats, k0 starts a group or lies inside one (the affine is looked up per chunk).
template <QFormat F>
void dequant_row(const QLinearProblem& p, int64_t n, int64_t k0, int64_t kc, float* dst) {
  const uint8_t* row = p.qdata + n * p.row_bytes;
  const int64_t cpa = chunks_per_affine<F>(p);
  float a[2] = {0.f, 0.f}, b[2] = {0.f, 0.f};
  for (int64_t c = k0 / 32; c < (k0 + kc) / 32; ++c) {
    if (c == k0 / 32 || c % cpa == 0) chunk_affine<F, kFloatSigned<F>>(p, row, n, c, c / cpa, a, b);
    __m256 f[4];
    chunk_floats<F>(row, c, f);
    const __m256 a0 = _mm256_set1_ps(a[0]), b0 = _mm256_set1_ps(b[0]);
    const __m256 a1 = _mm256_set1_ps(a[1]), b1 = _mm256_set1_ps(b[1]);
    float* d = dst + (c * 32 - k0);
    _mm256_storeu_ps(d, _mm256_fmadd_ps(f[0], a0, b0));
    _mm256_storeu_ps(d + 8, _mm256_fmadd_ps(f[1], a0, b0));
    _mm256_storeu_ps(d + 16, _mm256_fmadd_ps(f[2], a1, b1));
    _mm256_storeu_ps(d + 24, _mm256_fmadd_ps(f[3], a1, b1));
  }
}

// y[MR rows][NR cols] (+)= x[MR][kc] . w[NR][kc]^T, accumulating 8-wide along k.
template <int MR, int NR>
void micro_kernel(const float* const* x, const float* w, int64_t ldw, int64_t kc, float* y,
                  int64_t ldy, const float* init /* [NR] added on the first K block, or null */,
                  bool first) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* yr = y + i * ldy;
    if constexpr (NR == 4) {
      __m128 s = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      const __m128 base = first ? (init ? _mm_loadu_ps(init) : _mm_setzero_ps()) : _mm_loadu_ps(yr);
      _mm_storeu_ps(yr, _mm_add_ps(s, base));
    } else {
      for (int j = 0; j < NR; ++j) {
        const float base = first ? (init ? init[j] : 0.f) : yr[j];
        yr[j] = base + hsum(acc[i][j]);
      }
    }
  }
}

template <int MR>
void micro_dispatch_nr(int nr, const float* const* x, const float* w, int64_t ldw, int64_t kc,
                       float* y, int64_t ldy, const float* init, bool first) {
  switch (nr) {
    case 1: micro_kernel<MR, 1>(x, w, ldw, kc, y, ldy, init, first); break;
    case 2: micro_kernel<MR, 2>(x, w, ldw, kc, y, ldy, init, first); break;
    case 3: micro_kernel<MR, 3>(x, w, ldw, kc, y, ldy, init, first); break;
    default: micro_kernel<MR, 4>(x, w, ldw, kc, y, ldy, init, first); break;
  }
}

template <QFormat F>
void gemm(const QLinearProblem& p, int64_t n0, int64_t n1) {
  const int64_t kc_max = std::min(p.K, kMaxKc);
  thread_local Scratch<float> panel;  // reused across calls: the hot path allocates once
  float* wp = panel.get(static_cast<size_t>(kGemmPanel * kc_max));
  for (int64_t np = n0; np < n1; np += kGemmPanel) {
    const int64_t rows = std::min(kGemmPanel, n1 - np);
    for (int64_t k0 = 0; k0 < p.K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, p.K - k0);
      for (int64_t r = 0; r < rows; ++r) dequant_row<F>(p, np + r, k0, kc, wp + r * kc_max);
      const bool first = k0 == 0;
      for (int64_t m = 0; m < p.M; m += 3) {
        const int mr = static_cast<int>(std::min<int64_t>(3, p.M - m));
        const float* x[3];
        for (int i = 0; i < mr; ++i) x[i] = p.x + (m + i) * p.x_stride + k0;
        for (int64_t j = 0; j < rows; j += 4) {
          const int nr = static_cast<int>(std::min<int64_t>(4, rows - j));
          float* y = p.y + m * p.y_stride + np + j;
          const float* init = p.bias ? p.bias + np + j : nullptr;
          const float* w = wp + j * kc_max;
          switch (mr) {
            case 1: micro_dispatch_nr<1>(nr, x, w, kc_max, kc, y, p.y_stride, init, first); break;
            case 2: micro_dispatch_nr<2>(nr, x, w, kc_max, kc, y, p.y_stride, init, first); break;
            default: micro_dispatch_nr<3>(nr, x, w, kc_max, kc, y, p.y_stride, init, first); break;
          }
        }
      }
    }
  }
}

}  // namespace

void qlinear_gemv_avx2(const QLinearProblem& p, int64_t n0, int64_t n1) {
  FASTADAPT_DISPATCH_QFORMAT(p.fmt, F, [&] {
    if constexpr (kGgufBlock32<F>) {
      gguf_block_all_m<F, false>(p, n0, n1);
    } else {
      rows_all_m<F, false>(p, n0, n1);
    }
  });
}

void qlinear_int8_avx2(const QLinearProblem& p, int64_t n0, int64_t n1) {
  FASTADAPT_DISPATCH_QFORMAT(p.fmt, F, [&] {
    if constexpr (kNibbleFormat<F>) {
      int8_nibble_all_m<F>(p, n0, n1);
    } else if constexpr (F == QFormat::Q8_0) {
      gguf_block_all_m<F, true>(p, n0, n1);
    } else {
      rows_all_m<F, true>(p, n0, n1);
    }
  });
}

void qlinear_gemm_avx2(const QLinearProblem& p, int64_t n0, int64_t n1) {
  FASTADAPT_DISPATCH_QFORMAT(p.fmt, F, [&] { gemm<F>(p, n0, n1); });
}

}  // namespace fastadapt::cpu
