"""fastadapt::paged_decode_attention, fastadapt::paged_prefix_attention and
fastadapt::merge_attention_states: attention over a paged KV pool (CSR page tables, one row per
(sequence, KV head), GQA), shared-prefix attention, and the merge of two partial attentions by
their log-sum-exp. Layout and semantics: :mod:`fastadapt_ops.ops.kv_reference`.

LSE outputs are the natural-log log-sum-exp of the scaled logits, float32; ``-inf`` for a query
that sees no key (whose output is then 0)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .kv_reference import (
    merge_attention_states_reference,
    paged_decode_attention_reference,
    paged_prefix_attention_reference,
)

__all__ = [
    "paged_decode_attention",
    "paged_prefix_attention",
    "merge_attention_states",
    "paged_decode_attention_reference",
    "paged_prefix_attention_reference",
    "merge_attention_states_reference",
]


def paged_decode_attention(
    q: torch.Tensor,  # [B, T_q, H_q, D] float32 | bfloat16 | float16
    k_pages: torch.Tensor,  # [num_pages, page_size, D] (k_pages and v_pages of one dtype)
    v_pages: torch.Tensor,  # [num_pages, page_size, D]
    page_indptr: torch.Tensor,  # [B * H_kv + 1] int32
    page_indices: torch.Tensor,  # [nnz] int32
    kv_lens: torch.Tensor,  # [B * H_kv] int32 (the T_q new tokens included)
    scale: float,
    score_acc: Optional[torch.Tensor] = None,  # [num_pages, page_size] fp32, accumulated in place
) -> Tuple[torch.Tensor, torch.Tensor]:  # out [B, T_q, H_q, D] (q's dtype), lse [B, T_q, H_q] fp32
    """Attention of the last ``T_q`` tokens of every row over its paged keys (fp32 accumulate,
    split-K over long rows). With ``score_acc`` the per-key attention mass is accumulated in the
    same call. D <= 256. Returns ``(out, lse)``; lse is natural-log fp32."""
    return torch.ops.fastadapt.paged_decode_attention.default(q, k_pages, v_pages, page_indptr,
                                                      page_indices, kv_lens, scale, score_acc)


def paged_prefix_attention(
    q: torch.Tensor,  # [B, T_q, H_q, D]: every query of every sequence
    k_pages: torch.Tensor,  # [num_pages, page_size, D]
    v_pages: torch.Tensor,  # [num_pages, page_size, D]
    prefix_indptr: torch.Tensor,  # [H_kv + 1] int32: one row per KV head, shared by the batch
    prefix_indices: torch.Tensor,  # [nnz] int32
    prefix_lens: torch.Tensor,  # [H_kv] int32
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:  # out [B, T_q, H_q, D], lse [B, T_q, H_q] fp32
    """Non-causal attention of all queries over a prefix shared by the batch, read once per
    batch (per tile of queries). Combine with each sequence's suffix by
    :func:`merge_attention_states`. Returns ``(out, lse)``; lse is natural-log fp32."""
    return torch.ops.fastadapt.paged_prefix_attention.default(q, k_pages, v_pages, prefix_indptr,
                                                      prefix_indices, prefix_lens, scale)


def merge_attention_states(
    out_a: torch.Tensor,  # [..., H, D]
    lse_a: torch.Tensor,  # [..., H] fp32, natural log
    out_b: torch.Tensor,  # [..., H, D]
    lse_b: torch.Tensor,  # [..., H] fp32
) -> Tuple[torch.Tensor, torch.Tensor]:  # out [..., H, D] (out_a's dtype), lse [..., H] fp32
    """Attention over the union of two disjoint key sets from the attention over each side;
    a side with lse ``-inf`` contributes nothing, both empty give 0 and ``-inf``."""
    return torch.ops.fastadapt.merge_attention_states.default(out_a, lse_a, out_b, lse_b)


for _f, _ref in ((paged_decode_attention, paged_decode_attention_reference),
                 (paged_prefix_attention, paged_prefix_attention_reference),
                 (merge_attention_states, merge_attention_states_reference)):
    _f.__doc__ += "\n\nReference:\n" + (_ref.__doc__ or "")


def _attention_fake(q):
    torch._check(q.dim() == 4, lambda: "q must be [B, T_q, H_q, D]")
    B, Tq, Hq, D = q.shape
    # the kernels return fresh contiguous tensors
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Tq, Hq), dtype=torch.float32)


@torch.library.register_fake("fastadapt::paged_decode_attention")
def _paged_decode_attention_fake(q, k_pages, v_pages, page_indptr, page_indices, kv_lens, scale,
                                 score_acc=None):
    torch._check(k_pages.shape[-1] == q.shape[-1],
                 lambda: "fastadapt::paged_decode_attention: q's D must equal the pools' D")
    return _attention_fake(q)


@torch.library.register_fake("fastadapt::paged_prefix_attention")
def _paged_prefix_attention_fake(q, k_pages, v_pages, prefix_indptr, prefix_indices, prefix_lens,
                                 scale):
    torch._check(k_pages.shape[-1] == q.shape[-1],
                 lambda: "fastadapt::paged_prefix_attention: q's D must equal the pools' D")
    return _attention_fake(q)


@torch.library.register_fake("fastadapt::merge_attention_states")
def _merge_attention_states_fake(out_a, lse_a, out_b, lse_b):
    torch._check(out_a.shape == out_b.shape,
                 lambda: "fastadapt::merge_attention_states: out_b must have out_a's shape")
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape, dtype=torch.float32)
