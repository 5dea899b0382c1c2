// Scalar bodies of the RoPE and SwiGLU kernels and their row drivers, included by one TU per ISA:
// the generic build runs them whole; the AVX2 build (rope_swiglu_avx2.cpp) runs its own 8-wide
// loops and these for the tails. Internal linkage only, see elem_convert.h.
#pragma once
#include <cstdint>

#include "cpu/kernels/elem_convert.h"
#include "cpu/kernels/exp_poly.h"
#include "cpu/kernels/rope_swiglu_kernels.h"

namespace fastadapt::cpu {
namespace {

// Pairs [i0, D/2) of one head row x [D]; cs = the position's cos_sin row (cos [D/2], sin [D/2]).
template <typename T>
inline void rope_row_scalar(T* x, const float* cs, int64_t D, bool interleaved, int64_t i0) {
  const int64_t half = D / 2;
  const float* c = cs;
  const float* s = cs + half;
  if (!interleaved) {
    for (int64_t i = i0; i < half; ++i) {
      const float a = load_f32(x + i), b = load_f32(x + half + i);
      store_f32(x + i, a * c[i] - b * s[i]);
      store_f32(x + half + i, b * c[i] + a * s[i]);
    }
  } else {
    for (int64_t i = i0; i < half; ++i) {
      const float a = load_f32(x + 2 * i), b = load_f32(x + 2 * i + 1);
      store_f32(x + 2 * i, a * c[i] - b * s[i]);
      store_f32(x + 2 * i + 1, b * c[i] + a * s[i]);
    }
  }
}

// Calls row(x, cs) for head rows [r0, r1) (see RopeProblem).
template <typename T, typename RowFn>
inline void rope_rows_drive(const RopeProblem& p, int64_t r0, int64_t r1, RowFn&& row) {
  const int64_t H = p.Hq + p.Hk;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r / H, h = r - t * H;
    const int64_t pos = p.positions_i64 ? static_cast<const int64_t*>(p.positions)[t]
                                        : static_cast<const int32_t*>(p.positions)[t];
    T* x = h < p.Hq ? static_cast<T*>(p.q) + t * p.q_stride_t + h * p.q_stride_h
                    : static_cast<T*>(p.k) + t * p.k_stride_t + (h - p.Hq) * p.k_stride_h;
    row(x, p.cos_sin + pos * p.cs_stride);
  }
}

// silu(g) * u for columns [i0, F) of one row: x = gate [F] then up [F].
// silu(g) = g / (1 + e^-g) for g >= 0 (torch's formula) and g e^g / (1 + e^g) for g < 0, i.e.
// (g >= 0 ? g : g e) / (1 + e) with e = e^-|g|: e never overflows, so results that torch's
// formula flushes to -0 (g in [-91.8, -88.7], where e^-g overflows fp32) keep their true value;
// g e is formed as ((g p) s1) s2 from the parts of e, so it stays accurate where e alone is
// subnormal (g < -87.3); where e is 0 it is g * 0 (-0, or NaN for g = -inf: silu(-inf) is NaN as
// in torch). silu(+inf) = +inf; NaN stays NaN.
template <typename T>
inline void silu_mul_row_scalar(const T* x, T* y, int64_t F, int64_t i0) {
  for (int64_t i = i0; i < F; ++i) {
    const float g = load_f32(x + i), u = load_f32(x + F + i);
    const ExpParts ep = exp_poly_parts(-__builtin_fabsf(g));
    const float e = ep.p * ep.s1 * ep.s2;
    const float ge = e == 0.f ? g * e : g * ep.p * ep.s1 * ep.s2;
    const float num = g < 0.f ? ge : g;
    store_f32(y + i, num / (1.f + e) * u);
  }
}

// Runs fn(T{}) with T the storage type of `dtype`.
template <typename Fn>
inline void dispatch_elem(ElemType dtype, Fn&& fn) {
  switch (dtype) {
    case ElemType::F32: fn(float{}); break;
    case ElemType::F16: fn(Fp16{}); break;
    case ElemType::BF16: fn(Bf16{}); break;
  }
}

}  // namespace
}  // namespace fastadapt::cpu
