// CPU lut_linear kernels: the problem description and one entry point per step and ISA.
// Torch-free: the glue (cpu/lut_linear_cpu.cpp) checks arguments, widens x to fp32, allocates the
// workspace and splits the work over threads.
#pragma once
#include <cstdint>

#include "cpu/kernels/lut_format.h"

namespace fastadapt::cpu {

struct LutProblem {
  const float* x = nullptr;          // [M, K] fp32, row stride x_stride
  int64_t M = 0, K = 0, x_stride = 0;
  int64_t N = 0, bits = 0, group_size = 0, groups = 0;  // groups = K / group_size
  const uint8_t* planes = nullptr;   // [NB, K/8, bits, 32]
  const float* scales = nullptr;     // [NB, groups, 32]
  const int8_t* zoffs = nullptr;     // [NB, groups, 32] or null: zoff for every (row, group)
  int32_t zoff = -1;
  const float* bias = nullptr;       // [N] or null
  // workspace, written by lut_prepare_*: the activation tables and per-group terms
  uint8_t* tables = nullptr;         // [M, K/4, 32] (lut_format.h)
  float* half_scale = nullptr;       // [M, groups]: a_g / 2
  int32_t* xq_sum = nullptr;         // [M, groups]: sum of xq over the group
  float* y = nullptr;                // [M, N] fp32, row stride y_stride
  int64_t y_stride = 0;
};

// Quantize rows [m0, m1) of x per group to int8 and build their tables (fused precompute).
void lut_prepare_generic(const LutProblem& p, int64_t m0, int64_t m1);
void lut_prepare_avx2(const LutProblem& p, int64_t m0, int64_t m1);
// y rows of row blocks [rb0, rb1) for every row of x (tables read-only, shared by all threads).
void lut_gemv_generic(const LutProblem& p, int64_t rb0, int64_t rb1);
void lut_gemv_avx2(const LutProblem& p, int64_t rb0, int64_t rb1);

}  // namespace fastadapt::cpu
