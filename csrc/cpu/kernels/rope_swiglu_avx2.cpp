// AVX2 + FMA + F16C build of the RoPE and SwiGLU kernels (this TU alone gets those flags): 8 fp32
// lanes per step, fp16/bf16 widened on load and rounded on store; scalar tails from
// rope_swiglu_impl.h.
#include <immintrin.h>

#include "cpu/kernels/rope_swiglu_impl.h"

namespace fastadapt::cpu {
namespace {

template <typename T>
inline void rope_row_avx2(T* x, const float* cs, int64_t D, bool interleaved) {
  const int64_t half = D / 2;
  const float* c = cs;
  const float* s = cs + half;
  int64_t i = 0;
  if (!interleaved) {  // pairs (i, i + D/2): 8 pairs per step
    for (; i + 8 <= half; i += 8) {
      const __m256 a = load8(x + i), b = load8(x + half + i);
      const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
      store8(x + i, _mm256_fmsub_ps(a, cv, _mm256_mul_ps(b, sv)));
      store8(x + half + i, _mm256_fmadd_ps(b, cv, _mm256_mul_ps(a, sv)));
    }
  } else {  // pairs (2i, 2i + 1): 4 pairs per step, cos/sin of pair j on lanes 2j and 2j + 1
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    for (; i + 4 <= half; i += 4) {
      const __m256 v = load8(x + 2 * i);
      const __m256 cv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c + i)), dup);
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + i)), dup);
      const __m256 swapped = _mm256_permute_ps(v, 0xB1);  // (b, a) in each pair
      // even lanes a c - b s, odd lanes b c + a s
      store8(x + 2 * i, _mm256_fmaddsub_ps(v, cv, _mm256_mul_ps(swapped, sv)));
    }
  }
  rope_row_scalar(x, cs, D, interleaved, i);
}

template <typename T>
inline void silu_mul_row_avx2(const T* x, T* y, int64_t F) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  int64_t i = 0;
  for (; i + 8 <= F; i += 8) {  // (g >= 0 ? g : g e) / (1 + e), e = e^-|g|: see rope_swiglu_impl.h
    const __m256 g = load8(x + i), u = load8(x + F + i);
    const ExpParts8 ep = exp_poly8_parts(_mm256_or_ps(g, sign));  // e^-|g|
    const __m256 e = _mm256_mul_ps(_mm256_mul_ps(ep.p, ep.s1), ep.s2);
    __m256 ge = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(g, ep.p), ep.s1), ep.s2);
    ge = _mm256_blendv_ps(ge, _mm256_mul_ps(g, e), _mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_EQ_OQ));
    const __m256 num = _mm256_blendv_ps(g, ge, g);  // g * e where g's sign bit is set
    store8(y + i, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), u));
  }
  silu_mul_row_scalar(x, y, F, i);
}

}  // namespace

void rope_rows_avx2(const RopeProblem& p, int64_t r0, int64_t r1) {
  dispatch_elem(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_rows_drive<T>(p, r0, r1, [&](T* x, const float* cs) {
      rope_row_avx2(x, cs, p.D, p.interleaved);
    });
  });
}

void silu_mul_rows_avx2(const SiluMulProblem& p, int64_t r0, int64_t r1) {
  dispatch_elem(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    for (int64_t r = r0; r < r1; ++r) silu_mul_row_avx2(x + r * p.x_stride, y + r * p.F, p.F);
  });
}

}  // namespace fastadapt::cpu
