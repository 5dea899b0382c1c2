// CUDA kernels of fastadapt::qlinear (no torch headers: see qlinear_cuda.h for the launcher).
//
//   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),  w = dequant(qdata, scales, zeros)
//
// Both paths read the packed weight straight from global memory and dequantize in registers;
// no dequantized copy of the weight ever exists in global memory.
//
// * GEMV (M <= kQLinearGemvMaxM, and every M with fp32 activations): one warp per R output rows
//   (R = 1 or 2), each lane owns 32-value chunks of K (lane, lane + 32, ...). Per chunk the lane
//   loads the packed bytes with 128/64/32-bit loads (aligned 32-bit loads and a 16-bit shift
//   where a GGUF block is only 2-byte aligned), unpacks the codes to one byte each, and for
//   every activation row computes sum_i x_i * (q_i - off) per 16-value half (exact integer
//   codes), then applies that half's affine once: a * s (+ b * sum x). x is read through L1
//   (__ldg), each x chunk reused for the R rows. A warp shuffle reduces the lanes.
//   blockIdx.y walks M in slabs of MAXM rows, so the kernel is correct for any M.
// * GEMM (larger M, fp16/bf16 activations): a 128-thread block computes a BM x 64 tile of y
//   (BM = 16, 32 or 64). For each 64-wide K tile it copies x into shared memory and dequantizes
//   64 x 64 weights (one 32-value chunk per thread) into shared memory as fp16/bf16, double
//   buffered so one __syncthreads per K tile suffices, then runs WMMA 16x16x16 (mma.sync) with
//   fp32 accumulators. Rows past M or N and the K tail are zero-filled, so any M, N works.
//
// act_quant = "int8" is accepted by the glue and runs the exact path here: CUDA has no int8
// activation kernel yet (a dp4a / int8 mma version would quantize x per 32-block like the CPU
// path). The exact result is at least as accurate as the quantized one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/qlinear_cuda.h"

#define FA_HD __host__ __device__ __forceinline__
// Unroll hint for host+device helpers (host compilers warn about the CUDA pragma).
#ifdef __CUDA_ARCH__
#define FA_UNROLL _Pragma("unroll")
#else
#define FA_UNROLL
#endif

namespace fastadapt {
namespace qlinear_cuda {

// ---- small helpers (host-callable too, so the decoders can be unit-tested on the CPU) -------

// Read-only loads. Alignment is the caller's promise (see each decoder).
template <typename T>
FA_HD T ld_ro(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const T*>(p));
#else
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
#endif
}
FA_HD uint32_t ld_u16(const uint8_t* p) { return ld_ro<unsigned short>(p); }
FA_HD uint32_t ld_u32(const uint8_t* p) { return ld_ro<unsigned int>(p); }
FA_HD uint2 ld_u64(const uint8_t* p) { return ld_ro<uint2>(p); }
FA_HD uint4 ld_u128(const uint8_t* p) { return ld_ro<uint4>(p); }
// 4 * NW bytes from a 2-byte aligned address (GGUF Q4_0 / Q8_0 / Q6_K blocks are only 2-byte
// aligned) as NW little-endian words, with 32-bit loads: when p is 2 mod 4, load the aligned
// words around it and shift by 16. Never touches a byte outside [p & ~3, p + 4 * NW).
template <int NW>
FA_HD void ld_words_a2(const uint8_t* p, uint32_t (&out)[NW]) {
  const bool odd = (reinterpret_cast<uintptr_t>(p) & 2u) != 0;
  const uint8_t* base = p - (odd ? 2 : 0);
  uint32_t w[NW + 1];
  FA_UNROLL
  for (int k = 0; k < NW; ++k) w[k] = ld_u32(base + 4 * k);
  w[NW] = odd ? ld_u16(base + 4 * NW) : 0u;
  FA_UNROLL
  for (int k = 0; k < NW; ++k) out[k] = odd ? ((w[k] >> 16) | (w[k + 1] << 16)) : w[k];
}

FA_HD float half_bits_to_float(uint32_t bits) {
  __half_raw r;
  r.x = static_cast<unsigned short>(bits);
  return __half2float(__half(r));
}

FA_HD float load_scale(const void* s, int64_t i, ScaleType t) {
  switch (t) {
    case ScaleType::F16: return __half2float(static_cast<const __half*>(s)[i]);
    case ScaleType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(s)[i]);
    default: return static_cast<const float*>(s)[i];
  }
}

FA_HD float load_act(const void* p, int64_t i, QLinearDType t) {
  switch (t) {
    case QLinearDType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case QLinearDType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// ---- the decoded 32-value chunk -------------------------------------------------------------

// A 32-value chunk of one weight row, unpacked: code i (an unsigned integer < 256) sits in byte
// i % 4 of q[i / 4], and   w_i = a[h] * (code_i - off) + b[h]   with h = i / 16.
// Only Q6_K has a[0] != a[1]; only Q4_1 and Q4_K have b != 0.
struct Chunk {
  uint32_t q[8];
  float a[2];
  float b[2];
  float magic_off;  // 2^23 + off: (float with bits 0x4B000000 | code) - magic_off == code - off
};

// __byte_perm, with its documented semantics emulated on the host: byte n of the result is
// byte (s >> 4n) & 7 of the 8 bytes {x, y} (x = bytes 0..3).
FA_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, s);
#else
  const uint64_t in = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>((in >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
#endif
}

FA_HD float bits_to_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// code_i - off, exactly, in two instructions (PRMT + FADD): the float whose bit pattern is
// 0x4B000000 | code equals 2^23 + code. Avoids int->float conversions (quarter rate on sm_80/90).
FA_HD float chunk_code(const Chunk& ch, int i) {
  // selector: byte 0 <- code byte i % 4 of the word; bytes 1, 2 <- 0x00; byte 3 <- 0x4B
  const uint32_t bits = byte_perm(ch.q[i >> 2], 0x4B000000u, 0x7440u | (i & 3));
  return bits_to_float(bits) - ch.magic_off;
}

constexpr float kMagic = 8388608.0f;  // 2^23

// Everything a decoder needs about the packed weight (built once on the host).
struct WeightView {
  const uint8_t* qdata;    // [N, row_bytes]
  const void* scales;      // [N, groups] int formats
  const uint8_t* zeros;    // [N, groups] or nullptr
  int64_t row_bytes;
  int64_t groups;          // K / group_size (int formats)
  int32_t group_chunks;    // group_size / 32 (int formats)
  ScaleType scale_type;
};

// Formats with b != 0 need sum(x) per half.
template <QFormat F>
constexpr bool kHasOffsetB = (F == QFormat::Q4_1 || F == QFormat::Q4_K);

// Spreads the 4 low bits of t to bit 0 of bytes 0..3 (the four shifted copies never overlap).
FA_HD uint32_t spread_bits4(uint32_t t) { return (t * 0x00204081u) & 0x01010101u; }

// Byte k (< 12) of three little-endian words, with a runtime k and no local-memory array.
FA_HD uint32_t byte_of12(uint32_t w0, uint32_t w1, uint32_t w2, int k) {
  const uint32_t w = k < 4 ? w0 : (k < 8 ? w1 : w2);
  return (w >> (8 * (k & 3))) & 0xFFu;
}

// Nibble-packed 16 bytes (byte j = q[j] | q[j + 16] << 4) to one code per byte.
FA_HD void unpack_nibbles16(const uint32_t v[4], Chunk& ch) {
FA_UNROLL
  for (int k = 0; k < 4; ++k) {
    ch.q[k] = v[k] & 0x0F0F0F0Fu;
    ch.q[4 + k] = (v[k] >> 4) & 0x0F0F0F0Fu;
  }
}

// Decodes chunk c (values 32c .. 32c + 31 along K) of weight row n.
template <QFormat F>
FA_HD void load_chunk(const WeightView& w, int64_t n, int64_t c, Chunk& ch) {
  const uint8_t* row = w.qdata + n * w.row_bytes;
  if constexpr (F == QFormat::INT2 || F == QFormat::INT3 || F == QFormat::INT4 ||
                F == QFormat::INT8) {
    constexpr int kBits = static_cast<int>(F);
    // 4 * bits bytes per chunk; rows are multiples of 4 * bits bytes and qdata is 16-aligned,
    // so int8/int4 chunks are 16-aligned, int2 8-aligned, int3 4-aligned.
    const uint8_t* p = row + c * (4 * kBits);
    if constexpr (kBits == 8) {
      const uint4 lo = ld_u128(p), hi = ld_u128(p + 16);
      ch.q[0] = lo.x; ch.q[1] = lo.y; ch.q[2] = lo.z; ch.q[3] = lo.w;
      ch.q[4] = hi.x; ch.q[5] = hi.y; ch.q[6] = hi.z; ch.q[7] = hi.w;
    } else if constexpr (kBits == 4) {
      const uint4 v4 = ld_u128(p);
      const uint32_t v[4] = {v4.x, v4.y, v4.z, v4.w};
      unpack_nibbles16(v, ch);
    } else {
      // int2 layout: byte j (< 8) = q[j] | q[j+8] << 2 | q[j+16] << 4 | q[j+24] << 6, so values
      // 8s + 4h .. 8s + 4h + 3 are bits 2s..2s+1 of the bytes in word h.
      uint32_t v[2];
      if constexpr (kBits == 2) {
        const uint2 v2 = ld_u64(p);
        v[0] = v2.x; v[1] = v2.y;
      } else {
        v[0] = ld_u32(p); v[1] = ld_u32(p + 4);
      }
FA_UNROLL
      for (int s = 0; s < 4; ++s) {
        ch.q[2 * s] = (v[0] >> (2 * s)) & 0x03030303u;
        ch.q[2 * s + 1] = (v[1] >> (2 * s)) & 0x03030303u;
      }
      if constexpr (kBits == 3) {
        const uint32_t hb = ld_u32(p + 8);  // bit i = bit 2 of q[i]
FA_UNROLL
        for (int k = 0; k < 8; ++k) ch.q[k] |= spread_bits4((hb >> (4 * k)) & 0xFu) << 2;
      }
    }
    const int64_t g = n * w.groups + c / w.group_chunks;
    const float s = load_scale(w.scales, g, w.scale_type);
    const float z = w.zeros != nullptr ? static_cast<float>(w.zeros[g])
                                       : static_cast<float>(1 << (kBits - 1));
    ch.a[0] = ch.a[1] = s;
    ch.b[0] = ch.b[1] = 0.0f;
    ch.magic_off = kMagic + z;  // zero folded into the exact subtraction: w = s * (q - z)
  } else if constexpr (F == QFormat::Q4_0) {
    const uint8_t* p = row + c * 18;  // 2-byte aligned
    uint32_t v[4];
    ld_words_a2(p + 2, v);
    unpack_nibbles16(v, ch);
    ch.a[0] = ch.a[1] = half_bits_to_float(ld_u16(p));
    ch.b[0] = ch.b[1] = 0.0f;
    ch.magic_off = kMagic + 8.0f;
  } else if constexpr (F == QFormat::Q4_1) {
    const uint8_t* p = row + c * 20;  // 4-byte aligned
    uint32_t v[4];
FA_UNROLL
    for (int k = 0; k < 4; ++k) v[k] = ld_u32(p + 4 + 4 * k);
    unpack_nibbles16(v, ch);
    const uint32_t dm = ld_u32(p);
    ch.a[0] = ch.a[1] = half_bits_to_float(dm & 0xFFFFu);
    ch.b[0] = ch.b[1] = half_bits_to_float(dm >> 16);
    ch.magic_off = kMagic;
  } else if constexpr (F == QFormat::Q8_0) {
    const uint8_t* p = row + c * 34;  // 2-byte aligned
    ld_words_a2(p + 2, ch.q);
FA_UNROLL
    for (int k = 0; k < 8; ++k) ch.q[k] ^= 0x80808080u;  // int8 s -> unsigned s + 128
    ch.a[0] = ch.a[1] = half_bits_to_float(ld_u16(p));
    ch.b[0] = ch.b[1] = 0.0f;
    ch.magic_off = kMagic + 128.0f;
  } else if constexpr (F == QFormat::Q4_K) {
    // 256-value super-block of 8 sub-blocks of 32: sub-block sb uses 6-bit (scale, min) pair sb
    // and the low (even sb) or high (odd sb) nibbles of qs[32 * (sb / 2) .. + 32].
    const int64_t blk = c >> 3;
    const int sb = static_cast<int>(c & 7);
    const uint8_t* p = row + blk * 144;  // 16-byte aligned (144 = 9 * 16)
    const uint32_t dm = ld_u32(p);
    const uint32_t s0 = ld_u32(p + 4), s1 = ld_u32(p + 8), s2 = ld_u32(p + 12);
    uint32_t sc, mn;
    if (sb < 4) {
      sc = byte_of12(s0, s1, s2, sb) & 63u;
      mn = byte_of12(s0, s1, s2, sb + 4) & 63u;
    } else {
      sc = (byte_of12(s0, s1, s2, sb + 4) & 0xFu) | ((byte_of12(s0, s1, s2, sb - 4) >> 6) << 4);
      mn = (byte_of12(s0, s1, s2, sb + 4) >> 4) | ((byte_of12(s0, s1, s2, sb) >> 6) << 4);
    }
    const uint8_t* qs = p + 16 + 32 * (sb >> 1);
    const uint4 lo = ld_u128(qs), hi = ld_u128(qs + 16);
    const uint32_t v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    const int shift = 4 * (sb & 1);
FA_UNROLL
    for (int k = 0; k < 8; ++k) ch.q[k] = (v[k] >> shift) & 0x0F0F0F0Fu;
    ch.a[0] = ch.a[1] = half_bits_to_float(dm & 0xFFFFu) * static_cast<float>(sc);
    ch.b[0] = ch.b[1] = -(half_bits_to_float(dm >> 16) * static_cast<float>(mn));
    ch.magic_off = kMagic;
  } else if constexpr (F == QFormat::Q6_K) {
    // 256 values = 2 halves of 128; in half nh, 32-value part cc takes the low (cc < 2) or high
    // nibbles of ql[64 nh + 32 (cc & 1) ..], bits 2cc..2cc+1 of qh[32 nh ..], and int8 scales
    // sc[8 nh + 2 cc + h] for its 16-value halves h. w = d * sc * (q - 32).
    const int64_t blk = c >> 3;
    const int g = static_cast<int>(c & 7);
    const int nh = g >> 2, cc = g & 3;
    const uint8_t* p = row + blk * 210;  // 2-byte aligned
    const uint8_t* ql = p + 64 * nh + 32 * (cc & 1);
    const uint8_t* qh = p + 128 + 32 * nh;
    const int lshift = 4 * (cc >> 1), hshift = 2 * cc;
    uint32_t l[8], h[8];
    ld_words_a2(ql, l);
    ld_words_a2(qh, h);
FA_UNROLL
    for (int k = 0; k < 8; ++k)
      ch.q[k] = ((l[k] >> lshift) & 0x0F0F0F0Fu) | (((h[k] >> hshift) & 0x03030303u) << 4);
    const uint32_t sc = ld_u16(p + 192 + 8 * nh + 2 * cc);
    const float d = half_bits_to_float(ld_u16(p + 208));
    ch.a[0] = d * static_cast<float>(static_cast<int8_t>(sc & 0xFFu));
    ch.a[1] = d * static_cast<float>(static_cast<int8_t>(sc >> 8));
    ch.b[0] = ch.b[1] = 0.0f;
    ch.magic_off = kMagic + 32.0f;
  } else {
    static_assert(F == QFormat::INT4, "qlinear: load_chunk has no decoder for this format");
  }
}

// ---- activation types -----------------------------------------------------------------------

// 16 consecutive 16-bit values from a 32-byte aligned address, widened by Widen(uint32 pair).
template <typename Widen>
__device__ __forceinline__ void load16_pairs(const void* p, float (&v)[16], Widen widen) {
  const uint4* p4 = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint4 u = __ldg(p4 + j);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = widen(w[e]);
      v[8 * j + 2 * e] = f.x;
      v[8 * j + 2 * e + 1] = f.y;
    }
  }
}

template <typename T> struct ActTraits;
template <> struct ActTraits<__half> {
  static __device__ __forceinline__ void load16(const __half* p, float (&v)[16]) {
    load16_pairs(p, v, [](uint32_t w) {
      __half2 h;
      memcpy(&h, &w, 4);
      return __half22float2(h);
    });
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
  static __device__ __forceinline__ __half from_float(float f) { return __float2half_rn(f); }
};
template <> struct ActTraits<__nv_bfloat16> {
  static __device__ __forceinline__ void load16(const __nv_bfloat16* p, float (&v)[16]) {
    load16_pairs(p, v, [](uint32_t w) {  // bf16 -> fp32 is a shift
      return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
    });
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float f) {
    return __float2bfloat16_rn(f);
  }
};
template <> struct ActTraits<float> {
  static __device__ __forceinline__ void load16(const float* p, float (&v)[16]) {
    const float4* p4 = reinterpret_cast<const float4*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float4 u = __ldg(p4 + j);
      v[4 * j] = u.x; v[4 * j + 1] = u.y; v[4 * j + 2] = u.z; v[4 * j + 3] = u.w;
    }
  }
  static __device__ __forceinline__ float from_float(float f) { return f; }
};

// Everything the kernels read, with derived sizes (built once on the host).
struct KernelArgs {
  WeightView w;
  const void* x;        // [M, K] T, row stride x_stride
  const void* bias;     // [N] bias_dtype or nullptr
  void* out;            // [M, N] T, row stride out_stride
  int64_t M, N, K;
  int64_t x_stride, out_stride;
  QLinearDType bias_dtype;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// ---- GEMV: small M --------------------------------------------------------------------------

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = 32 * kGemvWarps;

// grid: (ceil(N / (kGemvWarps * R)), ceil(M / MAXM)); block: kGemvThreads.
template <QFormat F, typename T, int MAXM, int R>
__global__ void __launch_bounds__(kGemvThreads) qgemv_kernel(const KernelArgs args) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * R;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MAXM;
  if (n0 >= args.N) return;  // whole warp leaves together: no block-level sync below
  const int mcount = static_cast<int>(args.M - m0 < MAXM ? args.M - m0 : MAXM);
  // Rows past N (odd N with R = 2) repeat row N - 1; their results are never stored.
  int64_t rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = n0 + r < args.N ? n0 + r : args.N - 1;

  const T* x = static_cast<const T*>(args.x) + m0 * args.x_stride;
  const int64_t nchunks = args.K >> 5;
  float acc[R][MAXM];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[r][m] = 0.0f;

  for (int64_t c = lane; c < nchunks; c += 32) {
    Chunk ch[R];
#pragma unroll
    for (int r = 0; r < R; ++r) load_chunk<F>(args.w, rows[r], c, ch[r]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m >= mcount) break;  // uniform across the warp
        float xv[16];
        ActTraits<T>::load16(x + m * args.x_stride + 32 * c + 16 * h, xv);
        float sx = 0.0f;
        if constexpr (kHasOffsetB<F>) {
#pragma unroll
          for (int i = 0; i < 16; ++i) sx += xv[i];
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          // Exact small-integer codes times x, two chains for ILP, then one affine per half.
          float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
          for (int i = 0; i < 16; i += 2) {
            s0 = fmaf(xv[i], chunk_code(ch[r], 16 * h + i), s0);
            s1 = fmaf(xv[i + 1], chunk_code(ch[r], 16 * h + i + 1), s1);
          }
          float t = fmaf(ch[r].a[h], s0 + s1, acc[r][m]);
          if constexpr (kHasOffsetB<F>) t = fmaf(ch[r].b[h], sx, t);
          acc[r][m] = t;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[r][m] = warp_sum(acc[r][m]);

  if (lane == 0) {
    T* out = static_cast<T*>(args.out) + m0 * args.out_stride;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      if (n >= args.N) break;
      const float b = args.bias != nullptr ? load_act(args.bias, n, args.bias_dtype) : 0.0f;
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m >= mcount) break;
        out[m * args.out_stride + n] = ActTraits<T>::from_float(acc[r][m] + b);
      }
    }
  }
}

// ---- GEMM: larger M, tensor cores -----------------------------------------------------------

constexpr int kGemmThreads = 128;  // 4 warps
constexpr int kGemmBN = 64;        // output columns (weight rows) per block
constexpr int kGemmBK = 64;        // K per shared-memory tile: 2 chunks per weight row
constexpr int kGemmLds = kGemmBK + 8;  // row pitch in elements: 144 B, ldmatrix conflict-free

// Warp layout over the BM x 64 tile: BM 16 -> 1 x 4 warps of 16 x 16; 32 -> 2 x 2 of 16 x 32;
// 64 -> 2 x 2 of 32 x 32.
template <int BM>
struct GemmShape {
  static constexpr int kWarpsM = BM == 16 ? 1 : 2;
  static constexpr int kWarpsN = 4 / kWarpsM;
  static constexpr int kWarpTileM = BM / kWarpsM;
  static constexpr int kWarpTileN = kGemmBN / kWarpsN;
  static constexpr int kFragM = kWarpTileM / 16;
  static constexpr int kFragN = kWarpTileN / 16;
  static_assert(kFragM >= 1 && kFragN >= 1, "qlinear: bad GEMM tile");
};

// grid: (ceil(N / 64), ceil(M / BM)); block: kGemmThreads. T is __half or __nv_bfloat16.
template <QFormat F, typename T, int BM>
__global__ void __launch_bounds__(kGemmThreads) qgemm_kernel(const KernelArgs args) {
  namespace wmma = nvcuda::wmma;
  using S = GemmShape<BM>;
  // x tile [2][BM][kGemmLds], weight tile [2][64][kGemmLds] (w[n][k], i.e. B = W^T col-major),
  // per-warp 16 x 16 fp32 scratch for the epilogue. 40 KiB at BM = 64.
  __shared__ __align__(128) T xs[2][BM][kGemmLds];
  __shared__ __align__(128) T ws[2][kGemmBN][kGemmLds];
  __shared__ __align__(128) float cs[kGemmThreads / 32][16 * 16];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int wm = warp / S::kWarpsN, wn = warp % S::kWarpsN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGemmBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const T* x = static_cast<const T*>(args.x);
  const int64_t nchunks = args.K >> 5;
  const int64_t ktiles = (nchunks + 1) >> 1;

  // Fills buffer `buf` with K tile kt: x rows as 16-byte copies, and this thread's weight chunk
  // (row tid / 2, chunk tid % 2 of the tile) dequantized to T. Out-of-range parts become 0 so
  // the MMA needs no bounds (0 * garbage could be NaN, hence zeros on both sides).
  auto stage = [&](int64_t kt, int buf) {
    constexpr int kSegs = kGemmBK / 8;  // 16-byte segments per x row
#pragma unroll
    for (int i = tid; i < BM * kSegs; i += kGemmThreads) {
      const int r = i / kSegs, seg = i % kSegs;
      const int64_t m = m0 + r, k = kt * kGemmBK + seg * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (m < args.M && k < args.K)  // K is a multiple of 32, so all 8 values are in range
        v = __ldg(reinterpret_cast<const uint4*>(x + m * args.x_stride + k));
      *reinterpret_cast<uint4*>(&xs[buf][r][seg * 8]) = v;
    }
    const int wr = tid >> 1, wc = tid & 1;
    const int64_t n = n0 + wr, c = kt * 2 + wc;
    uint32_t packed[16];
    if (n < args.N && c < nchunks) {
      Chunk ch;
      load_chunk<F>(args.w, n, c, ch);
#pragma unroll
      for (int i = 0; i < 32; i += 2) {
        const int h = i >> 4;
        const float w0 = fmaf(ch.a[h], chunk_code(ch, i), ch.b[h]);
        const float w1 = fmaf(ch.a[h], chunk_code(ch, i + 1), ch.b[h]);
        packed[i >> 1] = ActTraits<T>::pack2(w0, w1);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) packed[i] = 0u;
    }
    uint4* dst = reinterpret_cast<uint4*>(&ws[buf][wr][wc * 32]);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      dst[j] = make_uint4(packed[4 * j], packed[4 * j + 1], packed[4 * j + 2], packed[4 * j + 3]);
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[S::kFragM][S::kFragN];
#pragma unroll
  for (int i = 0; i < S::kFragM; ++i)
#pragma unroll
    for (int j = 0; j < S::kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  stage(0, 0);
  __syncthreads();
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int buf = static_cast<int>(kt & 1);
    // The other buffer was last read in iteration kt - 1, which ended with a barrier.
    if (kt + 1 < ktiles) stage(kt + 1, buf ^ 1);
#pragma unroll
    for (int kk = 0; kk < kGemmBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[S::kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bfr[S::kFragN];
#pragma unroll
      for (int i = 0; i < S::kFragM; ++i)
        wmma::load_matrix_sync(af[i], &xs[buf][wm * S::kWarpTileM + 16 * i][kk], kGemmLds);
#pragma unroll
      for (int j = 0; j < S::kFragN; ++j)
        wmma::load_matrix_sync(bfr[j], &ws[buf][wn * S::kWarpTileN + 16 * j][kk], kGemmLds);
#pragma unroll
      for (int i = 0; i < S::kFragM; ++i)
#pragma unroll
        for (int j = 0; j < S::kFragN; ++j) wmma::mma_sync(acc[i][j], af[i], bfr[j], acc[i][j]);
    }
    __syncthreads();  // buffer `buf` is rewritten in iteration kt + 1
  }

  // Epilogue: the accumulator layout is opaque, so each fragment goes through this warp's
  // scratch; lanes then store 8 values each with bounds checks and the bias.
  T* out = static_cast<T*>(args.out);
  float* scratch = cs[warp];
#pragma unroll
  for (int i = 0; i < S::kFragM; ++i) {
#pragma unroll
    for (int j = 0; j < S::kFragN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t mb = m0 + wm * S::kWarpTileM + 16 * i;
      const int64_t nb = n0 + wn * S::kWarpTileN + 16 * j;
#pragma unroll
      for (int e = lane; e < 256; e += 32) {
        const int64_t m = mb + (e >> 4), n = nb + (e & 15);
        if (m < args.M && n < args.N) {
          const float b = args.bias != nullptr ? load_act(args.bias, n, args.bias_dtype) : 0.0f;
          out[m * args.out_stride + n] = ActTraits<T>::from_float(scratch[e] + b);
        }
      }
      __syncwarp();  // scratch is rewritten by the next fragment
    }
  }
}

// ---- launch ---------------------------------------------------------------------------------

// Compile-time dispatch with a loud default: an unknown code returns cudaErrorNotSupported.
#define FA_QLINEAR_FORMAT_CASE(VALUE, ...)        \
  case VALUE: {                                   \
    constexpr QFormat kFmt = VALUE;               \
    return __VA_ARGS__();                         \
  }
#define FA_DISPATCH_QFORMAT(FMT, ...)                              \
  switch (FMT) {                                                   \
    FA_QLINEAR_FORMAT_CASE(QFormat::INT2, __VA_ARGS__)             \
    FA_QLINEAR_FORMAT_CASE(QFormat::INT3, __VA_ARGS__)             \
    FA_QLINEAR_FORMAT_CASE(QFormat::INT4, __VA_ARGS__)             \
    FA_QLINEAR_FORMAT_CASE(QFormat::INT8, __VA_ARGS__)             \
    FA_QLINEAR_FORMAT_CASE(QFormat::Q4_0, __VA_ARGS__)             \
    FA_QLINEAR_FORMAT_CASE(QFormat::Q4_1, __VA_ARGS__)             \
    FA_QLINEAR_FORMAT_CASE(QFormat::Q8_0, __VA_ARGS__)             \
    FA_QLINEAR_FORMAT_CASE(QFormat::Q4_K, __VA_ARGS__)             \
    FA_QLINEAR_FORMAT_CASE(QFormat::Q6_K, __VA_ARGS__)             \
    default: return cudaErrorNotSupported;                         \
  }
#define FA_DISPATCH_ACT(DT, ...)                                          \
  switch (DT) {                                                           \
    case QLinearDType::F16: { using T = __half; return __VA_ARGS__(); }   \
    case QLinearDType::BF16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
    case QLinearDType::F32: { using T = float; return __VA_ARGS__(); }    \
    default: return cudaErrorNotSupported;                                \
  }

constexpr int64_t kMaxGridY = 65535;

// gridDim.y is limited to 65535: walk very large M in slices of at most 65535 * ROWS rows,
// launching `launch(sliced_args, grid)` for each.
template <typename T, int ROWS, typename Launch>
cudaError_t launch_m_slices(const KernelArgs& args, int64_t blocks_n, Launch launch) {
  if (blocks_n > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const int64_t rows_per_launch = kMaxGridY * ROWS;
  const T* x = static_cast<const T*>(args.x);
  T* out = static_cast<T*>(args.out);
  for (int64_t m = 0; m < args.M; m += rows_per_launch) {
    KernelArgs a = args;
    a.x = x + m * args.x_stride;
    a.out = out + m * args.out_stride;
    a.M = args.M - m < rows_per_launch ? args.M - m : rows_per_launch;
    launch(a, dim3(static_cast<unsigned>(blocks_n), static_cast<unsigned>((a.M + ROWS - 1) / ROWS)));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <QFormat F, typename T, int MAXM, int R>
cudaError_t launch_gemv(const KernelArgs& args, cudaStream_t stream) {
  const int64_t blocks_n = (args.N + kGemvWarps * R - 1) / (kGemvWarps * R);
  return launch_m_slices<T, MAXM>(args, blocks_n, [&](const KernelArgs& a, dim3 grid) {
    qgemv_kernel<F, T, MAXM, R><<<grid, kGemvThreads, 0, stream>>>(a);
  });
}

template <QFormat F, typename T>
cudaError_t dispatch_gemv(const KernelArgs& args, cudaStream_t stream) {
  // Two rows per warp once several x rows are live: halves the x traffic through L1.
  if (args.M <= 1) return launch_gemv<F, T, 1, 1>(args, stream);
  if (args.M <= 2) return launch_gemv<F, T, 2, 1>(args, stream);
  if (args.M <= 4) return launch_gemv<F, T, 4, 2>(args, stream);
  return launch_gemv<F, T, 8, 2>(args, stream);
}

template <QFormat F, typename T, int BM>
cudaError_t launch_gemm(const KernelArgs& args, cudaStream_t stream) {
  const int64_t blocks_n = (args.N + kGemmBN - 1) / kGemmBN;
  return launch_m_slices<T, BM>(args, blocks_n, [&](const KernelArgs& a, dim3 grid) {
    qgemm_kernel<F, T, BM><<<grid, kGemmThreads, 0, stream>>>(a);
  });
}

template <QFormat F, typename T>
cudaError_t dispatch_gemm(const KernelArgs& args, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return dispatch_gemv<F, T>(args, stream);  // no fp32 tensor-core path: exact GEMV instead
  } else {
    if (args.M <= 16) return launch_gemm<F, T, 16>(args, stream);
    if (args.M <= 32) return launch_gemm<F, T, 32>(args, stream);
    return launch_gemm<F, T, 64>(args, stream);
  }
}

inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

}  // namespace qlinear_cuda

cudaError_t launch_qlinear(const QLinearCudaParams& p, cudaStream_t stream) {
  using namespace qlinear_cuda;
  if (p.M < 0 || p.N < 0) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;

  const int32_t code = static_cast<int32_t>(p.fmt);
  const bool known = code == 2 || code == 3 || code == 4 || code == 8 || (code >= 100 && code <= 104);
  if (!known) return cudaErrorNotSupported;
  const int64_t bv = block_values(p.fmt);
  if (p.K <= 0 || p.K % 32 != 0 || p.K % bv != 0) return cudaErrorInvalidValue;
  if (p.x == nullptr || p.qdata == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  if (p.x_row_stride < p.K || p.x_row_stride % 8 != 0 || p.out_row_stride < p.N)
    return cudaErrorInvalidValue;
  // 128-bit loads of x and of the packed rows (their byte sizes are multiples of 16 or of the
  // narrower load each format uses).
  if (!aligned(p.x, 16) || !aligned(p.qdata, 16)) return cudaErrorMisalignedAddress;

  KernelArgs args{};
  args.w.qdata = p.qdata;
  args.w.row_bytes = row_bytes(p.fmt, p.K);
  args.w.scales = p.scales;
  args.w.zeros = p.zeros;
  args.w.scale_type = p.scale_type;
  args.w.groups = 0;
  args.w.group_chunks = 1;
  if (!is_gguf(p.fmt)) {
    if (p.scales == nullptr || p.group_size <= 0 || p.group_size % 32 != 0 ||
        p.K % p.group_size != 0 || p.group_size / 32 > 0x7FFFFFFF)
      return cudaErrorInvalidValue;
    const int32_t st = static_cast<int32_t>(p.scale_type);
    if (st < 0 || st > 2) return cudaErrorNotSupported;
    args.w.groups = p.K / p.group_size;
    args.w.group_chunks = static_cast<int32_t>(p.group_size / 32);
  }
  args.x = p.x;
  args.bias = p.bias;
  args.out = p.out;
  args.M = p.M;
  args.N = p.N;
  args.K = p.K;
  args.x_stride = p.x_row_stride;
  args.out_stride = p.out_row_stride;
  args.bias_dtype = p.bias_dtype;
  const int32_t bd = static_cast<int32_t>(p.bias_dtype);
  if (p.bias != nullptr && (bd < 0 || bd > 2)) return cudaErrorNotSupported;

  const bool use_gemv = p.path == QLinearPath::GEMV ||
                  (p.path == QLinearPath::AUTO && p.M <= kQLinearGemvMaxM);
  if (p.path != QLinearPath::AUTO && p.path != QLinearPath::GEMV && p.path != QLinearPath::GEMM)
    return cudaErrorNotSupported;

  FA_DISPATCH_QFORMAT(p.fmt, [&] {
    FA_DISPATCH_ACT(p.act_dtype, [&] {
      return use_gemv ? dispatch_gemv<kFmt, T>(args, stream) : dispatch_gemm<kFmt, T>(args, stream);
    });
  });
}

}  // namespace fastadapt
