// Packed weight formats read by the qlinear kernels (CPU and CUDA). Torch-free.
//
// A quantized weight W of shape [N, K] (out_features, in_features) is stored row by row:
//   qdata  uint8 [N, row_bytes]  : packed codes (int formats) or raw GGUF blocks (GGUF formats)
//   scales [N, K / group_size]   : fp32 | fp16 | bf16, int formats only
//   zeros  uint8 [N, K / group_size] or absent, int formats only
//
// Int formats (bits b in {2, 3, 4, 8}): codes q in [0, 2^b - 1], w = scale * (q - zero), where
// zero is the stored zero point, or 2^(b-1) when the weight is symmetric (zeros absent).
// K must be a multiple of 32 and of group_size; group_size is a multiple of 32 (32, 64, 128, ...)
// or K itself (per-channel). Along K a row is a sequence of 32-code chunks of 4*b bytes each:
//   int8: 32 bytes, byte j = q[j].
//   int4: 16 bytes, byte j = q[j] | q[j + 16] << 4                 (j < 16)
//   int2:  8 bytes, byte j = q[j] | q[j+8] << 2 | q[j+16] << 4 | q[j+24] << 6   (j < 8)
//   int3: 12 bytes: 8 bytes holding the low two bits of each code in the int2 layout,
//         then a little-endian uint32 whose bit i is bit 2 of q[i].
// These layouts unpack to 32 codes in order with a few shifts and masks on any SIMD width.
//
// GGUF formats are consumed exactly as llama.cpp stores them (blocks along K, fp16 d/dmin):
//   Q4_0 (32 values, 18 B): d, qs[16];         w = d * (nibble - 8), low nibbles are j < 16
//   Q4_1 (32 values, 20 B): d, m, qs[16];      w = d * nibble + m
//   Q8_0 (32 values, 34 B): d, int8 qs[32];    w = d * q
//   Q4_K (256 values, 144 B): d, dmin, scales[12] (8 x 6-bit scale/min pairs), qs[128]
//   Q6_K (256 values, 210 B): ql[128], qh[64], int8 scales[16], d
#pragma once
#include <cstddef>
#include <cstdint>

namespace fastadapt {

enum class QFormat : int32_t {
  INT2 = 2, INT3 = 3, INT4 = 4, INT8 = 8,
  Q4_0 = 100, Q4_1 = 101, Q8_0 = 102, Q4_K = 103, Q6_K = 104,
};

enum class ScaleType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

inline bool is_gguf(QFormat f) { return static_cast<int32_t>(f) >= 100; }

// Values per block along K and bytes per block.
inline int64_t block_values(QFormat f) {
  return (f == QFormat::Q4_K || f == QFormat::Q6_K) ? 256 : 32;
}
inline int64_t block_bytes(QFormat f) {
  switch (f) {
    case QFormat::INT2: return 8;
    case QFormat::INT3: return 12;
    case QFormat::INT4: return 16;
    case QFormat::INT8: return 32;
    case QFormat::Q4_0: return 18;
    case QFormat::Q4_1: return 20;
    case QFormat::Q8_0: return 34;
    case QFormat::Q4_K: return 144;
    case QFormat::Q6_K: return 210;
  }
  return 0;
}
inline int64_t row_bytes(QFormat f, int64_t K) { return K / block_values(f) * block_bytes(f); }

// GGUF block structs, byte-exact with ggml (fp16 fields kept as raw uint16).
struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };
struct BlockQ4_1 { uint16_t d; uint16_t m; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
struct BlockQ4_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct BlockQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };
static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block must be 18 bytes");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block must be 20 bytes");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block must be 34 bytes");
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block must be 144 bytes");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block must be 210 bytes");

}  // namespace fastadapt
