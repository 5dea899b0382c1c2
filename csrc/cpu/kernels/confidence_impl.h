// Confidence kernel bodies, included once per ISA TU with FASTADAPT_CONFIDENCE_SUFFIX set.
// One pass over each logits row in L1-sized chunks: the chunk is converted to fp32 (times
// 1/temperature), its max found; only a chunk whose max beats the running second-best is scanned
// for top-1/top-2 (after the first chunks almost none is), and the running sums are rescaled when
// the max grows (online softmax). The exp is the library's polynomial (exp_poly.h), 8 lanes at a
// time in the AVX2 build. Internal linkage for everything but the suffixed entry points (two TUs,
// one body, different flags: see qdecode_scalar.h).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/kernels/confidence_kernels.h"
#include "cpu/kernels/elem_convert.h"
#include "cpu/kernels/exp_poly.h"

#ifndef FASTADAPT_CONFIDENCE_SUFFIX
#error "define FASTADAPT_CONFIDENCE_SUFFIX before including confidence_impl.h"
#endif
#define FA_CONF_CAT2(a, b) a##_##b
#define FA_CONF_CAT(a, b) FA_CONF_CAT2(a, b)
#define FA_CONF_NAME(n) FA_CONF_CAT(n, FASTADAPT_CONFIDENCE_SUFFIX)

namespace fastadapt::cpu {
namespace {

constexpr int64_t kConfChunk = 512;  // 2 KiB of fp32: stays in L1 between the two sweeps
constexpr float kConfNegInf = -std::numeric_limits<float>::infinity();
constexpr float kConfDMin = -104.f;  // e^-104 rounds to 0; clamping keeps 0 * (x - m) finite

template <typename T>
inline void conf_load_chunk(const T* x, int64_t n, float inv_temp, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = load_f32(x + i) * inv_temp;
}

// s += sum e^d, t += sum e^d d with d = max(buf[i] - m, -104)
inline void conf_exp_sums(const float* buf, int64_t n, float m, float& s, float& t) {
  int64_t i = 0;
  float ss = 0.f, tt = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 vs = _mm256_setzero_ps(), vt = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(m), vmin = _mm256_set1_ps(kConfDMin);
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(buf + i), vm), vmin);
    const __m256 e = exp_poly8(d);
    vs = _mm256_add_ps(vs, e);
    vt = _mm256_fmadd_ps(e, d, vt);
  }
  alignas(32) float ls[8], lt[8];
  _mm256_store_ps(ls, vs);
  _mm256_store_ps(lt, vt);
  for (int k = 0; k < 8; ++k) {
    ss += ls[k];
    tt += lt[k];
  }
#endif
  for (; i < n; ++i) {
    const float d0 = buf[i] - m;
    const float d = d0 > kConfDMin ? d0 : kConfDMin;  // NaN (-inf - -inf) clamps too
    const float e = exp_poly(d);
    ss += e;
    tt += e * d;
  }
  s += ss;
  t += tt;
}

inline float conf_max(const float* buf, int64_t n) {
  float mx = kConfNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, buf[i]);
  return mx;
}

// Exact state of one chunk already in fp32 (indices base .. base + n - 1).
inline ConfState conf_chunk_state(const float* buf, int64_t n, int64_t base) {
  ConfState st{buf[0], 0.f, 0.f, kConfNegInf, base};
  for (int64_t i = 1; i < n; ++i) {  // top two in index order: the first maximum wins
    const float v = buf[i];
    if (v > st.m) {
      st.v2 = st.m;
      st.m = v;
      st.i1 = base + i;
    } else if (v > st.v2) {
      st.v2 = v;
    }
  }
  conf_exp_sums(buf, n, st.m, st.s, st.t);
  return st;
}

template <typename T>
ConfState conf_row(const T* x, int64_t v0, int64_t v1, float inv_temp) {
  ConfState acc{kConfNegInf, 0.f, 0.f, kConfNegInf, v0};
  alignas(32) float buf[kConfChunk];
  for (int64_t c0 = v0; c0 < v1; c0 += kConfChunk) {
    const int64_t n = std::min(kConfChunk, v1 - c0);
    conf_load_chunk(x + c0, n, inv_temp, buf);
    if (c0 != v0 && conf_max(buf, n) <= acc.v2) {
      // common case: nothing here reaches the top two, so the chunk's sums accumulate against
      // the running max directly (no scan, no rescale)
      conf_exp_sums(buf, n, acc.m, acc.s, acc.t);
      continue;
    }
    const ConfState cs = conf_chunk_state(buf, n, c0);  // rare after the first chunks
    acc = c0 == v0 ? cs : confidence_merge(acc, cs);
  }
  return acc;
}

}  // namespace

ConfState FA_CONF_NAME(confidence_slice)(const void* x, int dtype, int64_t v0, int64_t v1, float inv_temp) {
  switch (dtype) {
    case 1: return conf_row(static_cast<const Fp16*>(x), v0, v1, inv_temp);
    case 2: return conf_row(static_cast<const Bf16*>(x), v0, v1, inv_temp);
    default: return conf_row(static_cast<const float*>(x), v0, v1, inv_temp);
  }
}

void FA_CONF_NAME(hidden_cosine_rows)(const void* a, const void* b, int dtype, int64_t H, int64_t r0,
                                      int64_t r1, float eps, float* out) {
  alignas(32) float ba[kConfChunk], bb[kConfChunk];
  for (int64_t r = r0; r < r1; ++r) {
    float dot = 0.f, na = 0.f, nb = 0.f;
    for (int64_t c0 = 0; c0 < H; c0 += kConfChunk) {
      const int64_t n = std::min(kConfChunk, H - c0);
      const int64_t off = r * H + c0;
      switch (dtype) {
        case 1:
          conf_load_chunk(static_cast<const Fp16*>(a) + off, n, 1.f, ba);
          conf_load_chunk(static_cast<const Fp16*>(b) + off, n, 1.f, bb);
          break;
        case 2:
          conf_load_chunk(static_cast<const Bf16*>(a) + off, n, 1.f, ba);
          conf_load_chunk(static_cast<const Bf16*>(b) + off, n, 1.f, bb);
          break;
        default:
          conf_load_chunk(static_cast<const float*>(a) + off, n, 1.f, ba);
          conf_load_chunk(static_cast<const float*>(b) + off, n, 1.f, bb);
          break;
      }
#pragma omp simd reduction(+ : dot, na, nb)
      for (int64_t i = 0; i < n; ++i) {
        dot += ba[i] * bb[i];
        na += ba[i] * ba[i];
        nb += bb[i] * bb[i];
      }
    }
    out[r] = dot / std::max(std::sqrt(na) * std::sqrt(nb), eps);
  }
}

}  // namespace fastadapt::cpu

#undef FA_CONF_NAME
#undef FA_CONF_CAT
#undef FA_CONF_CAT2
