// RMSNorm kernel body, included by one TU per ISA (rms_norm_generic.cpp, rms_norm_avx2.cpp):
// the loops are written for the compiler's vectoriser (omp simd reductions), so each TU's own
// flags pick the vector width. Internal linkage only: see qdecode_scalar.h for why.
#pragma once
#include <cmath>
#include <cstdint>

namespace fastadapt::cpu {
namespace {

// For rows [r0, r1) of width D (row stride D):
//   if residual: residual[r] += x[r]; src = residual[r]   else src = x[r]
//   y[r] = src * rsqrt(mean(src^2) + eps) * w
inline void rms_norm_rows_impl(const float* x, float* residual, const float* w, float* y,
                               int64_t r0, int64_t r1, int64_t D, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    const float* src = xr;
    if (residual) {
      float* rr = residual + r * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) rr[i] += xr[i];
      src = rr;
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += src[i] * src[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) yr[i] = src[i] * inv * w[i];
  }
}

}  // namespace
}  // namespace fastadapt::cpu
