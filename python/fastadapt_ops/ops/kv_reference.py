"""Pure-PyTorch references of the paged KV cache and attention ops (the oracle of the tests and
the fallback of devices without a kernel). They define the semantics; the kernels must agree.

Layout shared by every op of the family
---------------------------------------
- One page pool per layer and per tensor: ``k_pages``/``v_pages`` ``[num_pages, page_size, D]``
  (float32 | bfloat16 | float16). A page belongs to exactly one *row*; a row is one
  (sequence, KV head) pair, so heads of one sequence may keep different numbers of tokens and a
  head that keeps fewer tokens holds fewer pages (head-wise budgets free real memory).
- A *slot* is ``page * page_size + offset`` (int32); slot ``-1`` means "skip".
- Page tables are CSR, int32: row ``r`` owns pages ``page_indices[page_indptr[r]:page_indptr[r+1]]``
  in order, and its ``kv_lens[r]`` tokens fill them front to back (token ``j`` of row ``r`` is at
  page ``page_indices[page_indptr[r] + j // page_size]``, offset ``j % page_size``).
- Decode rows are ``r = b * H_kv + h`` for sequence ``b`` and KV head ``h``.
- An optional score pool ``scores [num_pages, page_size]`` fp32 lives beside the pages: the
  per-key attention mass that H2O/TOVA/SnapKV-style policies read. It moves with its token.
- LSE outputs are natural-log log-sum-exp of the scaled logits, float32; ``-inf`` for a query
  that sees no key (its output is then 0).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "kv_append_reference",
    "kv_compact_reference",
    "paged_decode_attention_reference",
    "paged_prefix_attention_reference",
    "merge_attention_states_reference",
    "row_slots",
]


def row_slots(page_indptr: torch.Tensor, page_indices: torch.Tensor, kv_lens: torch.Tensor,
              r: int, page_size: int) -> torch.Tensor:
    """Slots ``[kv_lens[r]]`` (int64) of row ``r``'s tokens in order."""
    n = int(kv_lens[r])
    pages = page_indices[int(page_indptr[r]):int(page_indptr[r + 1])].long()
    j = torch.arange(n)
    return pages[j // page_size] * page_size + j % page_size


def kv_append_reference(
    k: torch.Tensor,  # [N, H_kv, D]
    v: torch.Tensor,  # [N, H_kv, D]
    k_pages: torch.Tensor,  # [num_pages, page_size, D], updated in place
    v_pages: torch.Tensor,  # [num_pages, page_size, D], updated in place
    slot_mapping: torch.Tensor,  # [N, H_kv] int32; -1 skips
) -> None:
    """``k_pages.flat[slot_mapping[n, h]] = k[n, h]`` (and v) for every slot that is not -1."""
    P, S, D = k_pages.shape
    sm = slot_mapping.reshape(-1).long()
    keep = sm >= 0
    kf = k_pages.view(P * S, D)
    vf = v_pages.view(P * S, D)
    kf[sm[keep]] = k.reshape(-1, D)[keep].to(k_pages.dtype)
    vf[sm[keep]] = v.reshape(-1, D)[keep].to(v_pages.dtype)


def kv_compact_reference(
    k_pages: torch.Tensor,  # [num_pages, page_size, D], updated in place
    v_pages: torch.Tensor,  # [num_pages, page_size, D], updated in place
    scores: Optional[torch.Tensor],  # [num_pages, page_size] fp32 or None, updated in place
    src_slots: torch.Tensor,  # [M] int32
    dst_slots: torch.Tensor,  # [M] int32, distinct
) -> None:
    """Move token ``src_slots[i]`` to ``dst_slots[i]`` for all ``i`` at once (every read happens
    before any write, so a destination may be another move's source). Slots not named as a
    destination keep their contents. The caller then frees the pages nothing points to."""
    P, S, D = k_pages.shape
    src = src_slots.long()
    dst = dst_slots.long()
    for pool, width in ((k_pages, D), (v_pages, D)):
        flat = pool.view(P * S, width)
        flat[dst] = flat[src].clone()
    if scores is not None:
        flat = scores.view(P * S)
        flat[dst] = flat[src].clone()


def paged_decode_attention_reference(
    q: torch.Tensor,  # [B, T_q, H_q, D]
    k_pages: torch.Tensor,  # [num_pages, page_size, D]
    v_pages: torch.Tensor,  # [num_pages, page_size, D]
    page_indptr: torch.Tensor,  # [B * H_kv + 1] int32
    page_indices: torch.Tensor,  # [nnz] int32
    kv_lens: torch.Tensor,  # [B * H_kv] int32
    scale: float,
    score_acc: Optional[torch.Tensor] = None,  # [num_pages, page_size] fp32, accumulated in place
) -> Tuple[torch.Tensor, torch.Tensor]:  # out [B, T_q, H_q, D] (q's dtype), lse [B, T_q, H_q] fp32
    """GQA attention of ``T_q`` new query tokens per sequence over its paged keys, in float64.

    Query head ``hq`` reads KV head ``hq // (H_q // H_kv)``. The ``T_q`` queries are the last
    ``T_q`` tokens of each row, causal among themselves: query ``t`` of row ``r`` sees keys
    ``0 .. kv_lens[r] - T_q + t`` (all keys when ``T_q == 1``). With ``score_acc``, each key's
    softmax probability, summed over the row's query heads and query tokens, is added at its slot.
    """
    B, Tq, Hq, D = q.shape
    R = kv_lens.numel()
    Hkv = R // B
    G = Hq // Hkv
    P, S, _ = k_pages.shape
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Tq, Hq), float("-inf"), dtype=torch.float64)
    kf = k_pages.reshape(P * S, D).double()
    vf = v_pages.reshape(P * S, D).double()
    for b in range(B):
        for h in range(Hkv):
            r = b * Hkv + h
            slots = row_slots(page_indptr, page_indices, kv_lens, r, S)
            n = slots.numel()
            K, V = kf[slots], vf[slots]  # [n, D]
            qs = q[b, :, h * G:(h + 1) * G].double()  # [Tq, G, D]
            logits = torch.einsum("tgd,nd->tgn", qs, K) * scale
            visible = torch.arange(n)[None, :] <= (n - Tq + torch.arange(Tq))[:, None]  # [Tq, n]
            logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
            m = torch.logsumexp(logits, -1)  # [Tq, G]
            p = torch.exp(logits - m[..., None]).nan_to_num(0.0)
            out[b, :, h * G:(h + 1) * G] = torch.einsum("tgn,nd->tgd", p, V)
            lse[b, :, h * G:(h + 1) * G] = m
            if score_acc is not None and n:
                score_acc.view(P * S).index_add_(0, slots, p.sum((0, 1)).to(score_acc.dtype))
    return out.to(q.dtype), lse.float()


def paged_prefix_attention_reference(
    q: torch.Tensor,  # [B, T_q, H_q, D]: every query of every sequence
    k_pages: torch.Tensor,  # [num_pages, page_size, D]
    v_pages: torch.Tensor,  # [num_pages, page_size, D]
    prefix_indptr: torch.Tensor,  # [H_kv + 1] int32: one row per KV head, shared by all sequences
    prefix_indices: torch.Tensor,  # [nnz] int32
    prefix_lens: torch.Tensor,  # [H_kv] int32
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:  # out [B, T_q, H_q, D], lse [B, T_q, H_q] fp32
    """Non-causal attention of all queries over one shared prefix (read once for the batch: the
    ``B * T_q * G`` queries of a KV head form one matrix against the prefix keys). Combine with
    each sequence's own suffix through :func:`merge_attention_states_reference`."""
    B, Tq, Hq, D = q.shape
    Hkv = prefix_lens.numel()
    G = Hq // Hkv
    P, S, _ = k_pages.shape
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Tq, Hq), float("-inf"), dtype=torch.float64)
    kf = k_pages.reshape(P * S, D).double()
    vf = v_pages.reshape(P * S, D).double()
    for h in range(Hkv):
        slots = row_slots(prefix_indptr, prefix_indices, prefix_lens, h, S)
        if slots.numel() == 0:
            continue
        K, V = kf[slots], vf[slots]
        qs = q[:, :, h * G:(h + 1) * G].double()  # [B, Tq, G, D]
        logits = torch.einsum("btgd,nd->btgn", qs, K) * scale
        m = torch.logsumexp(logits, -1)
        out[:, :, h * G:(h + 1) * G] = torch.einsum("btgn,nd->btgd", torch.exp(logits - m[..., None]), V)
        lse[:, :, h * G:(h + 1) * G] = m
    return out.to(q.dtype), lse.float()


def merge_attention_states_reference(
    out_a: torch.Tensor,  # [..., H, D]
    lse_a: torch.Tensor,  # [..., H] fp32, natural log
    out_b: torch.Tensor,  # [..., H, D]
    lse_b: torch.Tensor,  # [..., H] fp32
) -> Tuple[torch.Tensor, torch.Tensor]:  # out [..., H, D] (out_a's dtype), lse [..., H] fp32
    """Attention over the union of two disjoint key sets from the attention over each:
    ``lse = logaddexp(lse_a, lse_b)``, ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.
    A side with ``lse = -inf`` (no keys) contributes nothing; both empty gives 0 and ``-inf``."""
    la, lb = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(la, lb)
    wa = torch.exp(la - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lb - lse).nan_to_num(0.0)[..., None]
    out = out_a.double() * wa + out_b.double() * wb
    return out.to(out_a.dtype), lse.float()
