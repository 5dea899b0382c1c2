// Torch-free CPU kernels of the RoPE and SwiGLU fusions (fastadapt::rope, fastadapt::silu_mul).
// One build per ISA (rope_swiglu_generic.cpp, rope_swiglu_avx2.cpp), picked at run time by the
// glue (cpu/rope_swiglu_cpu.cpp). Math in fp32; 16-bit elements are widened on load and rounded
// to nearest even on store.
#pragma once
#include <cstdint>

namespace fastadapt::cpu {

// Element type of the activations the kernels read and write.
enum class ElemType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// In-place rotary embedding of q and k. Work is split in "head rows": row r = t * (Hq + Hk) + h
// is q[t, h] for h < Hq, else k[t, h - Hq]; every row is D contiguous elements.
struct RopeProblem {
  void* q = nullptr;             // [T, Hq, D] elem; element strides below, last dim contiguous
  int64_t q_stride_t = 0, q_stride_h = 0;
  void* k = nullptr;             // [T, Hk, D] elem
  int64_t k_stride_t = 0, k_stride_h = 0;
  int64_t T = 0, Hq = 0, Hk = 0;
  int64_t D = 0;                 // head dim, even
  const void* positions = nullptr;  // [T] int32 or int64, contiguous; each in [0, rows of cos_sin)
  bool positions_i64 = true;
  const float* cos_sin = nullptr;   // [max_pos, D] fp32: cos(p * f_i) for i < D/2, then sin(p * f_i)
  int64_t cs_stride = 0;            // elements between rows of cos_sin
  bool interleaved = false;  // false: pairs (i, i + D/2) (rotate-half); true: pairs (2i, 2i + 1)
  ElemType dtype = ElemType::F32;
};

// Rotates head rows [r0, r1): (a, b) -> (a cos - b sin, b cos + a sin) for each pair i.
void rope_rows_generic(const RopeProblem& p, int64_t r0, int64_t r1);
void rope_rows_avx2(const RopeProblem& p, int64_t r0, int64_t r1);

// SwiGLU activation: y[r, i] = silu(x[r, i]) * x[r, F + i], silu(g) = g / (1 + exp(-g)).
struct SiluMulProblem {
  const void* x = nullptr;  // [rows, 2F] elem, last dim contiguous; gate then up
  int64_t x_stride = 0;     // elements between rows of x
  void* y = nullptr;        // [rows, F] elem, contiguous
  int64_t rows = 0, F = 0;
  ElemType dtype = ElemType::F32;
};

// Rows [r0, r1).
void silu_mul_rows_generic(const SiluMulProblem& p, int64_t r0, int64_t r1);
void silu_mul_rows_avx2(const SiluMulProblem& p, int64_t r0, int64_t r1);

}  // namespace fastadapt::cpu
