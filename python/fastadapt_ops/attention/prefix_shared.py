"""Shared-prefix (cascade, Hydragen-style) attention: a batch whose sequences share one prompt
prefix keeps the prefix's pages once per KV head; every step attends

  1. all ``B * T_q`` queries of a KV head over the shared prefix as one matrix
     (:func:`~fastadapt_ops.ops.paged_prefix_attention`: the prefix is read once for the batch),
  2. each sequence over its own suffix pages (:func:`~fastadapt_ops.ops.paged_decode_attention`,
     causal among the ``T_q`` new tokens, which are the last ``T_q`` tokens of the suffix),
  3. and merges the two by their log-sum-exp
     (:func:`~fastadapt_ops.ops.merge_attention_states`).

The result equals attention over prefix + suffix keys, the new tokens seeing the whole prefix.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..ops import merge_attention_states, paged_decode_attention, paged_prefix_attention

PageTable = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (indptr, indices, lens), int32


def prefix_shared_attention(
    q: torch.Tensor,  # [B, T_q, H_q, D]
    k_pages: torch.Tensor,  # [num_pages, page_size, D]
    v_pages: torch.Tensor,  # [num_pages, page_size, D]
    prefix: PageTable,  # ([H_kv + 1], [nnz_p], [H_kv]): one row per KV head, shared by the batch
    suffix: PageTable,  # ([B * H_kv + 1], [nnz_s], [B * H_kv]): rows b * H_kv + h
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:  # out [B, T_q, H_q, D] (q's dtype), lse [B, T_q, H_q] fp32
    """Attention of the batch's new tokens over a shared prefix plus per-sequence suffixes.

    Returns ``(out, lse)``, lse natural-log fp32.
    """
    p_indptr, p_indices, p_lens = prefix
    s_indptr, s_indices, s_lens = suffix
    out_p, lse_p = paged_prefix_attention(q, k_pages, v_pages, p_indptr, p_indices, p_lens, scale)
    out_s, lse_s = paged_decode_attention(q, k_pages, v_pages, s_indptr, s_indices, s_lens, scale)
    return merge_attention_states(out_p, lse_p, out_s, lse_s)
