// Bit-plane weight layout of fastadapt::lut_linear (CPU and CUDA kernels). Torch-free.
// Python definition, bit-exact: python/fastadapt_ops/ops/lut_formats.py.
//
// W [N, K] of b bits (1..4): codes q in [0, 2^b - 1], per (row, group of gs values) a scale s and
// a zero offset zo = 2^b - 1 - 2 z (so w = s (q - z) = s/2 (sum_i 2^i sigma_i + zo), with
// sigma_i = 2 bit_i(q) - 1 in {-1, +1}). Ternary {-1, 0, +1}: codes {0, 1, 2}, z = 1 -> zo = +1;
// symmetric int formats: z = 2^(b-1) -> zo = -1; 1-bit sign weights: z = 1/2 -> zo = 0.
//
//   planes  uint8   [NB, K/8, b, 32]   NB = ceil(N / 32) row blocks; chunk pair cp = K/8 values
//   scales  float32 [NB, K/gs, 32]     natural row order inside a block, padded rows 0
//   zoffs   int8    [NB, K/gs, 32]     or absent: one constant zo
//
// Byte j of planes[rb][cp][i] holds bit plane i of row 32 rb + lut_row_of_byte(j): low nibble =
// index over x[8cp .. 8cp+3], high nibble over x[8cp+4 .. 8cp+7] (bit e of an index = bit i of
// the e-th code of the 4). The row order undoes the AVX2 interleaving (vpunpck{l,h}bw, then
// vpunpck{l,h}wd + vpmaddwd): its four int32 accumulators come out as rows 0-7, 8-15, 16-23, 24-31.
//
// Activation tables (built per call, per row of x): for chunk c of 4 values,
//   T_c[p] = sum_e (bit e of p ? +xq : -xq)[4c + e],   |T| <= 4 * 127 = 508 (int16),
// T_c[15 - p] = -T_c[p] (the CPU stores all 16 for vpshufb; CUDA keeps the 8-entry half).
// CPU table bytes: [K/4][32]: bytes 0..15 = low bytes of T_c[0..15], 16..31 = high bytes (two int8
// vpshufb tables whose results vpunpck{l,h}bw rebuilds into exact int16).
//
// Accumulation: per plane in int16, at most 64 lookups (32 chunk pairs) before widening to int32
// (64 * 508 = 32512 < 32767); per group I = sum_i 2^i A_i + zo * sum(xq) in int32 (|I| <=
// 2 * 15 * 127 * gs: gs <= 2^20 is checked); y += (s * a_g / 2) * float(I) in fp32 (exact float(I)
// while |I| < 2^24, i.e. gs <= ~4400; beyond that one fp32 rounding per group).
#pragma once
#include <cstdint>

namespace fastadapt {

constexpr int64_t kLutRowBlock = 32;       // rows per block
constexpr int64_t kLutChunkPairsPerSpan = 32;  // int16 accumulation span (64 lookups of <= 508)
constexpr int64_t kLutMaxGroup = int64_t(1) << 20;

inline constexpr int lut_row_of_byte(int j) { return 8 * ((j % 16) / 4) + 4 * (j / 16) + j % 4; }

}  // namespace fastadapt
