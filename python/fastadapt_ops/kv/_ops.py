"""One place that picks the implementation of each KV op: the registered kernel
``torch.ops.fastadapt.<name>`` when the extension provides it, else the pure-PyTorch reference of
``fastadapt_ops.ops.kv_reference`` (same argument order, same semantics).

The lookup is done per call (``hasattr`` on the op namespace is cheap), so the package works
before the kernels are merged and picks them up as soon as the extension registers them.
``force_reference(True)`` pins the references (tests compare both paths through it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops import kv_reference as _ref

__all__ = [
    "kv_append", "kv_compact", "paged_decode_attention", "paged_prefix_attention",
    "merge_attention_states", "force_reference", "implementation",
]

_FORCE_REFERENCE = False


def force_reference(flag: bool = True) -> None:
    """Always use the Python references (``flag=True``) or the kernels when registered."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = bool(flag)


_KERNELS: dict = {}  # name -> the op's default overload, once it is registered


def _kernel(name: str):
    if _FORCE_REFERENCE:
        return None
    op = _KERNELS.get(name)
    if op is not None:
        return op
    try:
        ns = torch.ops.fastadapt
        if hasattr(ns, name):
            op = _KERNELS[name] = getattr(ns, name).default
    except (AttributeError, RuntimeError):
        pass
    return op


def implementation(name: str) -> str:
    """``"kernel"`` or ``"reference"``: what a call of ``name`` runs now."""
    return "kernel" if _kernel(name) is not None else "reference"


def kv_append(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    # k, v: [N, H_kv, D]; pages: [num_pages, page_size, D]; slot_mapping: [N, H_kv] int32
    op = _kernel("kv_append")
    if op is None:
        _ref.kv_append_reference(k, v, k_pages, v_pages, slot_mapping)
    else:
        op(k, v, k_pages, v_pages, slot_mapping)


def kv_compact(k_pages: torch.Tensor, v_pages: torch.Tensor, scores: Optional[torch.Tensor],
               src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    # src_slots, dst_slots: [M] int32 (dst distinct); scores: [num_pages, page_size] fp32 or None
    if src_slots.numel() == 0:
        return
    op = _kernel("kv_compact")
    if op is None:
        _ref.kv_compact_reference(k_pages, v_pages, scores, src_slots, dst_slots)
    else:
        op(k_pages, v_pages, scores, src_slots, dst_slots)


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           page_indptr: torch.Tensor, page_indices: torch.Tensor,
                           kv_lens: torch.Tensor, scale: float,
                           score_acc: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    # q: [B, T_q, H_q, D] -> out [B, T_q, H_q, D], lse [B, T_q, H_q] fp32 (natural log)
    op = _kernel("paged_decode_attention")
    if op is None:
        return _decode_reference_on_used_pages(q, k_pages, v_pages, page_indptr, page_indices,
                                               kv_lens, scale, score_acc)
    return op(q, k_pages, v_pages, page_indptr, page_indices, kv_lens, scale, score_acc)


def _decode_reference_on_used_pages(q, k_pages, v_pages, page_indptr, page_indices, kv_lens,
                                    scale, score_acc):
    """The reference converts the whole pool to float64 on every call; a cache pool is mostly
    free pages, so run it on a copy of the pages the tables name (same result; shared pages'
    score sums are added to ``score_acc`` in one step instead of row by row)."""
    P = k_pages.shape[0]
    if page_indices.numel() == 0 or page_indices.numel() * 2 >= P:
        return _ref.paged_decode_attention_reference(q, k_pages, v_pages, page_indptr,
                                                     page_indices, kv_lens, scale, score_acc)
    used, local = torch.unique(page_indices.long(), return_inverse=True)
    acc = None if score_acc is None else torch.zeros(used.numel(), score_acc.shape[1],
                                                     dtype=score_acc.dtype, device=score_acc.device)
    out, lse = _ref.paged_decode_attention_reference(q, k_pages[used], v_pages[used], page_indptr,
                                                     local.to(torch.int32), kv_lens, scale, acc)
    if score_acc is not None:
        score_acc.index_add_(0, used, acc)
    return out, lse


def paged_prefix_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           prefix_indptr: torch.Tensor, prefix_indices: torch.Tensor,
                           prefix_lens: torch.Tensor, scale: float
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    op = _kernel("paged_prefix_attention")
    if op is None:
        return _ref.paged_prefix_attention_reference(q, k_pages, v_pages, prefix_indptr,
                                                     prefix_indices, prefix_lens, scale)
    return op(q, k_pages, v_pages, prefix_indptr, prefix_indices, prefix_lens, scale)


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    op = _kernel("merge_attention_states")
    if op is None:
        return _ref.merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
    return op(out_a, lse_a, out_b, lse_b)
