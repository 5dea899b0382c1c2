"""fastadapt::kv_append and fastadapt::kv_compact: writing new tokens into a paged KV pool and
moving kept tokens inside it (eviction/compaction). Layout and semantics:
:mod:`fastadapt_ops.ops.kv_reference` (the references below are the oracles of the tests)."""
from __future__ import annotations

from typing import Optional

import torch

from .kv_reference import kv_append_reference, kv_compact_reference

__all__ = ["kv_append", "kv_compact", "kv_append_reference", "kv_compact_reference"]


def kv_append(
    k: torch.Tensor,  # [N, H_kv, D], last dim contiguous (views into a fused QKV output are fine)
    v: torch.Tensor,  # [N, H_kv, D]
    k_pages: torch.Tensor,  # [num_pages, page_size, D] float32 | bfloat16 | float16, in place
    v_pages: torch.Tensor,  # [num_pages, page_size, D], in place
    slot_mapping: torch.Tensor,  # [N, H_kv] int32; -1 skips
) -> None:
    """Write ``k[n, h]`` (converted to the pool's dtype) at slot ``slot_mapping[n, h]`` of
    ``k_pages`` (and ``v`` likewise); slot -1 writes nothing. Slot contents are validated on CPU
    (on CUDA with ``FASTADAPT_CHECK_INDICES=1``). Two rows naming one slot: one of them wins."""
    torch.ops.fastadapt.kv_append.default(k, v, k_pages, v_pages, slot_mapping)


kv_append.__doc__ += "\n\nReference:\n" + (kv_append_reference.__doc__ or "")


def kv_compact(
    k_pages: torch.Tensor,  # [num_pages, page_size, D], in place
    v_pages: torch.Tensor,  # [num_pages, page_size, D], in place
    scores: Optional[torch.Tensor],  # [num_pages, page_size] fp32 or None, in place
    src_slots: torch.Tensor,  # [M] int32, in [0, num_pages * page_size)
    dst_slots: torch.Tensor,  # [M] int32, distinct, in range
) -> None:
    """Move token ``src_slots[i]`` to ``dst_slots[i]`` in both pools (and the score pool) for all
    ``i`` at once: every read happens before any write (the kept tokens are gathered into a
    temporary of ``M`` rows, never a copy of the pool). Unnamed slots keep their contents."""
    torch.ops.fastadapt.kv_compact.default(k_pages, v_pages, scores, src_slots, dst_slots)


kv_compact.__doc__ += "\n\nReference:\n" + (kv_compact_reference.__doc__ or "")


@torch.library.register_fake("fastadapt::kv_append")
def _kv_append_fake(k, v, k_pages, v_pages, slot_mapping):
    torch._check(k.dim() == 3 and k.shape == v.shape,
                 lambda: "fastadapt::kv_append: k and v must be [N, H_kv, D] of one shape")
    torch._check(slot_mapping.shape == k.shape[:2],
                 lambda: "fastadapt::kv_append: slot_mapping must be [N, H_kv]")
    return None


@torch.library.register_fake("fastadapt::kv_compact")
def _kv_compact_fake(k_pages, v_pages, scores, src_slots, dst_slots):
    torch._check(src_slots.shape == dst_slots.shape,
                 lambda: "fastadapt::kv_compact: src_slots and dst_slots must have equal lengths")
    return None
