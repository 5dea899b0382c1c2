// CPU qlinear kernels: the problem description and one entry point per path and ISA.
// Torch-free: the glue (cpu/qlinear_cpu.cpp) checks arguments, prepares activations and splits
// the output features over threads; a kernel computes y[:, n0:n1].
#pragma once
#include <cstdint>

#include "cpu/kernels/qformat.h"

namespace fastadapt::cpu {

struct QLinearProblem {
  // activations, fp32 row-major (bf16/fp16 inputs are widened by the glue; x is small next to W)
  const float* x = nullptr;       // [M, K], row stride x_stride
  int64_t M = 0, K = 0, x_stride = 0;
  // per-row sums of x over each `xsum_unit` values (fp path: of x; int8 path: of xscale * xq);
  // the unit is the span of one (scale, offset) pair: group_size for int formats, 16 for GGUF
  const float* xsum = nullptr;    // [M, K / xsum_unit]
  int64_t xsum_unit = 16;
  // int8 activations (act_quant == "int8"), per token: xq = round(x / xscale)
  const int8_t* xq = nullptr;     // [M, K]
  const float* xscale = nullptr;  // [M]
  // packed weight
  QFormat fmt = QFormat::INT4;
  const uint8_t* qdata = nullptr;  // [N, row_bytes]
  int64_t N = 0, row_bytes = 0;
  const void* scales = nullptr;    // [N, groups] (int formats)
  ScaleType scale_type = ScaleType::F32;
  const uint8_t* zeros = nullptr;  // [N, groups] or null: symmetric, zero = 2^(bits-1)
  int64_t group_size = 0, groups = 0;
  const float* bias = nullptr;     // [N] or null
  // output, fp32
  float* y = nullptr;              // [M, N], row stride y_stride
  int64_t y_stride = 0;
};

// Decode (small M): every weight chunk is decoded once and dotted with all M rows of x.
void qlinear_gemv_generic(const QLinearProblem& p, int64_t n0, int64_t n1);
void qlinear_gemv_avx2(const QLinearProblem& p, int64_t n0, int64_t n1);
// Prefill (larger M): a panel of W is dequantized into a cache-resident fp32 tile, then a
// register-blocked micro-kernel runs over it. n0, n1 are multiples of kGemmPanel (n1 may be N).
constexpr int64_t kGemmPanel = 16;
void qlinear_gemm_generic(const QLinearProblem& p, int64_t n0, int64_t n1);
void qlinear_gemm_avx2(const QLinearProblem& p, int64_t n0, int64_t n1);
// int8 activations (W4A8 in the manner of DGQ): integer dot products summed over each weight
// group, the group's scale applied once after its integer dot product, the token's at the end.
void qlinear_int8_generic(const QLinearProblem& p, int64_t n0, int64_t n1);
void qlinear_int8_avx2(const QLinearProblem& p, int64_t n0, int64_t n1);

// Activation preparation (portable; O(M*K)).
// xsum[m, u] = sum of x[m, unit*u : unit*(u+1)]   (unit: a multiple of 16 dividing K)
void prepare_x_sums(const float* x, int64_t M, int64_t K, int64_t x_stride, int64_t unit,
                    float* xsum);
// Per-token symmetric int8: xscale[m] = max|x[m]| / 127, xq = round_half_away(x / xscale) (0 for
// an all-zero row), xsum[m, u] = xscale[m] * sum of xq over the unit.
void prepare_x_int8(const float* x, int64_t M, int64_t K, int64_t x_stride, int64_t unit,
                    int8_t* xq, float* xscale, float* xsum);

}  // namespace fastadapt::cpu
