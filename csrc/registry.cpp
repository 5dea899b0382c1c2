// Every schema of the library, in one place, grouped by family. Kernels register their
// implementations per device next to themselves (csrc/cpu/*_cpu.cpp, csrc/cuda/*_glue.cpp);
// fake kernels live in python/fastadapt_ops/ops/ right after each wrapper.
#include <torch/library.h>

TORCH_LIBRARY(fastadapt, m) {
  // ---- low-bit linear ---------------------------------------------------------------------
  // y[..., N] = x[..., K] . dequant(W)^T (+ bias), W never dequantized in memory; fp32 accumulate.
  // fmt: int2 | int3 | int4 | int8 | q4_0 | q4_1 | q8_0 | q4_k | q6_k (layouts: cpu/kernels/qformat.h)
  // act_quant: "none" (exact) | "int8" (activations quantized per 32-block, integer dot products)
  m.def(
      "qlinear(Tensor x, Tensor qdata, Tensor? scales, Tensor? zeros, Tensor? bias, str fmt, "
      "int in_features, int group_size, str act_quant='none') -> Tensor");
  // Writes into a preallocated out (hot decode loops); returns nothing, because torch's
  // functionalization (compile/export) does not accept custom ops that return an alias.
  m.def(
      "qlinear.out(Tensor x, Tensor qdata, Tensor? scales, Tensor? zeros, Tensor? bias, str fmt, "
      "int in_features, int group_size, str act_quant='none', *, Tensor(a!) out) -> ()");

  // ---- between the matmuls of a decoder layer ---------------------------------------------
  // y = x * rsqrt(mean(x^2, -1) + eps) * weight over the last dim, fp32 math, x's dtype out.
  // With residual: residual += x in place first and the sum is normalised (pre-norm decoders).
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!)? residual=None) -> Tensor");

  // ---- RoPE and SwiGLU (decoder-layer fusions) ---------------------------------------------
  // Rotary embedding of q [T, H_q, D] and k [T, H_kv, D] in place (strided views of a fused QKV
  // output are fine: last dim contiguous). Token t uses row positions[t] (int32/int64) of
  // cos_sin [max_pos, D] fp32 (cos of the D/2 frequencies, then sin); fp32 math, q's dtype kept.
  // interleaved=False: pairs (i, i + D/2) (HF/NeoX rotate-half); True: (2i, 2i + 1) (GPT-J).
  m.def("rope(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin, bool interleaved=False) -> ()");
  // SwiGLU: x [..., 2F] (gate then up) -> silu(x[..., :F]) * x[..., F:] [..., F]; fp32 math.
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("silu_mul.out(Tensor x, *, Tensor(a!) out) -> ()");

  // ---- paged KV cache and attention --------------------------------------------------------

  // ---- token merging and pruning -----------------------------------------------------------
}
