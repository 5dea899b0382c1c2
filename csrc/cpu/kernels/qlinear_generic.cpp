// Portable qlinear kernels: plain C++, no intrinsics. The fallback on CPUs without AVX2 and the
// path every ISA-specific kernel is compared against in the tests.
#include <cmath>

#include "cpu/kernels/qdecode_scalar.h"

namespace fastadapt::cpu {
namespace {

// The 32 codes of chunk c of a weight row, in order (signed for 8-bit formats).
template <QFormat F>
void chunk_codes(const uint8_t* row, int64_t c, int32_t q[32]) {
  if constexpr (F == QFormat::INT8) {
    const uint8_t* s = row + c * 32;
    for (int i = 0; i < 32; ++i) q[i] = static_cast<int32_t>(s[i]) - 128;
  } else if constexpr (F == QFormat::Q8_0) {
    const int8_t* s = reinterpret_cast<const int8_t*>(row + c * 34 + 2);
    for (int i = 0; i < 32; ++i) q[i] = s[i];
  } else if constexpr (F == QFormat::INT4 || F == QFormat::Q4_0 || F == QFormat::Q4_1) {
    const uint8_t* s = F == QFormat::INT4 ? row + c * 16 : F == QFormat::Q4_0 ? row + c * 18 + 2
                                                                             : row + c * 20 + 4;
    for (int j = 0; j < 16; ++j) {
      q[j] = s[j] & 15;
      q[j + 16] = s[j] >> 4;
    }
  } else if constexpr (F == QFormat::INT2 || F == QFormat::INT3) {
    const uint8_t* s = row + c * (F == QFormat::INT2 ? 8 : 12);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) q[j + 8 * i] = (s[j] >> (2 * i)) & 3;
    if constexpr (F == QFormat::INT3) {
      const uint32_t h = s[8] | s[9] << 8 | s[10] << 16 | static_cast<uint32_t>(s[11]) << 24;
      for (int i = 0; i < 32; ++i) q[i] |= ((h >> i) & 1) << 2;
    }
  } else if constexpr (F == QFormat::Q4_K) {
    const int j = static_cast<int>(c & 7);
    const uint8_t* qs = row + (c >> 3) * 144 + 16 + 32 * (j >> 1);
    for (int l = 0; l < 32; ++l) q[l] = (j & 1) ? qs[l] >> 4 : qs[l] & 15;
  } else if constexpr (F == QFormat::Q6_K) {
    const int k = static_cast<int>(c & 7), half = k >> 2, cc = k & 3;
    const uint8_t* blk = row + (c >> 3) * 210;
    const uint8_t* ql = blk + 64 * half + ((cc & 1) ? 32 : 0);
    const uint8_t* qh = blk + 128 + 32 * half;
    for (int l = 0; l < 32; ++l)
      q[l] = ((ql[l] >> ((cc & 2) ? 4 : 0)) & 15) | ((qh[l] >> (2 * cc)) & 3) << 4;
  }
}

// Offsets: w = a*q + b, so sum(w*x) = a*sum(q*x) + b*sum(x). Int formats keep (a, b) for a
// whole group and take b*sum(x) once per group; GGUF formats change them every 16 values.
template <QFormat F>
float offset_term(const float* xsum, int64_t c, int64_t chunks_per_group, const float b[2]) {
  if constexpr (is_gguf_format<F>) {
    return b[0] * xsum[2 * c] + b[1] * xsum[2 * c + 1];
  } else {
    return c % chunks_per_group == 0 ? b[0] * xsum[c / chunks_per_group] : 0.f;
  }
}

template <QFormat F, bool kInt8>
void rows(const QLinearProblem& p, int64_t n0, int64_t n1) {
  const int64_t chunks = p.K / 32;
  const int64_t cpg = is_gguf_format<F> ? 1 : p.group_size / 32;
  int32_t q[32];
  float a[2], b[2];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qdata + n * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xs = p.xsum + m * (p.K / p.xsum_unit);
      float acc = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        chunk_codes<F>(row, c, q);
        chunk_affine<F>(p, row, n, c, is_gguf_format<F> ? 0 : c / cpg, a, b);
        if constexpr (kInt8) {
          const int8_t* xq = p.xq + m * p.K + 32 * c;
          const float sx = p.xscale[m];
          int32_t s0 = 0, s1 = 0;  // exact integer dot products of each half
          for (int i = 0; i < 16; ++i) s0 += q[i] * xq[i];
          for (int i = 16; i < 32; ++i) s1 += q[i] * xq[i];
          acc += sx * (a[0] * static_cast<float>(s0) + a[1] * static_cast<float>(s1));
        } else {
          const float* x = p.x + m * p.x_stride + 32 * c;
          float s0 = 0.f, s1 = 0.f;
          for (int i = 0; i < 16; ++i) s0 += static_cast<float>(q[i]) * x[i];
          for (int i = 16; i < 32; ++i) s1 += static_cast<float>(q[i]) * x[i];
          acc += a[0] * s0 + a[1] * s1;
        }
        acc += offset_term<F>(xs, c, cpg, b);
      }
      p.y[m * p.y_stride + n] = acc + (p.bias ? p.bias[n] : 0.f);
    }
  }
}

}  // namespace

void qlinear_gemv_generic(const QLinearProblem& p, int64_t n0, int64_t n1) {
  FASTADAPT_DISPATCH_QFORMAT(p.fmt, F, [&] { rows<F, false>(p, n0, n1); });
}

// The portable path has no register blocking to gain from: prefill reuses the row loop.
void qlinear_gemm_generic(const QLinearProblem& p, int64_t n0, int64_t n1) {
  qlinear_gemv_generic(p, n0, n1);
}

void qlinear_int8_generic(const QLinearProblem& p, int64_t n0, int64_t n1) {
  FASTADAPT_DISPATCH_QFORMAT(p.fmt, F, [&] { rows<F, true>(p, n0, n1); });
}

void prepare_x_sums(const float* x, int64_t M, int64_t K, int64_t x_stride, int64_t unit,
                    float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * x_stride;
    for (int64_t u = 0; u < K / unit; ++u) {
      float s = 0.f;
      for (int64_t i = 0; i < unit; ++i) s += xr[unit * u + i];
      xsum[m * (K / unit) + u] = s;
    }
  }
}

void prepare_x_int8(const float* x, int64_t M, int64_t K, int64_t x_stride, int64_t unit,
                    int8_t* xq, float* xscale, float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * x_stride;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(xr[k]));
    const float scale = amax / 127.f;
    xscale[m] = scale;
    float* xs = xsum + m * (K / unit);
    for (int64_t u = 0; u < K / unit; ++u) {
      int32_t sum = 0;
      for (int64_t k = u * unit; k < (u + 1) * unit; ++k) {
        // round half away from zero (std::round), the reference's rule
        const float v = scale > 0.f ? std::round(xr[k] / scale) : 0.f;
        const int32_t qv = static_cast<int32_t>(std::fmax(-127.f, std::fmin(127.f, v)));
        xq[m * K + k] = static_cast<int8_t>(qv);
        sum += qv;
      }
      xs[u] = scale * static_cast<float>(sum);
    }
  }
}

}  // namespace fastadapt::cpu
