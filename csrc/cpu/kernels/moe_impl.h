// MoE kernel bodies, included by one TU per ISA with FASTADAPT_MOE_SUFFIX set (moe_generic.cpp,
// moe_avx2.cpp): plain loops written for the vectoriser (omp simd), so each TU's flags pick the
// vector width. Internal-linkage helpers only (no weak symbols in the avx2 TU).
#include <cmath>
#include <cstdint>

#include "cpu/kernels/moe_kernels.h"

#ifndef FASTADAPT_MOE_SUFFIX
#error "define FASTADAPT_MOE_SUFFIX before including moe_impl.h"
#endif
#define FA_MOE_CAT2(a, b) a##_##b
#define FA_MOE_CAT(a, b) FA_MOE_CAT2(a, b)
#define FA_MOE_FN(name) FA_MOE_CAT(name, FASTADAPT_MOE_SUFFIX)

namespace fastadapt::cpu {

void FA_MOE_FN(moe_topk_rows)(const float* logits, int64_t E_all, int64_t E, int64_t k,
                              bool renorm, int64_t t0, int64_t t1, int32_t* topk_ids,
                              float* topk_w) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* l = logits + t * E_all;
    int32_t* ids = topk_ids + t * k;
    float* w = topk_w + t * k;
    float mx = -INFINITY;
    for (int64_t e = 0; e < E_all; ++e) mx = l[e] > mx ? l[e] : mx;
    float sum = 0.f;
    for (int64_t e = 0; e < E_all; ++e) sum += std::exp(l[e] - mx);
    // k passes of an argmax over the experts not yet taken; k is small (<= E_all), so this beats
    // a sort and keeps the lower-index-first tie rule trivially
    float real_sum = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      float bv = -INFINITY;
      for (int64_t e = 0; e < E_all; ++e) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken |= ids[i] == e;
        if (!taken && (best < 0 || l[e] > bv)) {
          best = e;
          bv = l[e];
        }
      }
      ids[j] = static_cast<int32_t>(best);
      w[j] = std::exp(bv - mx) / sum;
      if (best < E) real_sum += w[j];
    }
    if (renorm) {
      // AdaMoE: null experts contribute nothing; the real choices' weights sum to 1
      const float inv = real_sum > 0.f ? 1.f / real_sum : 0.f;
      for (int64_t j = 0; j < k; ++j) w[j] = ids[j] < E ? w[j] * inv : 0.f;
    }
  }
}

void FA_MOE_FN(moe_combine_rows)(const float* y, int64_t N, const float* w, const int32_t* rows,
                                 int64_t k, int64_t t0, int64_t t1, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    float* o = out + t * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) o[n] = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = rows[t * k + j];
      if (r < 0) continue;
      const float a = w[r];
      const float* yr = y + static_cast<int64_t>(r) * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) o[n] += a * yr[n];
    }
  }
}

}  // namespace fastadapt::cpu

#undef FA_MOE_FN
#undef FA_MOE_CAT
#undef FA_MOE_CAT2
