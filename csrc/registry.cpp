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
  // Layout (python/fastadapt_ops/ops/kv_reference.py): pools [num_pages, page_size, D]; a slot is
  // page * page_size + offset (int32, -1 skips); CSR page tables, one row per (sequence, KV head);
  // LSE outputs are natural-log fp32, -inf for a query that sees no key (its output is then 0).
  // Write new tokens' k/v [N, H_kv, D] (any strides but the last) at slot_mapping [N, H_kv].
  m.def("kv_append(Tensor k, Tensor v, Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor slot_mapping) -> ()");
  // Move tokens src_slots[i] -> dst_slots[i] (distinct) in both pools and the score pool, all
  // reads before any write (eviction: gather the kept tokens to the front of fewer pages).
  m.def(
      "kv_compact(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!)? scores, Tensor src_slots, "
      "Tensor dst_slots) -> ()");
  // GQA attention of T_q >= 1 new tokens per sequence (causal among themselves) over its paged
  // keys; returns (out [B, T_q, H_q, D] in q's dtype, lse [B, T_q, H_q] fp32). With score_acc
  // [num_pages, page_size] fp32, each key's softmax mass (summed over the row's queries) is added.
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor page_indptr, "
      "Tensor page_indices, Tensor kv_lens, float scale, Tensor(a!)? score_acc=None) -> (Tensor, Tensor)");
  // Non-causal attention of all B * T_q queries over one prefix per KV head shared by the batch
  // (read once for the batch); merge with each sequence's suffix via merge_attention_states.
  m.def(
      "paged_prefix_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor prefix_indptr, "
      "Tensor prefix_indices, Tensor prefix_lens, float scale) -> (Tensor, Tensor)");
  // Attention over the union of two disjoint key sets from each side's (out, lse).
  m.def(
      "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)");

  // ---- token merging and pruning -----------------------------------------------------------
}
