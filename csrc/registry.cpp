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

  // ---- lookup-table low-bit linear (lut helper) ----------------------------------------------
  // y[..., N] = x[..., K] . W^T (+ bias) for W of 1-4 bits stored as bit planes (layout:
  // cpu/kernels/lut_format.h): x quantized per group to int8, 16-entry tables of +-x sums per 4
  // activations built in the kernel, one lookup per (4 values, bit plane), integer accumulation,
  // scale per group and plane weight 2^i; zoffs int8 per (row, group), else zoff for all.
  m.def(
      "lut_linear(Tensor x, Tensor planes, Tensor scales, Tensor? zoffs, Tensor? bias, int bits, "
      "int out_features, int group_size, int zoff=-1) -> Tensor");

  // ---- block-sparse prefill attention (sparse helper) ----------------------------------------
  // Causal GQA attention of q [N_q, H_q, D] over k, v [N_k, H_kv, D] under a sparse layout
  // (python/fastadapt_ops/ops/block_sparse.py). Sequences: q_indptr / k_indptr [B + 1] (None: one);
  // a sequence's queries are its last q_len keys. Layout: int32 BSR over 64 x 64 blocks, rows
  // ordered (sequence, q head, query block): row_ptr [rows + 1], col_idx key blocks (sorted);
  // optional per (sequence, q head) key columns (col_indptr [B H_q + 1], cols) and diagonal
  // offsets (diag_indptr, diags: key = query position - o). Union of all three, causal, no key
  // counted twice. Returns (out [N_q, H_q, D] q's dtype, lse [N_q, H_q] fp32 natural log, -inf
  // and out 0 where a query sees no key). scale None = 1/sqrt(D).
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor row_ptr, Tensor col_idx, "
      "Tensor? q_indptr=None, Tensor? k_indptr=None, Tensor? col_indptr=None, Tensor? cols=None, "
      "Tensor? diag_indptr=None, Tensor? diags=None, float? scale=None) -> (Tensor, Tensor)");
  // Vertical-slash estimator of one sequence (q [T, H_q, D], k [T_k, H_kv, D]): softmax rows of
  // the last last_q queries; vert[h, j] = their mass on key j, slash[h, o] = their mass on
  // diagonal o (key = position - o). Returns (vert, slash), both [H_q, T_k] fp32.
  m.def("vertical_slash_scores(Tensor q, Tensor k, int last_q=64, float? scale=None) -> (Tensor, Tensor)");
  // Block top-k estimator of one sequence: scale * mean(q block r) . mean(k block c) over 64-token
  // blocks, -inf for key blocks starting after the block's last query. [H_q, nqb, nkb] fp32.
  m.def("block_pool_scores(Tensor q, Tensor k, float? scale=None) -> Tensor");

  // ---- confidence measures for adaptive decoding (spec helper) --------------------------------
  // logit_confidence: per row of logits [B, V] (float32/bfloat16/float16), of softmax(logits /
  // temperature), in one pass: stats [B, 3] fp32 = (top-1 probability, top-1 minus top-2
  // probability, entropy in nats) and argmax [B] int64 (first maximum). Early-exit and draft-stop
  // rules read these instead of a softmax + topk + entropy over the whole vocabulary.
  m.def("logit_confidence(Tensor logits, float temperature=1.0) -> (Tensor, Tensor)");
  // hidden_cosine: cos(a, b) over the last dim, fp32 [...] (CALM's saturation: the hidden states
  // of consecutive layers; no LM head needed). eps floors |a| |b|.
  m.def("hidden_cosine(Tensor a, Tensor b, float eps=1e-8) -> Tensor");

  // ---- mixture-of-experts routing (bon helper) ------------------------------------------------
  // AdaMoE routing over E real + num_null null experts. logits [T, E + num_null] (real experts
  // first): p = softmax over all, the top_k largest per token (lower index first on ties); with
  // renormalize the real choices' weights are divided by their sum (AdaMoE; null choices get 0,
  // a token choosing only nulls gets nothing), else they stay softmax probabilities. Null experts
  // produce nothing and get no row. Returns (token_ids [T*top_k] int32: grouped rows, by expert
  // then token, -1 past offsets[E]; expert_offsets [E + 1] int32; row_weights [T*top_k] fp32;
  // topk_ids [T, top_k] int32, null ids >= E kept; topk_rows [T, top_k] int32: each choice's
  // grouped row, -1 for a null expert).
  m.def("moe_route(Tensor logits, int top_k, int num_null, bool renormalize=True) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Grouped quantized linear over per-expert weights qdata [E, N, row_bytes] (scales / zeros
  // [E, N, groups]; qlinear formats): row p of the [P, N] result is x[token_ids[p]] . W[e]^T for
  // the expert e whose segment [offsets[e], offsets[e + 1]) holds p; rows from offsets[E] on are 0.
  // token_ids None: x [P, K] is already grouped. fp32 accumulate, x's dtype out.
  m.def(
      "moe_grouped_qlinear(Tensor x, Tensor qdata, Tensor? scales, Tensor? zeros, str fmt, "
      "int in_features, int group_size, Tensor expert_offsets, Tensor? token_ids=None) -> Tensor");
  // Weighted combine back to tokens: out[t] = sum_j row_weights[r] * y[r], r = topk_rows[t, j]
  // (-1 skipped, j ascending). y [P, N] -> out [T, N] in y's dtype, fp32 sums.
  m.def("moe_combine(Tensor y, Tensor row_weights, Tensor topk_rows) -> Tensor");

  // ---- decode loop ------------------------------------------------------------------------
  // torch.classes.fastadapt.DecodeStack (csrc/decode_stack.cpp, a TORCH_LIBRARY_FRAGMENT): the
  // layers of a Llama-family decode step run in C++ over the ops above, in LlamaModel.layer's
  // order (bit-identical to it), so a step pays no Python per layer. Not an op: it holds the
  // weights, set once per model.
}
