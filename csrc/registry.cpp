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

  // ---- paged KV cache and attention --------------------------------------------------------

  // ---- token merging and pruning -----------------------------------------------------------
  // Merge plans are int32 `dest` maps [B, N]: token n of batch b goes to row dest[b, n] of the
  // reduced sequence (-1: dropped). Plans are order-preserving: kept tokens keep their order.
  // bipartite_soft_matching: ToMe's matching. metric [B, N, C]; A = even positions, B = odd;
  // every A token's most cosine-similar B token (a running row max over B blocks: the
  // N/2 x N/2 similarity is never stored); the r best A->B edges merge. protected [B, N] bool:
  // never merged and never a destination. Returns dest [B, N] int32 into N - r rows.
  m.def("bipartite_soft_matching(Tensor metric, int r, Tensor? protected=None) -> Tensor");
  // merge_tokens: size-weighted mean under a plan. out[b, m] = sum_{dest[b,n]=m} s[b,n] x[b,n] /
  // sum s[b,n] (0 where that sum is 0), sizes_out[b, m] = sum s[b,n] (fp32; sizes None = ones).
  // x [B, N, C] -> (out [B, num_out, C] x's dtype, sizes_out [B, num_out] fp32).
  m.def("merge_tokens(Tensor x, Tensor dest, int num_out, Tensor? sizes=None) -> (Tensor, Tensor)");
  // unmerge_tokens: the inverse scatter. out[b, n] = x[b, dest[b, n]], or fill[b, n] (else 0)
  // where dest is -1. x [B, M, C], dest [B, N] -> out [B, N, C].
  m.def("unmerge_tokens(Tensor x, Tensor dest, Tensor? fill=None) -> Tensor");
  // prune_tokens: keep the `keep` highest-scoring tokens (protected ones always), in their
  // original order. x [B, N, C], scores [B, N] -> (x_kept [B, keep, C], kept_idx [B, keep] int32).
  m.def("prune_tokens(Tensor x, Tensor scores, int keep, Tensor? protected=None) -> (Tensor, Tensor)");
  // proportional_attention: softmax(q k^T * scale + log(sizes_j)) v, flash style (online softmax
  // over key blocks, no N x N matrix). q [B, H, Nq, D], k/v [B, H, Nk, D], sizes [B, Nk] (0 =
  // masked key; None = ones), scale None = 1/sqrt(D). Returns [B, H, Nq, D] in q's dtype.
  m.def("proportional_attention(Tensor q, Tensor k, Tensor v, Tensor? sizes=None, float? scale=None) -> Tensor");
}
